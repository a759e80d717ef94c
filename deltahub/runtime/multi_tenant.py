"""Multi-tenant serving: one base model, several deltas, every row of a batch using its own.

A model is loaded once with the base's tensors; :func:`install_tenants` then replaces each module
whose tensors differ in at least one tenant:

* ``Linear`` / GPT-2 ``Conv1D`` → :class:`MultiTenantLinear`: the shared base GEMM for all rows, plus
  per row ``x[r]·Δ_tᵀ`` from the tenants' deltas, stacked per codec by the codec's own
  :meth:`~deltahub.codec.DeltaOperator.stack` (``sign1``: packed signs ``[T, N, W]`` and scales,
  :func:`deltahub.kernels.multi_tenant_sign_matmul` on a GPU; on the CPU a memory-bounded torch path
  grouping rows by tenant; other codecs: each tenant's rows through its operator). Per-tenant biases
  are gathered per row; a tenant whose weight is stored dense has its rows computed with that weight.
* ``Embedding`` → :class:`MultiTenantEmbedding`: base rows plus the tenant's delta rows (exactly
  the materialized ``(W.float() + Δ).to(dtype)`` row), or the tenant's dense table.
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

from deltahub.codec import DeltaOperator, TenantDeltas
from deltahub.codec.codecs import CodecError, HintedError
from deltahub.runtime.backend import Backend, choose_backend
from deltahub.runtime.patch import is_conv1d, module_owners, set_module

__all__ = [
    "TenantError",
    "TenantState",
    "TensorChange",
    "build_stacks",
    "MultiTenantLinear",
    "MultiTenantEmbedding",
    "MultiTenantModule",
    "install_tenants",
    "uninstall_tenants",
    "TenantModel",
]

logger = logging.getLogger(__name__)

BASE = -1
"""The tenant id of rows that use the base model."""


class TenantError(HintedError, ValueError):
    """The batch's tenant ids are missing, out of range, or do not match the input's rows."""


@dataclass
class TensorChange:
    """How one tensor of one tenant differs from the base: a delta (``op``, its codec's operator of
    the stored ``[R, C]`` tensor) or ``tensor`` (the tenant's own, stored dense)."""

    op: DeltaOperator | None = None
    tensor: Tensor | None = None

    @property
    def is_delta(self) -> bool:
        return self.op is not None


@dataclass
class TenantState:
    """The tenant id of every batch row (int64 ``[B]``), shared by all multi-tenant modules of a model."""

    n_tenants: int
    ids: Tensor | None = None
    _groups: dict[torch.device, list[tuple[int, Tensor]]] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    """module name -> the module :func:`install_tenants` replaced (:func:`uninstall_tenants` puts it back)."""

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


def build_stacks(ops: dict[int, DeltaOperator], n_tenants: int, n: int, k: int) -> list[TenantDeltas]:
    """The tenants' operators of one ``[N, K]`` weight, stacked per operator type (per codec)."""
    by_type: dict[type, dict[int, DeltaOperator]] = {}
    for t in sorted(ops):
        op = ops[t]
        if (op.out_features, op.in_features) != (n, k):
            raise CodecError(f"tenant {t}: a delta of shape [{op.out_features}, {op.in_features}] does not fit [{n}, {k}]")
        by_type.setdefault(type(op), {})[t] = op
    return [cls.stack(group, n_tenants) for cls, group in by_type.items()]


def _batch_of_rows(ids: Tensor, x: Tensor) -> Tensor:
    """The tenant of every row of ``x.reshape(-1, x.shape[-1])`` (``x`` ``[B, ..., K]``)."""
    per = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    return ids.to(x.device).repeat_interleave(per)


class MultiTenantLinear(nn.Module):
    """``y[r] = x[r]·Wᵀ + x[r]·Δ_tᵀ + b_t`` for ``t`` = the tenant of row ``r``.

    Attributes:
        weight: frozen shared base ``[N, K]``.
        stacks: the tenants' deltas of this weight, one :class:`~deltahub.codec.TenantDeltas` per
            codec present (``sign1``: packed ``[T_s, N, ceil(K/32)]``, scales ``[T_s]``, slot ``[T]``).
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
        stacks: list[TenantDeltas],
        dense: dict[int, Tensor],
        biases: dict[int, Tensor],
    ) -> None:
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = int(k), int(n)
        self.state = state
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.stacks = nn.ModuleList(stacks)
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
        y = None
        if len(self.stacks) == 1 and choose_backend(x.device) is Backend.TRITON and not torch.is_grad_enabled():
            from deltahub import kernels

            y = self.stacks[0].kernel_linear(kernels, x2d, w, row_tenant)
        if y is None:
            y = F.linear(x2d, w)
            if len(self.stacks):
                groups = [(t, _expand(brows, per)) for t, brows in self.state.groups(x.device) if t != BASE]
                for stack in self.stacks:
                    stack.add_matmul(y, x2d, groups)
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
            f"delta_tenants={sum(len(st.tenants) for st in self.stacks)}, dense_tenants={len(self.dense_tenants)}, "
            f"per_tenant_bias={self.bias_stack is not None}"
        )


def _expand(batch_rows: Tensor, per: int) -> Tensor:
    """Batch row indices → row indices of the ``[B·per, K]`` view."""
    if per == 1:
        return batch_rows
    return (batch_rows.unsqueeze(1) * per + torch.arange(per, device=batch_rows.device)).reshape(-1)


class MultiTenantEmbedding(nn.Module):
    """``out[b, l] = E_t[ids[b, l]]`` with ``E_t`` tenant ``t``'s table: ``(W.float() + Δ_t).to(dtype)``
    (rows built on lookup, rounded like the materialized table) or its dense table; the base ``W``
    for ``-1``.

    Attributes: weight ``[V, H]`` (frozen base), stacks as in :class:`MultiTenantLinear`,
    ``dense_weight_{t}`` ``[V, H]`` for tenants stored dense.
    """

    def __init__(
        self,
        weight: Tensor,
        padding_idx: int | None,
        state: TenantState,
        stacks: list[TenantDeltas],
        dense: dict[int, Tensor],
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx
        self.state = state
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.stacks = nn.ModuleList(stacks)
        self._stack_of = {t: i for i, st in enumerate(stacks) for t in st.tenants}
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
            elif t != BASE and t in self._stack_of:
                tok = ids_tok[brows].reshape(-1)
                delta = self.stacks[self._stack_of[t]].rows(t, tok)
                rows = self.weight.index_select(0, tok).to(torch.float32) + delta
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
    stacks: dict[int, list[TenantDeltas]] = {}  # id(base weight) -> its stacks, shared by tied owners
    for mname, attrs in plan.items():
        module = model.get_submodule(mname) if mname else model
        try:
            if not mname:
                raise TenantError("the model itself cannot be made multi-tenant (only its submodules)")
            new = _multi_tenant_module(module, attrs, state, mname, stacks)
        except Exception:
            uninstall_tenants(model, state)  # all or nothing: the modules replaced so far go back
            raise
        state.originals[mname] = module
        set_module(model, mname, new)
    logger.info("multi-tenant model: %d tenant(s), %d module(s) made multi-tenant", len(tenants), len(plan))
    return state


def uninstall_tenants(model: nn.Module, state: TenantState) -> None:
    """Put back every module :func:`install_tenants` replaced (the base model again; the tenants'
    deltas are released with the multi-tenant modules)."""
    for mname, module in state.originals.items():
        set_module(model, mname, module)
    state.originals = {}


def _dense_of(module: nn.Module, attr: str, change: TensorChange, conv: bool) -> Tensor:
    """The tenant's full tensor for ``attr`` (a delta on a module that cannot apply it is decoded:
    ``(W.float() + Δ).to(dtype)``, like materialize)."""
    if change.tensor is not None:
        t = change.tensor.to(getattr(module, attr).dtype)
    else:
        base = getattr(module, attr)
        assert change.op is not None
        t = (base.to(torch.float32) + change.op.dense().to(base.device)).to(base.dtype)
    return t.t().contiguous() if conv and attr == "weight" else t


def _multi_tenant_module(
    module: nn.Module,
    attrs: dict[str, dict[int, TensorChange]],
    state: TenantState,
    mname: str,
    stacks: dict[int, list[TenantDeltas]],
) -> nn.Module:
    conv = is_conv1d(module)
    linear = isinstance(module, nn.Linear) or conv
    embedding = isinstance(module, nn.Embedding)
    if (linear and set(attrs) <= {"weight", "bias"}) or (embedding and set(attrs) == {"weight"}):
        weight = module.weight.detach().t().contiguous() if conv else module.weight
        n, k = weight.shape
        ops: dict[int, DeltaOperator] = {}
        dense: dict[int, Tensor] = {}
        for t, ch in attrs.get("weight", {}).items():
            if ch.op is not None:
                ops[t] = (ch.op.transposed() if conv else ch.op).to(weight.device)
            else:
                dense[t] = _dense_of(module, "weight", ch, conv)
        stack = None if conv else stacks.get(id(module.weight))
        if stack is None:
            stack = build_stacks(ops, state.n_tenants, n, k) if ops else []
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

    def replace(self, names: Sequence[str], tenants: Sequence[dict[str, TensorChange]]) -> None:
        """Serve ``tenants`` (named ``names``) instead of the current ones: the modules are put back
        to the base's and made multi-tenant again over the new set (``names[t]`` is tenant ``t`` now;
        the caller re-maps rows in flight). If installing fails, the model is left serving the base
        alone (no tenants) and the error is raised."""
        if len(names) != len(tenants):
            raise TenantError(f"{len(names)} names for {len(tenants)} tenants")
        device = next(self.model.parameters()).device
        uninstall_tenants(self.model, self.state)
        self.state, self.names = TenantState(0), []
        state = install_tenants(self.model, list(tenants))
        self.model.to(device)
        self.state, self.names = state, list(names)

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
