"""The ``planes`` codec's inference apply on the kernels: one delta, or many tenants of one weight.

A ``planes`` delta is ``Δ = Σᵢ sᵢ ⊙ Sᵢ`` with ``P`` sign planes ``Sᵢ`` (int32 ``[N, ceil(K/32)]``,
layout v1) and fp32 scales ``sᵢ`` ``[R, C]`` (``[1, 1]`` per matrix, ``[N, 1]`` per row,
``[N, ceil(K/G)]`` per row and group of ``G`` columns).

* :func:`planes_kernel_linear` — :meth:`PlanesOperator.kernel_linear`: one fused
  ``kernels.planes_matmul`` call ``x·(W + Δ)ᵀ + b`` (a one-plane per-matrix delta takes sign1's
  ``kernels.sign_matmul``). The kernel reads the planes as one ``[P, N, W]`` tensor: a view of the
  operator's buffers when they lie evenly spaced in one storage; otherwise they are copied into one
  stack once and the operator's buffers become views of it (no second copy is kept).
* :class:`PlanesStack` — the deltas of several tenants with the same ``P`` and scale layout:
  ``packed [T_s, P, N, W]``, ``scales [T_s, P, R, C]``; ``kernels.multi_tenant_planes_matmul`` on
  a GPU, rows grouped by tenant on the torch path.
* :class:`PlanesStacks` — tenants with different ``P`` or scale layouts (e.g. one pulled with
  ``--bits 1``): one :class:`PlanesStack` per layout; on a GPU the first runs with the base
  weight and the others add their delta-only kernel results (one extra kernel per extra layout).

Imports only torch and deltahub.codec (no kernel: the runtime hands the module in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import signs
from .base import PackedTenantDeltas, TenantDeltas
from .codecs import CodecError
from .packing import WORD_BITS

__all__ = [
    "PlanesStack",
    "PlanesStacks",
    "planes_kernel_linear",
    "planes_matmul_torch",
    "stack_planes",
    "plane_view",
]


class _PlanesLike(Protocol):
    """What this module reads of a :class:`~deltahub.codec.planes.PlanesOperator`."""

    k: int
    group: int | None
    in_features: int
    out_features: int

    def _plane(self, i: int) -> tuple[Tensor, Tensor]: ...


def expand_scales(scales: Tensor, k: int, group: int | None) -> Tensor:
    """Scales ``[R, C]`` → broadcastable to ``[R, k]`` (``C > 1``: groups of ``group`` columns)."""
    if scales.shape[1] == 1:
        return scales
    assert group is not None
    return scales.repeat_interleave(group, dim=1)[:, :k]


def planes_matmul_torch(x2d: Tensor, packed: Sequence[Tensor] | Tensor, scales: Sequence[Tensor] | Tensor, k: int,
                        group: int | None) -> Tensor:
    """``Σᵢ (x·Sᵢᵀ) ⊙ sᵢ`` on the torch path (memory-bounded: :mod:`deltahub.codec.signs`; per-group
    scales apply to each group's partial product).

    Args:
        x2d: ``[M, K]`` float. packed: P planes int32 ``[N, ceil(K/32)]`` (a list or ``[P, N, W]``).
        scales: P fp32 ``[R, C]`` (a list or ``[P, R, C]``). k: ``K``. group: G, or None.

    Returns:
        fp32 ``[M, N]``.
    """
    y = torch.zeros((x2d.shape[0], packed[0].shape[0]), dtype=torch.float32, device=x2d.device)
    for p, s in zip(packed, scales, strict=True):
        s = s.detach().to(torch.float32)
        if s.shape[1] == 1:
            z = signs.sign_matmul_torch(x2d, p, k).to(torch.float32)
            y += z * s.reshape(1, -1) if s.shape[0] > 1 else z * s.reshape(())
            continue
        g = int(group)  # type: ignore[arg-type]
        for j in range(s.shape[1]):
            c0, c1 = j * g, min(k, (j + 1) * g)
            z = signs.sign_matmul_torch(x2d[:, c0:c1], p[:, c0 // WORD_BITS : -(-c1 // WORD_BITS)], c1 - c0)
            y += z.to(torch.float32) * s[:, j].reshape(1, -1)
    return y


def plane_view(planes: Sequence[Tensor]) -> Tensor | None:
    """The planes as one ``[P, N, W]`` view (no copy) when they are equally shaped and strided
    slices of one storage at evenly spaced offsets (e.g. the rows of an earlier stack), else None."""
    first = planes[0]
    if first.dim() != 2:
        return None
    if len(planes) == 1:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    step = planes[1].storage_offset() - first.storage_offset()
    for i, p in enumerate(planes):
        if (p.shape != first.shape or p.stride() != first.stride() or p.dtype != first.dtype
                or p.device != first.device or p.untyped_storage().data_ptr() != storage
                or p.storage_offset() != first.storage_offset() + i * step):
            return None
    return first.as_strided((len(planes), *first.shape), (step, *first.stride()), first.storage_offset())


def _packed_planes(op: _PlanesLike) -> Tensor:
    """The operator's planes as int32 ``[P, N, W]``: a view of its buffers, built once (and the
    buffers re-pointed into it) when they are separate tensors."""
    planes = [op._plane(i)[0] for i in range(op.k)]
    view = plane_view(planes)
    if view is not None:
        return view
    stacked = torch.stack([p.detach() for p in planes])
    for i in range(op.k):  # the buffers become views of the stack: the planes are held once
        setattr(op, f"packed{i}", stacked[i])
    return stacked


def _stacked_scales(op: _PlanesLike) -> Tensor:
    """The operator's scales as fp32 ``[P, R, C]``, cached until a scale tensor moves or changes
    (trained in place: its version counter moves)."""
    scales = [op._plane(i)[1] for i in range(op.k)]
    key = tuple((s.data_ptr(), s._version, s.device) for s in scales)
    hit = getattr(op, "_kernel_scales", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    stacked = torch.stack([s.detach().to(torch.float32) for s in scales])
    object.__setattr__(op, "_kernel_scales", (key, stacked))  # a cache, not module state
    return stacked


def planes_kernel_linear(op: _PlanesLike, kernels: Any, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x·(W + Δ)ᵀ + bias`` in one kernel call (see the module docstring).

    Args:
        op: the planes operator. kernels: the ``deltahub.kernels`` module. x2d: ``[M, K]`` float.
        weight: ``[N, K]`` base. bias: ``[N]`` or None.

    Returns:
        ``[M, N]`` in ``x2d.dtype``.
    """
    xw = x2d if x2d.dtype == weight.dtype else x2d.to(weight.dtype)  # never copy W
    if op.k == 1:
        packed0, scale0 = op._plane(0)
        if scale0.numel() == 1 and tuple(scale0.shape) == (1, 1):  # sign1's layout: its kernel
            return kernels.sign_matmul(xw, packed0, scale0.detach().reshape(()), weight, bias).to(x2d.dtype)
    packed = _packed_planes(op)
    scales = _stacked_scales(op)
    return kernels.planes_matmul(xw, packed, scales, weight, bias, group_size=op.group).to(x2d.dtype)


