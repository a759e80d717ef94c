"""Multi-tenant serving: one base model, several deltas, every row of a batch using its own.

A model is loaded once with the base's tensors; :func:`install_tenants` then replaces each module
whose tensors differ in at least one tenant:

* ``Linear`` / GPT-2 ``Conv1D`` → :class:`MultiTenantLinear`: the shared base GEMM for all rows, plus
  per row ``scale_t·(x·S_tᵀ)`` from the stacked packed signs ``[T, N, W]``
  (:func:`deltahub.kernels.multi_tenant_sign_matmul` on a GPU; on the CPU a memory-bounded torch path
  grouping rows by tenant). Per-tenant biases are gathered per row; a tenant whose weight is stored
  dense has its rows computed with that weight.
* ``Embedding`` → :class:`MultiTenantEmbedding`: base rows plus the tenant's scaled sign rows (exactly
  the materialized ``(W + s·S).to(dtype)`` row), or the tenant's dense table.
* anything else with per-tenant tensors (norm weights and biases, …) → :class:`MultiTenantModule`:
  the module is run with each tenant's tensors (``torch.func.functional_call``) on that tenant's rows.

Tenant ids: ``0 … T-1`` index the deltas, ``-1`` is the base. The ids of a batch's rows are set on
the model's shared :class:`TenantState` (``with tm.use(ids): model(...)``); a module maps the rows of
its input to batch rows through the leading dimension (``x`` is ``[B, ...]``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.codec.codecs import CodecError
from deltahub.codec.packing import WORD_BITS
from deltahub.runtime import signs
from deltahub.runtime.backend import Backend, choose_backend
from deltahub.runtime.patch import is_conv1d, module_owners, set_module, transpose_packed

__all__ = [
    "TenantError",
    "TenantState",
    "TensorChange",
    "MultiTenantLinear",
    "MultiTenantEmbedding",
    "MultiTenantModule",
    "install_tenants",
    "TenantModel",
]

logger = logging.getLogger(__name__)

BASE = -1
"""The tenant id of rows that use the base model."""


class TenantError(ValueError):
    """The batch's tenant ids are missing, out of range, or do not match the input's rows."""


@dataclass
class TensorChange:
    """How one tensor of one tenant differs from the base: ``sign1`` (``packed`` int32 ``[R, ceil(C/32)]``
    of the stored ``[R, C]`` tensor, and ``scale``) or ``dense`` (``tensor``, the tenant's own)."""

    packed: Tensor | None = None
    scale: float | None = None
    tensor: Tensor | None = None

    @property
    def is_sign1(self) -> bool:
        return self.packed is not None


@dataclass
class TenantState:
    """The tenant id of every batch row (int64 ``[B]``), shared by all multi-tenant modules of a model."""

    n_tenants: int
    ids: Tensor | None = None
    _groups: dict[torch.device, list[tuple[int, Tensor]]] = field(default_factory=dict)

    def set(self, ids: Tensor | None) -> None:
        self.ids = ids
        self._groups = {}

    def rows(self, x: Tensor) -> Tensor:
        """The ids, checked against ``x``'s leading (batch) dimension."""
        if self.ids is None:
            raise TenantError(
                "no tenant ids are set for this batch: run the model inside `with model.use(ids):`"
            )
        if x.shape[0] != self.ids.shape[0]:
            raise TenantError(
                f"the batch has {x.shape[0]} rows but {self.ids.shape[0]} tenant ids are set"
            )
        return self.ids

    def groups(self, device: torch.device) -> list[tuple[int, Tensor]]:
        """``[(tenant, batch row indices on device)]`` for the tenants present (base included)."""
        hit = self._groups.get(device)
        if hit is None:
            assert self.ids is not None
            ids = self.ids.cpu()
            hit = [
                (int(t), (ids == t).nonzero().flatten().to(device))
                for t in torch.unique(ids).tolist()
            ]
            self._groups[device] = hit
        return hit


@dataclass
class SignStack:
    """The ``sign1`` deltas of one weight ``[N, K]`` for several tenants.

    Attributes:
        packed: int32 ``[T_s, N, ceil(K/32)]`` (the tenants that have a sign delta, in id order).
        scales: fp32 ``[T_s]``.
        slot: int64 ``[T]``: tenant → index into ``packed``, ``-1`` for tenants without one.
    """

    packed: Tensor
    scales: Tensor
    slot: Tensor

    @classmethod
    def build(cls, sign: dict[int, tuple[Tensor, float]], n_tenants: int, n: int, k: int,
              device: torch.device) -> SignStack:
        tenants = sorted(sign)
        w = -(-k // WORD_BITS)
        for t in tenants:
            if tuple(sign[t][0].shape) != (n, w) or sign[t][0].dtype != torch.int32:
                raise CodecError(f"tenant {t}: packed signs {list(sign[t][0].shape)} do not fit [{n}, {k}]")
        slot = torch.full((n_tenants,), -1, dtype=torch.int64)
        for i, t in enumerate(tenants):
            slot[t] = i
        if tenants:
            packed = torch.stack([sign[t][0] for t in tenants])
        else:
            packed = torch.zeros((0, n, w), dtype=torch.int32)
        scales = torch.tensor([sign[t][1] for t in tenants], dtype=torch.float32)
        return cls(packed.to(device), scales.to(device), slot.to(device))


def _kernel_ids(slot: Tensor, row_tenant: Tensor) -> Tensor:
    """Tenant of each row (int64 ``[R]``) → index into the stacked signs via ``slot`` (int64 ``[T]``,
    see :class:`SignStack`), ``-1`` for base-only rows: int64 ``[R]``, for the kernel."""
    return torch.where(row_tenant >= 0, slot[row_tenant.clamp(min=0)], -1)


def _batch_of_rows(ids: Tensor, x: Tensor) -> Tensor:
    """The tenant of every row of ``x.reshape(-1, x.shape[-1])`` (``x`` ``[B, ..., K]``)."""
    per = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    return ids.to(x.device).repeat_interleave(per)


class MultiTenantLinear(nn.Module):
    """``y[r] = x[r]·Wᵀ + s_t·(x[r]·S_tᵀ) + b_t`` for ``t`` = the tenant of row ``r``.

    Attributes:
        weight: frozen shared base ``[N, K]``.
        packed: int32 ``[T_s, N, ceil(K/32)]``: signs of the tenants with a ``sign1`` weight.
        scales: fp32 ``[T_s]``.
        slot: int64 ``[T]``: tenant → index into ``packed`` (``-1``: no sign delta for this tenant).
        bias: ``[N]`` shared base bias, or ``None``; bias_stack: ``[T+1, N]`` (row 0 = base,
            row ``t+1`` = tenant ``t``) when some tenant's bias differs, else ``None``.
        dense weights: tenant ``t`` whose weight is stored dense has buffer ``dense_weight_{t}``
            ``[N, K]`` used for its rows.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        state: TenantState,
        stack: SignStack,
        dense: dict[int, Tensor],
        biases: dict[int, Tensor],
    ) -> None:
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = int(k), int(n)
        self.state = state
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if tuple(stack.packed.shape[1:]) != (n, -(-k // WORD_BITS)):
            raise CodecError(f"packed signs {list(stack.packed.shape)} do not fit a [{n}, {k}] weight")
        self.register_buffer("packed", stack.packed)
        self.register_buffer("scales", stack.scales)
        self.register_buffer("slot", stack.slot)
        self._slots: list[int] = stack.slot.tolist()  # host copy: no device sync per forward
        self.dense_tenants = sorted(dense)
        for t in self.dense_tenants:
            if tuple(dense[t].shape) != (n, k):
                raise CodecError(f"tenant {t}: dense weight {list(dense[t].shape)} does not fit [{n}, {k}]")
            self.register_buffer(f"dense_weight_{t}", dense[t].detach())
        if biases:
            base_b = bias if bias is not None else torch.zeros(n, dtype=weight.dtype, device=weight.device)
            rows = [base_b] + [biases.get(t, base_b) for t in range(state.n_tenants)]
            self.register_buffer("bias_stack", torch.stack([r.to(base_b.dtype) for r in rows]))
        else:
            self.bias_stack = None

    def forward(self, x: Tensor) -> Tensor:
        ids = self.state.rows(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        w = self.weight
        if w.dtype != x.dtype:
            raise TenantError(f"input dtype {x.dtype} does not match the model's {w.dtype}")
        row_tenant = _batch_of_rows(ids, x)
        per = x2d.shape[0] // max(1, x.shape[0])  # rows of x2d per batch row
        if self.packed.shape[0] and choose_backend(x.device) is Backend.TRITON and not torch.is_grad_enabled():
            from deltahub import kernels

            kernel_ids = _kernel_ids(self.slot, row_tenant)
            y = kernels.multi_tenant_sign_matmul(x2d, w, self.packed, self.scales, kernel_ids, validate=False)
        else:
            y = F.linear(x2d, w)
            for t, brows in self.state.groups(x.device):
                if t == BASE or self._slots[t] < 0:
                    continue
                s = self._slots[t]
                rows = _expand(brows, per)
                z = signs.sign_matmul_torch(x2d.index_select(0, rows), self.packed[s], self.in_features)
                y.index_add_(0, rows, (z * self.scales[s].to(z.dtype)).to(y.dtype))
        if self.bias_stack is not None:
            y = y + self.bias_stack.index_select(0, row_tenant + 1)
        elif self.bias is not None:
            y = y + self.bias
        if self.dense_tenants:
            for t, brows in self.state.groups(x.device):
                if t in self.dense_tenants:
                    rows = _expand(brows, per)
                    b = self.bias if self.bias_stack is None else self.bias_stack[t + 1]
                    y.index_copy_(0, rows, F.linear(x2d.index_select(0, rows), getattr(self, f"dense_weight_{t}"), b))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"sign_tenants={self.packed.shape[0]}, dense_tenants={len(self.dense_tenants)}, "
            f"per_tenant_bias={self.bias_stack is not None}"
        )


def _expand(batch_rows: Tensor, per: int) -> Tensor:
    """Batch row indices → row indices of the ``[B·per, K]`` view."""
    if per == 1:
        return batch_rows
    return (batch_rows.unsqueeze(1) * per + torch.arange(per, device=batch_rows.device)).reshape(-1)


class MultiTenantEmbedding(nn.Module):
    """``out[b, l] = E_t[ids[b, l]]`` with ``E_t`` tenant ``t``'s table: ``(W + s_t·S_t)`` (rows built on
    lookup, rounded like the materialized table) or its dense table; the base ``W`` for ``-1``.

    Attributes: weight ``[V, H]`` (frozen base), packed/scales/slot as in :class:`SignStack`,
    ``dense_weight_{t}`` ``[V, H]`` for tenants stored dense.
    """

    def __init__(
        self,
        weight: Tensor,
        padding_idx: int | None,
        state: TenantState,
        stack: SignStack,
        dense: dict[int, Tensor],
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx
        self.state = state
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.register_buffer("packed", stack.packed)
        self.register_buffer("scales", stack.scales)
        self.register_buffer("slot", stack.slot)
        self._slots: list[int] = stack.slot.tolist()
        self.dense_tenants = sorted(dense)
        for t in self.dense_tenants:
            if tuple(dense[t].shape) != tuple(weight.shape):
                raise CodecError(f"tenant {t}: dense table {list(dense[t].shape)} does not fit {list(weight.shape)}")
            self.register_buffer(f"dense_weight_{t}", dense[t].detach())

    def forward(self, ids_tok: Tensor) -> Tensor:
        if self.state.ids is not None and ids_tok.shape[0] == 1 and self.state.ids.shape[0] > 1:
            ids_tok = ids_tok.expand(self.state.ids.shape[0], *ids_tok.shape[1:])  # shared positions
        self.state.rows(ids_tok)  # checks the batch size
        out = F.embedding(ids_tok, self.weight, self.padding_idx)
        for t, brows in self.state.groups(ids_tok.device):
            if t in self.dense_tenants:
                out[brows] = F.embedding(ids_tok[brows], getattr(self, f"dense_weight_{t}"), self.padding_idx)
            elif t != BASE and self._slots[t] >= 0:
                i = self._slots[t]
                tok = ids_tok[brows].reshape(-1)
                s = signs.sign_rows(self.packed[i], tok, self.embedding_dim, torch.float32)
                rows = self.weight.index_select(0, tok).to(torch.float32) + self.scales[i] * s
                out[brows] = rows.to(out.dtype).reshape(*ids_tok[brows].shape, self.embedding_dim)
        return out


class MultiTenantModule(nn.Module):
    """Any module (a norm, …) run with each tenant's own tensors on that tenant's rows.

    ``overrides[t]`` maps parameter/buffer names of the wrapped module to tenant ``t``'s tensors
    (the others stay the base's). The module's first argument and its output must be ``[B, ...]``.
    """

    def __init__(self, module: nn.Module, state: TenantState, overrides: dict[int, dict[str, Tensor]]) -> None:
        super().__init__()
        self.inner = module
        self.state = state
        self.tenants = sorted(overrides)
        self._keys: dict[int, list[str]] = {}
        for t in self.tenants:
            self._keys[t] = sorted(overrides[t])
            for key, tensor in overrides[t].items():
                self.register_buffer(f"t{t}_" + key.replace(".", "__"), tensor.detach())

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.state.rows(x)
        out = self.inner(x, *args, **kwargs)
        if not isinstance(out, Tensor) or out.shape[0] != x.shape[0]:
            raise TenantError(f"{type(self.inner).__name__} cannot be run per tenant (its output is not [B, ...])")
        for t, brows in self.state.groups(x.device):
            if t in self._keys:
                params = {k: getattr(self, f"t{t}_" + k.replace(".", "__")) for k in self._keys[t]}
                out[brows] = torch.func.functional_call(self.inner, params, (x[brows], *args), kwargs)
        return out


def install_tenants(model: nn.Module, tenants: Sequence[dict[str, TensorChange]]) -> TenantState:
    """Make ``model`` (holding the base's tensors) serve ``tenants`` row by row.

    Args:
        model: the base model (eval mode).
        tenants: for tenant ``t`` (``0 … T-1``), tensor name → its :class:`TensorChange`; tensors
            not listed are the base's. Conv1D weights are given as stored (``[in, out]``).

    Returns:
        The :class:`TenantState` the new modules read the batch's tenant ids from.

    Raises:
        TenantError: a tensor does not belong to the model, has another shape than the base's, or
            belongs to a module that cannot be made multi-tenant.
    """
    state = TenantState(len(tenants))
    owners = module_owners(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    # module name -> attr -> tenant -> change
    plan: dict[str, dict[str, dict[int, TensorChange]]] = {}
    for t, changes in enumerate(tenants):
        for tname, change in changes.items():
            target = params.get(tname)
            if target is None:
                raise TenantError(f"tenant {t}: tensor {tname!r} is not part of the {type(model).__name__} model")
            own_shape = tuple(change.tensor.shape) if change.tensor is not None else None
            if own_shape is not None and own_shape != tuple(target.shape):
                raise TenantError(
                    f"tenant {t}: tensor {tname!r} has shape {list(own_shape)}, the base {list(target.shape)}"
                )
            for mname, attr in owners.get(id(target), []):
                plan.setdefault(mname, {}).setdefault(attr, {})[t] = change
    stacks: dict[int, SignStack] = {}  # id(base weight) -> its stack, shared by tied owners
    for mname, attrs in plan.items():
        module = model.get_submodule(mname) if mname else model
        set_module(model, mname, _multi_tenant_module(module, attrs, state, mname, stacks))
    logger.info("multi-tenant model: %d tenant(s), %d module(s) made multi-tenant", len(tenants), len(plan))
    return state


def _dense_of(module: nn.Module, attr: str, change: TensorChange, conv: bool) -> Tensor:
    """The tenant's full tensor for ``attr`` (a ``sign1`` change on a non-linear module is decoded)."""
    if change.tensor is not None:
        t = change.tensor.to(getattr(module, attr).dtype)
    else:
        base = getattr(module, attr)
        assert change.packed is not None and change.scale is not None
        s = signs.unpack_rows(change.packed, base.shape[-1], torch.float32)
        t = (base.to(torch.float32) + change.scale * s).to(base.dtype)
    return t.t().contiguous() if conv and attr == "weight" else t


def _multi_tenant_module(
    module: nn.Module,
    attrs: dict[str, dict[int, TensorChange]],
    state: TenantState,
    mname: str,
    stacks: dict[int, SignStack],
) -> nn.Module:
    conv = is_conv1d(module)
    linear = isinstance(module, nn.Linear) or conv
    embedding = isinstance(module, nn.Embedding)
    if (linear and set(attrs) <= {"weight", "bias"}) or (embedding and set(attrs) == {"weight"}):
        weight = module.weight.detach().t().contiguous() if conv else module.weight
        n, k = weight.shape
        sign: dict[int, tuple[Tensor, float]] = {}
        dense: dict[int, Tensor] = {}
        for t, ch in attrs.get("weight", {}).items():
            if ch.is_sign1:
                assert ch.packed is not None and ch.scale is not None
                sign[t] = (transpose_packed(ch.packed, k, n) if conv else ch.packed, ch.scale)
            else:
                dense[t] = _dense_of(module, "weight", ch, conv)
        stack = None if conv else stacks.get(id(module.weight))
        if stack is None:
            stack = SignStack.build(sign, state.n_tenants, n, k, weight.device)
            if not conv:
                stacks[id(module.weight)] = stack
        if embedding:
            return MultiTenantEmbedding(module.weight, module.padding_idx, state, stack, dense)
        biases = {t: _dense_of(module, "bias", ch, False) for t, ch in attrs.get("bias", {}).items()}
        return MultiTenantLinear(weight, module.bias, state, stack, dense, biases)
    overrides: dict[int, dict[str, Tensor]] = {}
    for attr, per in attrs.items():
        for t, ch in per.items():
            overrides.setdefault(t, {})[attr] = _dense_of(module, attr, ch, False)
    return MultiTenantModule(module, state, overrides)


class TenantModel:
    """A transformers model serving several tenants: ``names[t]`` is tenant ``t``'s name.

    Use :meth:`use` to set the tenant of every batch row (``-1`` = base) around a forward pass or a
    ``generate`` call.
    """

    def __init__(self, model: nn.Module, state: TenantState, names: Sequence[str]) -> None:
        self.model = model
        self.state = state
        self.names = list(names)

    @contextmanager
    def use(self, ids: Sequence[int] | Tensor) -> Iterator[None]:
        """Set the batch rows' tenant ids (int ``[B]`` in ``[-1, T)``) for the enclosed calls."""
        t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if t.numel() and (int(t.min()) < BASE or int(t.max()) >= self.state.n_tenants):
            raise TenantError(f"tenant ids must be in [-1, {self.state.n_tenants}), got {t.tolist()}")
        device = next(self.model.parameters()).device
        previous = self.state.ids
        self.state.set(t.to(device))
        try:
            yield
        finally:
            self.state.set(previous)

    def __call__(self, input_ids: Tensor, tenants: Sequence[int] | Tensor, **kwargs: Any) -> Any:
        """Forward pass with row ``b`` of ``input_ids`` using tenant ``tenants[b]``."""
        with self.use(tenants):
            return self.model(input_ids, **kwargs)

    def generate(self, input_ids: Tensor, tenants: Sequence[int] | Tensor, **kwargs: Any) -> Tensor:
        """``model.generate`` with row ``b`` using tenant ``tenants[b]`` (rows are repeated for
        ``num_beams``/``num_return_sequences`` the way transformers expands the batch)."""
        ids = torch.as_tensor(tenants, dtype=torch.int64).reshape(-1)
        beams = int(kwargs.get("num_beams") or 1)
        expand = beams if beams > 1 else int(kwargs.get("num_return_sequences") or 1)
        with self.use(ids.repeat_interleave(expand)):
            return self.model.generate(input_ids, **kwargs)
