"""``DeltaLinear`` and ``DeltaEmbedding``: a frozen base weight plus a codec's delta applied on the fly.

For a base weight ``W`` ``[N, K]`` and the delta ``Δ`` of a codec's :class:`~deltahub.codec.DeltaOperator`
(for ``sign1``: ``Δ = s·S``, packed signs ``S`` int32 ``[N, ceil(K/32)]`` and a scale ``s``)::

    DeltaLinear(x)    = x·Wᵀ + x·Δᵀ + bias          x [..., K] -> [..., N]
    DeltaEmbedding(i) = W[i] + Δ[i]                 i [...] int -> [..., K]

which equals the materialized fine-tune ``(W + Δ)`` up to rounding, without ever building the
``[N, K]`` delta. On a CUDA device with a working Triton the operator's kernel hook runs (``sign1``:
:func:`deltahub.kernels.sign_matmul`, one fused call); elsewhere its torch path (``sign1``: the chunked
products of :mod:`deltahub.codec.signs`; the choice is logged once, see :mod:`deltahub.runtime.backend`).

Gradients: ``x`` and the operator's trainable parameters (the scale, when ``trainable_scale``) get
gradients; ``W``, ``bias`` and the stored parts never do.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.codec import DeltaOperator
from deltahub.codec.codecs import CodecError
from deltahub.codec.sign_apply import SignOperator, check_packed, sign_delta as _sign_delta
from deltahub.runtime.backend import Backend, choose_backend

__all__ = ["DeltaLinear", "DeltaEmbedding", "sign_delta", "check_delta_args", "as_operator"]

logger = logging.getLogger(__name__)


def check_delta_args(weight: Tensor, packed: Tensor | DeltaOperator, bias: Tensor | None = None) -> None:
    """Validate a base weight ``[N, K]``, its delta (an operator of shape ``[N, K]``, or packed signs
    int32 ``[N, ceil(K/32)]``) and a bias ``[N]``.

    Raises:
        CodecError: wrong rank, dtype, shape or device.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise CodecError(f"the base weight must be a 2-D float tensor, got {_describe(weight)}",
                         "pass the base model's Linear/Embedding weight")
    n, k = weight.shape
    if isinstance(packed, DeltaOperator):
        if (packed.out_features, packed.in_features) != (n, k):
            raise CodecError(
                f"a delta of shape [{packed.out_features}, {packed.in_features}] does not fit a [{n}, {k}] weight"
            )
    else:
        check_packed(packed, n, k)
        if packed.device != weight.device:
            raise CodecError(f"packed signs are on {packed.device} but the weight is on {weight.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
        raise CodecError(f"the bias must have shape [{n}], got {_describe(bias)}")


def as_operator(delta: Tensor | DeltaOperator, scale: float | Tensor | None, k: int, trainable: bool) -> DeltaOperator:
    """``delta`` itself, or for packed signs and a scale the ``sign1`` operator."""
    if isinstance(delta, DeltaOperator):
        if scale is not None:
            raise CodecError("a scale is given with a delta operator (it holds its own parameters)")
        for p in delta.trainable().values():
            p.requires_grad_(trainable)
        return delta
    if scale is None:
        raise CodecError("packed signs need a scale")
    return SignOperator(delta, scale, k, trainable=trainable)


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


def _kernels_for(x: Tensor) -> Any:
    """The ``deltahub.kernels`` module when the kernels run on ``x``'s device, else None."""
    if choose_backend(x.device) is not Backend.TRITON:
        return None
    from deltahub import kernels

    return kernels


def sign_delta(x2d: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``scale·(x·Sᵀ)`` in ``x``'s dtype, differentiable in ``x`` and ``scale`` (the ``sign1``
    operator's product, on the backend chosen for ``x``'s device).

    Args:
        x2d: ``[M, K]`` float. packed: int32 ``[N, ceil(K/32)]``. scale: 0-d fp32. k: ``K``.
    """
    return _sign_delta(x2d, packed, scale, k, _kernels_for(x2d))


class _HasDelta(nn.Module):
    """``delta`` (a :class:`DeltaOperator` submodule) with the ``sign1`` attribute names kept:
    ``packed`` and ``scale`` are the operator's, when it has them."""

    delta: DeltaOperator

    @property
    def packed(self) -> Tensor:
        return self.delta.packed  # type: ignore[return-value]

    @property
    def scale(self) -> nn.Parameter:
        return self.delta.scale  # type: ignore[return-value]


class DeltaLinear(_HasDelta):
    """A linear layer ``x·Wᵀ + x·Δᵀ + bias`` whose delta stays in its codec's stored form.

    ``DeltaLinear(weight, op, bias=...)`` takes a codec's :class:`DeltaOperator`;
    ``DeltaLinear(weight, packed, scale, bias=...)`` builds the ``sign1`` one.

    Attributes:
        weight: frozen base weight ``[N, K]`` (``nn.Parameter`` with ``requires_grad=False``).
        bias: frozen ``[N]`` or ``None``.
        delta: the operator (for ``sign1``, ``packed`` int32 ``[N, ceil(K/32)]`` and ``scale`` 0-d
            fp32, also reachable as ``self.packed`` / ``self.scale``).
    """

    def __init__(
        self,
        weight: Tensor,
        packed: Tensor | DeltaOperator,
        scale: float | Tensor | None = None,
        bias: Tensor | None = None,
        trainable_scale: bool = False,
    ) -> None:
        super().__init__()
        check_delta_args(weight, packed, bias)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.delta = as_operator(packed, scale, self.in_features, trainable_scale)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, packed: Tensor | DeltaOperator, scale: float | Tensor | None = None,
        trainable_scale: bool = False,
    ) -> DeltaLinear:
        """Wrap ``linear`` (its weight and bias become the frozen base; no copy)."""
        return cls(linear.weight, packed, scale, bias=linear.bias, trainable_scale=trainable_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[..., K]`` → ``[..., N]`` in ``x``'s dtype."""
        if x.shape[-1] != self.in_features:
            raise CodecError(
                f"DeltaLinear expects inputs [..., {self.in_features}], got {list(x.shape)}",
                "feed the layer activations of its input width (the base model's)",
            )
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        kernels = _kernels_for(x)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.delta.trainable().values())
        )
        if not grad and kernels is not None:
            y = self.delta.kernel_linear(kernels, x2d, self.weight, self.bias)
            if y is not None:
                return y.to(x.dtype).reshape(*lead, self.out_features)
        y = _base_linear(x2d, self.weight, self.bias)
        y = y + self.delta.matmul(x2d, kernels)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _base_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x·Wᵀ + bias`` in ``x``'s dtype (activations are cast to the weight's dtype, never the weight)."""
    if weight.dtype == x2d.dtype:
        return F.linear(x2d, weight, bias)
    return F.linear(x2d.to(weight.dtype), weight, bias).to(x2d.dtype)


class DeltaEmbedding(_HasDelta):
    """An embedding ``(W[i].float() + Δ[i]).to(dtype)`` (base rows plus the delta's rows; nothing
    materialized): bit-identical to the materialized row.

    Attributes:
        weight: frozen base table ``[V, H]``; delta: the operator (``sign1``: ``packed`` int32
        ``[V, ceil(H/32)]`` and ``scale``); padding_idx as in :class:`torch.nn.Embedding`.
    """

    def __init__(
        self,
        weight: Tensor,
        packed: Tensor | DeltaOperator,
        scale: float | Tensor | None = None,
        padding_idx: int | None = None,
        trainable_scale: bool = False,
    ) -> None:
        super().__init__()
        check_delta_args(weight, packed)
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.delta = as_operator(packed, scale, self.embedding_dim, trainable_scale)

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, packed: Tensor | DeltaOperator, scale: float | Tensor | None = None,
        trainable_scale: bool = False,
    ) -> DeltaEmbedding:
        return cls(emb.weight, packed, scale, padding_idx=emb.padding_idx, trainable_scale=trainable_scale)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids`` int ``[...]`` → ``[..., H]`` in the weight's dtype."""
        flat = ids.reshape(-1)
        base = F.embedding(flat, self.weight, self.padding_idx)
        out = base.to(torch.float32) + self.delta.rows(flat)
        return out.to(self.weight.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