def _layout(op: _PlanesLike) -> tuple[int, int, int, int | None]:
    """``(P, R, C, G)``: the tenants of one :class:`PlanesStack` share it."""
    s = op._plane(0)[1]
    return op.k, int(s.shape[0]), int(s.shape[1]), op.group if s.shape[1] > 1 else None


def stack_planes(ops: Mapping[int, _PlanesLike], n_tenants: int) -> TenantDeltas:
    """:meth:`PlanesOperator.stack`: one :class:`PlanesStack` when all tenants share ``P`` and the
    scale layout, else a :class:`PlanesStacks` of one stack per layout."""
    by_layout: dict[tuple[int, int, int, int | None], dict[int, _PlanesLike]] = {}
    for t in sorted(ops):
        by_layout.setdefault(_layout(ops[t]), {})[t] = ops[t]
    stacks = [PlanesStack.build(group, n_tenants) for group in by_layout.values()]
    return stacks[0] if len(stacks) == 1 else PlanesStacks(stacks)


class PlanesStack(PackedTenantDeltas):
    """The ``planes`` deltas of one weight ``[N, K]`` for several tenants with one layout.

    Attributes:
        packed: int32 ``[T_s, P, N, ceil(K/32)]`` (the tenants held, in id order).
        scales: fp32 ``[T_s, P, R, C]`` (R = 1 or N; C = 1 or ``ceil(K/group)``).
        slot: int64 ``[T]``: tenant → index into ``packed``, ``-1`` for tenants not held.
        group: columns per scale group (per-group scales), else None.
    """

    def __init__(self, packed: Tensor, scales: Tensor, slot: Tensor, k: int, group: int | None) -> None:
        super().__init__(packed, scales, slot, k)
        self.group = group

    @classmethod
    def build(cls, ops: Mapping[int, _PlanesLike], n_tenants: int) -> PlanesStack:
        tenants = sorted(ops)
        first = ops[tenants[0]]
        planes, r, c, group = _layout(first)
        n, k = first.out_features, first.in_features
        device = first._plane(0)[0].device
        packed, scales = [], []
        for t in tenants:
            op = ops[t]
            if _layout(op) != (planes, r, c, group) or (op.out_features, op.in_features) != (n, k):
                raise CodecError(f"tenant {t}: another planes layout than tenant {tenants[0]}'s")
            for i in range(planes):
                p, s = op._plane(i)
                packed.append(p.detach().to(device))
                scales.append(s.detach().to(device=device, dtype=torch.float32))
        slot = cls.slots(tenants, n_tenants)
        stacked = torch.stack(packed).reshape(len(tenants), planes, *packed[0].shape)
        stacked_scales = torch.stack(scales).reshape(len(tenants), planes, r, c)
        return cls(stacked, stacked_scales, slot.to(device), k, group)

    def add_matmul(self, y: Tensor, x2d: Tensor, groups: list[tuple[int, Tensor]]) -> None:
        for t, rows in groups:
            if t < 0 or self._slots[t] < 0 or rows.numel() == 0:
                continue
            s = self._slots[t]
            z = planes_matmul_torch(x2d.index_select(0, rows), self.packed[s], self.scales[s], self.in_features, self.group)
            y.index_add_(0, rows, z.to(y.dtype))

    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor | None, row_tenant: Tensor) -> Tensor | None:
        ids = torch.where(row_tenant >= 0, self.slot[row_tenant.clamp(min=0)], -1)
        if self.packed.shape[1] == 1 and self.scales.shape[2:] == (1, 1):  # sign1's layout: its kernel
            return kernels.multi_tenant_sign_matmul(x2d, weight, self.packed[:, 0], self.scales.reshape(-1), ids,
                                                    validate=False)
        return kernels.multi_tenant_planes_matmul(x2d, weight, self.packed, self.scales, ids, group_size=self.group,
                                                  validate=False)

    def rows(self, tenant: int, index: Tensor) -> Tensor:
        i = self._slots[tenant]
        out = torch.zeros((index.numel(), self.in_features), dtype=torch.float32, device=index.device)
        for p, s in zip(self.packed[i], self.scales[i]):
            s_rows = s if s.shape[0] == 1 else s.index_select(0, index)
            out += expand_scales(s_rows, self.in_features, self.group) * signs.sign_rows(
                p, index, self.in_features, torch.float32
            )
        return out

    def extra_repr(self) -> str:
        t, p, r, c = self.scales.shape
        return f"planes tenants={t}, planes={p}, scales=[{r}, {c}]" + (f", group={self.group}" if self.group else "")


class PlanesStacks(TenantDeltas):
    """Tenants of one weight whose ``planes`` layouts differ: one :class:`PlanesStack` per layout."""

    def __init__(self, stacks: list[PlanesStack]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(stacks)
        self._of = {t: i for i, st in enumerate(stacks) for t in st.tenants}
        self.tenants = sorted(self._of)

    def add_matmul(self, y: Tensor, x2d: Tensor, groups: list[tuple[int, Tensor]]) -> None:
        for st in self.parts:
            st.add_matmul(y, x2d, groups)

    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor | None, row_tenant: Tensor) -> Tensor | None:
        y = None
        for st in self.parts:  # the base once (first stack), every other layout's deltas added
            part = st.kernel_linear(kernels, x2d, weight if y is None else None, row_tenant)
            y = part if y is None else y + part
        return y

    def rows(self, tenant: int, index: Tensor) -> Tensor:
        return self.parts[self._of[tenant]].rows(tenant, index)

    def extra_repr(self) -> str:
        return f"planes layouts={len(self.parts)}, tenants={len(self.tenants)}"
