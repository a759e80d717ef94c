"""The ``planes`` codec's differentiable product (calibration): ``y = Σᵢ (x·Sᵢᵀ) ⊙ sᵢ`` with gradients
for ``x`` and every plane's scales ``sᵢ``, nothing ``[N, K]`` built or saved.

``sᵢ`` is fp32 ``[1, 1]`` (one scale per matrix), ``[N, 1]`` (per row) or ``[N, C]`` (per row and
group of ``G`` columns, ``C = ceil(K/G)``; a group's partial product ``x[:, g]·Sᵢ[:, g]ᵀ`` is scaled
by ``sᵢ[:, g]``). Backward:

* ``grad_x = Σᵢ (g ⊙ sᵢ)·Sᵢ`` (per group for group scales), from the chunked ``g·S`` of
  :mod:`deltahub.codec.signs`;
* ``grad_sᵢ = Σ_rows g ⊙ zᵢ`` with ``zᵢ = x·Sᵢᵀ`` ``[M, N]``: saved by the forward for per-matrix and
  per-row scales (``M·N`` fp32 per plane, the size of the layer's output), recomputed per group for
  group scales (``M·N·C`` would be too much to keep).

The forward is the same computation as :meth:`deltahub.codec.planes.PlanesOperator.matmul`'s torch
path (same order of operations), so outputs with and without gradients agree. Imports only torch
and :mod:`deltahub.codec`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import signs
from .packing import WORD_BITS

__all__ = ["planes_delta"]


def _group_cols(j: int, group: int, k: int) -> tuple[int, int]:
    return j * group, min(k, (j + 1) * group)


class _PlanesDelta(torch.autograd.Function):
    """``y = Σᵢ (x·Sᵢᵀ) ⊙ sᵢ``; inputs ``(x2d, k, group, n_planes, *packed, *scales)``."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, k: int, group: int | None, n: int, *planes: Tensor) -> Tensor:
        packed, scales = list(planes[:n]), list(planes[n:])
        y = torch.zeros((x2d.shape[0], packed[0].shape[0]), dtype=torch.float32, device=x2d.device)
        saved_z: list[Tensor] = []
        for p, s in zip(packed, scales):
            if s.shape[1] == 1:
                z = signs.sign_matmul_torch(x2d, p, k).to(torch.float32)
                y += z * s.reshape(1, -1) if s.shape[0] > 1 else z * s.reshape(())
                saved_z.append(z)
                continue
            g = int(group)  # type: ignore[arg-type]
            for j in range(s.shape[1]):
                c0, c1 = _group_cols(j, g, k)
                z = signs.sign_matmul_torch(x2d[:, c0:c1], p[:, c0 // WORD_BITS : -(-c1 // WORD_BITS)], c1 - c0)
                y += z.to(torch.float32) * s[:, j].reshape(1, -1)
        ctx.k, ctx.group, ctx.n = k, group, n
        ctx.save_for_backward(x2d, *packed, *scales, *saved_z)
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        k, group, n = ctx.k, ctx.group, ctx.n
        saved = ctx.saved_tensors
        x2d, packed, scales, zs = saved[0], list(saved[1 : 1 + n]), list(saved[1 + n : 1 + 2 * n]), list(saved[1 + 2 * n :])
        need_x = ctx.needs_input_grad[0]
        need_s = ctx.needs_input_grad[4 + n :]
        g32 = grad.to(torch.float32)
        grad_x = torch.zeros(x2d.shape, dtype=torch.float32, device=x2d.device) if need_x else None
        grad_s: list[Tensor | None] = []
        z_iter = iter(zs)
        for i, (p, s) in enumerate(zip(packed, scales)):
            if s.shape[1] == 1:
                z = next(z_iter)
                if need_x:
                    gs = g32 * s.reshape(1, -1) if s.shape[0] > 1 else g32 * s.reshape(())
                    grad_x += signs.sign_matmul_t_torch(gs, p, k).to(torch.float32)
                if need_s[i]:
                    gz = g32 * z
                    grad_s.append((gz.sum() if s.shape[0] == 1 else gz.sum(dim=0)).reshape(s.shape))
                else:
                    grad_s.append(None)
                continue
            gsi = torch.zeros_like(s) if need_s[i] else None
            gw = int(group)  # type: ignore[arg-type]
            for j in range(s.shape[1]):
                c0, c1 = _group_cols(j, gw, k)
                pj = p[:, c0 // WORD_BITS : -(-c1 // WORD_BITS)]
                if need_x:
                    grad_x[:, c0:c1] += signs.sign_matmul_t_torch(g32 * s[:, j].reshape(1, -1), pj, c1 - c0).to(torch.float32)  # type: ignore[index]
                if gsi is not None:
                    z = signs.sign_matmul_torch(x2d[:, c0:c1], pj, c1 - c0).to(torch.float32)
                    gsi[:, j] = (g32 * z).sum(dim=0)
            grad_s.append(gsi)
        gx = grad_x.to(x2d.dtype) if grad_x is not None else None
        return (gx, None, None, None, *([None] * n), *grad_s)


def planes_delta(x2d: Tensor, packed: list[Tensor], scales: list[Tensor], k: int, group: int | None) -> Tensor:
    """``Σᵢ (x·Sᵢᵀ) ⊙ sᵢ`` in ``x``'s dtype, differentiable in ``x`` and the scales.

    Args:
        x2d: ``[M, K]`` float. packed: per plane int32 ``[N, ceil(K/32)]``. scales: per plane fp32
            ``[1, 1]``, ``[N, 1]`` or ``[N, ceil(K/group)]``. k: ``K``. group: columns per scale group
            (group scales only).

    Returns:
        ``[M, N]`` in ``x2d.dtype``.
    """
    return _PlanesDelta.apply(x2d, k, group, len(packed), *packed, *scales)
