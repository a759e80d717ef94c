"""``torch.ops.deltahub.planes_delta``: the delta term of a deltahub Linear as one custom op.

``planes_delta(x, packed, scales, k, group)`` = ``Σᵢ (x·Sᵢᵀ) ⊙ sᵢ`` in fp32 ``[M, N]`` for

* ``x``: ``[M, K]`` float16 / bfloat16 / float32;
* ``packed``: int32 ``[P, N, ceil(K/32)]``, sign planes (layout v1);
* ``scales``: fp32 ``[P, N, C]`` (C = 1: per row; C = ceil(K/group): per row and group);
* ``k``: K; ``group``: columns per scale group, 0 when C = 1.

On a CUDA tensor with Triton it runs :func:`deltahub.kernels.planes_matmul` (no base weight: the
engine's own GEMM does ``x·Wᵀ``); elsewhere the torch path of :mod:`deltahub.codec.planes_apply`.
As a registered custom op with a fake (meta) implementation, ``torch.compile`` and CUDA graph
capture treat it as one opaque node instead of tracing into Triton launches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltahub.codec.planes_apply import planes_matmul_torch
from deltahub.kernels import triton_can_run

__all__ = ["planes_delta", "planes_delta_ref", "multi_tenant_planes_delta", "multi_tenant_planes_delta_ref"]


def planes_delta_ref(x: Tensor, packed: Tensor, scales: Tensor, k: int, group: int) -> Tensor:
    """The torch path (any device): fp32 ``[M, N]``."""
    return planes_matmul_torch(x, packed, scales, k, group or None)


@torch.library.custom_op("deltahub::planes_delta", mutates_args=())
def planes_delta(x: Tensor, packed: Tensor, scales: Tensor, k: int, group: int) -> Tensor:
    if x.is_cuda and triton_can_run(x, packed):
        from deltahub import kernels

        return kernels.planes_matmul(x, packed, scales, None, None, group_size=group or None).to(torch.float32)
    return planes_delta_ref(x, packed, scales, k, group)


@planes_delta.register_fake
def _(x: Tensor, packed: Tensor, scales: Tensor, k: int, group: int) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[1]), dtype=torch.float32)


def _live(slot: Tensor, active: Tensor) -> Tensor:
    """``slot`` with the rows of inactive slots (no deltahub delta: empty, a PEFT adapter or vLLM's
    warm-up dummy) set to -1: a tensor op, no host sync."""
    return torch.where((slot >= 0) & active[slot.clamp(min=0)], slot, torch.full_like(slot, -1))


def multi_tenant_planes_delta_ref(x: Tensor, packed: Tensor, scales: Tensor, slot: Tensor, active: Tensor, k: int,
                                  group: int) -> Tensor:
    """The torch path: rows grouped by live slot, each group through :func:`planes_delta_ref`."""
    slot = _live(slot, active)
    out = torch.zeros((x.shape[0], packed.shape[2]), dtype=torch.float32, device=x.device)
    for s in torch.unique(slot).tolist():
        if s < 0:
            continue
        rows = (slot == s).nonzero().flatten()
        out.index_copy_(0, rows, planes_delta_ref(x.index_select(0, rows), packed[s], scales[s], k, group))
    return out


@torch.library.custom_op("deltahub::multi_tenant_planes_delta", mutates_args=())
def multi_tenant_planes_delta(x: Tensor, packed: Tensor, scales: Tensor, slot: Tensor, active: Tensor, k: int,
                              group: int) -> Tensor:
    """``Σᵢ (x[m]·S_{t,i}ᵀ) ⊙ s_{t,i}`` with ``t = slot[m]`` (``-1`` or an inactive slot: zero), fp32 ``[M, N]``.

    Args:
        x: ``[M, K]`` float. packed: int32 ``[T, P, N, ceil(K/32)]``. scales: fp32 ``[T, P, N, C]``.
        slot: int ``[M]`` in ``[-1, T)``. active: bool ``[T]``, the slots holding a deltahub delta.
        k: K. group: columns per scale group, 0 when C = 1.
    """
    if x.is_cuda and triton_can_run(x, packed):
        from deltahub import kernels

        return kernels.multi_tenant_planes_matmul(x, None, packed, scales, _live(slot, active), None,
                                                  group_size=group or None, validate=False).to(torch.float32)
    return multi_tenant_planes_delta_ref(x, packed, scales, slot, active, k, group)


@multi_tenant_planes_delta.register_fake
def _(x: Tensor, packed: Tensor, scales: Tensor, slot: Tensor, active: Tensor, k: int, group: int) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[2]), dtype=torch.float32)
