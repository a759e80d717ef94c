"""``DeltaLinear`` and ``DeltaEmbedding``: a frozen base weight plus a 1-bit delta applied on the fly.

For a base weight ``W`` ``[N, K]``, packed signs ``S`` (int32 ``[N, ceil(K/32)]``, layout v1) and a
scale ``s``::

    DeltaLinear(x)    = x·Wᵀ + s·(x·Sᵀ) + bias          x [..., K] -> [..., N]
    DeltaEmbedding(i) = W[i] + s·S[i]                    i [...] int -> [..., K]

which equals the materialized fine-tune ``(W + s·S)`` up to rounding, without ever building the
``[N, K]`` delta. On a CUDA device with a working Triton the forward pass runs
:func:`deltahub.kernels.sign_matmul`; elsewhere the chunked torch path of
:mod:`deltahub.runtime.signs` (the choice is logged once, see :mod:`deltahub.runtime.backend`).

Gradients: ``x`` and the scale (when ``trainable_scale``) get gradients; ``W``, ``bias`` and the
packed signs never do. ``grad_scale = Σ grad_y ⊙ (x·Sᵀ) = Σ x ⊙ (grad_y·S)``, computed from the
same chunked ``grad_y·S`` that gives ``grad_x``, so backward saves no unpacked signs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.codec.codecs import CodecError
from deltahub.codec.packing import WORD_BITS
from deltahub.runtime import signs
from deltahub.runtime.backend import Backend, choose_backend

__all__ = ["DeltaLinear", "DeltaEmbedding", "sign_delta", "check_delta_args"]

logger = logging.getLogger(__name__)


def check_delta_args(weight: Tensor, packed: Tensor, bias: Tensor | None = None) -> None:
    """Validate a base weight ``[N, K]``, its packed signs int32 ``[N, ceil(K/32)]`` and a bias ``[N]``.

    Raises:
        CodecError: wrong rank, dtype, shape or device.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise CodecError(f"the base weight must be a 2-D float tensor, got {_describe(weight)}")
    n, k = weight.shape
    want = (n, -(-k // WORD_BITS))
    if not isinstance(packed, Tensor) or packed.dtype != torch.int32 or tuple(packed.shape) != want:
        raise CodecError(
            f"packed signs for a [{n}, {k}] weight must be int32 {list(want)}, got {_describe(packed)}"
        )
    if packed.device != weight.device:
        raise CodecError(f"packed signs are on {packed.device} but the weight is on {weight.device}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
        raise CodecError(f"the bias must have shape [{n}], got {_describe(bias)}")


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


def _kernels() -> Any:
    from deltahub import kernels

    return kernels


class _SignDelta(torch.autograd.Function):
    """``d = scale·(x·Sᵀ)`` with gradients for ``x`` and ``scale`` (none for the packed signs)."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, packed: Tensor, scale: Tensor, k: int, use_kernel: bool) -> Tensor:
        ctx.save_for_backward(x2d, packed, scale)
        ctx.k = k
        if use_kernel:
            return _kernels().sign_matmul(x2d, packed, scale.to(torch.float32)).to(x2d.dtype)
        z = signs.sign_matmul_torch(x2d, packed, k)
        return (z * scale.to(z.dtype)).to(x2d.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None]:
        x2d, packed, scale = ctx.saved_tensors
        need_x, _, need_scale = ctx.needs_input_grad[:3]
        if not (need_x or need_scale):
            return None, None, None, None, None
        gs = signs.sign_matmul_t_torch(grad, packed, ctx.k)  # grad·S, [M, K]
        grad_x = (gs * scale.to(gs.dtype)).to(x2d.dtype) if need_x else None
        grad_scale = None
        if need_scale:
            grad_scale = (gs.to(torch.float32) * x2d.to(torch.float32)).sum().to(scale.dtype)
        return grad_x, None, grad_scale, None, None


def sign_delta(x2d: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``scale·(x·Sᵀ)`` in ``x``'s dtype, differentiable in ``x`` and ``scale``.

    Args:
        x2d: ``[M, K]`` float. packed: int32 ``[N, ceil(K/32)]``. scale: 0-d fp32. k: ``K``.

    Returns:
        ``[M, N]`` in ``x2d.dtype``.
    """
    use_kernel = choose_backend(x2d.device) is Backend.TRITON
    return _SignDelta.apply(x2d, packed, scale, k, use_kernel)


class _KeepFp32Scale(nn.Module):
    """Keeps the ``scale`` parameter in fp32 through ``.to(dtype)``/``.half()`` (devices still move)."""

    scale: nn.Parameter

    def _init_scale(self, scale: float | Tensor, device: torch.device, trainable: bool) -> None:
        """Set ``self.scale``: a 0-d fp32 parameter on ``device`` (a copy of ``scale``)."""
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        self.scale = nn.Parameter(s.to(device), requires_grad=trainable)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # type: ignore[override]
        before = self.scale.data
        out = super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale.data = before.to(device=self.scale.device, dtype=torch.float32)
        return out


class DeltaLinear(_KeepFp32Scale):
    """A linear layer ``x·Wᵀ + s·(x·Sᵀ) + bias`` whose delta stays packed.

    Attributes:
        weight: frozen base weight ``[N, K]`` (``nn.Parameter`` with ``requires_grad=False``).
        bias: frozen ``[N]`` or ``None``.
        packed: buffer, int32 ``[N, ceil(K/32)]`` packed signs (layout v1).
        scale: ``nn.Parameter``, 0-d fp32; ``requires_grad=trainable_scale``.
    """

    def __init__(
        self,
        weight: Tensor,
        packed: Tensor,
        scale: float | Tensor,
        bias: Tensor | None = None,
        trainable_scale: bool = False,
    ) -> None:
        super().__init__()
        check_delta_args(weight, packed, bias)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("packed", packed.detach())
        self._init_scale(scale, weight.device, trainable_scale)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, packed: Tensor, scale: float | Tensor, trainable_scale: bool = False
    ) -> DeltaLinear:
        """Wrap ``linear`` (its weight and bias become the frozen base; no copy)."""
        return cls(linear.weight, packed, scale, bias=linear.bias, trainable_scale=trainable_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[..., K]`` → ``[..., N]`` in ``x``'s dtype."""
        if x.shape[-1] != self.in_features:
            raise CodecError(f"DeltaLinear expects inputs [..., {self.in_features}], got {list(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        grad = torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)
        if not grad and choose_backend(x.device) is Backend.TRITON:
            xw = x2d if x2d.dtype == self.weight.dtype else x2d.to(self.weight.dtype)  # never copy W
            y = _kernels().sign_matmul(xw, self.packed, self.scale, self.weight, self.bias)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        y = _base_linear(x2d, self.weight, self.bias)
        y = y + sign_delta(x2d, self.packed, self.scale, self.in_features)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale={float(self.scale):.4g}, "
            f"trainable_scale={self.scale.requires_grad}"
        )


def _base_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x·Wᵀ + bias`` in ``x``'s dtype (activations are cast to the weight's dtype, never the weight)."""
    if weight.dtype == x2d.dtype:
        return F.linear(x2d, weight, bias)
    return F.linear(x2d.to(weight.dtype), weight, bias).to(x2d.dtype)


class DeltaEmbedding(_KeepFp32Scale):
    """An embedding ``W[i] + s·S[i]`` (base rows plus scaled sign rows; nothing materialized).

    Attributes:
        weight: frozen base table ``[V, H]``; packed: int32 ``[V, ceil(H/32)]``;
        scale: ``nn.Parameter`` 0-d fp32; padding_idx as in :class:`torch.nn.Embedding`.
    """

    def __init__(
        self,
        weight: Tensor,
        packed: Tensor,
        scale: float | Tensor,
        padding_idx: int | None = None,
        trainable_scale: bool = False,
    ) -> None:
        super().__init__()
        check_delta_args(weight, packed)
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.register_buffer("packed", packed.detach())
        self._init_scale(scale, weight.device, trainable_scale)

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, packed: Tensor, scale: float | Tensor, trainable_scale: bool = False
    ) -> DeltaEmbedding:
        return cls(emb.weight, packed, scale, padding_idx=emb.padding_idx, trainable_scale=trainable_scale)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids`` int ``[...]`` → ``[..., H]`` in the weight's dtype."""
        flat = ids.reshape(-1)
        base = F.embedding(flat, self.weight, self.padding_idx)
        rows = signs.sign_rows(self.packed, flat, self.embedding_dim, torch.float32)
        out = base.to(torch.float32) + self.scale * rows
        return out.to(self.weight.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scale={float(self.scale):.4g}"
