"""Plain-torch references of the kernels, with the same signatures.

They run on any device, compute in fp32 and round once to the output dtype. They unpack whole sign
matrices (memory ~ 4 bytes x N x K per delta): they define the results the Triton kernels must
match; they are not the memory-bounded CPU path (that is ``deltahub.runtime``'s).
"""

from __future__ import annotations

import torch

from .checks import (
    check_apply_delta,
    check_multi_tenant,
    check_multi_tenant_planes,
    check_planes_matmul,
    check_sign_matmul,
    check_tenant_ids,
)
from .layout import unpack_signs_dense

__all__ = [
    "sign_matmul_ref",
    "multi_tenant_sign_matmul_ref",
    "apply_delta_ref",
    "planes_matmul_ref",
    "multi_tenant_planes_matmul_ref",
]


def _scale_f32(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The scale as a 0-d fp32 tensor on ``device``."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(scale), dtype=torch.float32, device=device)


def sign_matmul_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + scale·(x·Sᵀ) (+ bias)``, in fp32, rounded once to ``x.dtype``.

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        packed: ``int32`` ``[N, ceil(K/32)]``, the signs ``S`` (layout v1).
        scale: python number or one-element float tensor (fp32).
        weight: ``[N, K]`` in ``x.dtype``, or None for the delta term alone.
        bias: ``[N]`` floating, or None.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    _, _, k = check_sign_matmul(x, packed, scale, weight, bias)
    xf = x.float()
    y = _scale_f32(scale, x.device) * (xf @ unpack_signs_dense(packed, k).T)
    if weight is not None:
        y = xf @ weight.float().T + y
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def multi_tenant_sign_matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """``y[m] = x[m]·Wᵀ + scales[t]·(x[m]·S_tᵀ) (+ bias)`` with ``t = tenant[m]`` (``-1``: base only).

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        weight: ``[N, K]`` shared base in ``x.dtype``, or None.
        packed: ``int32`` ``[T, N, ceil(K/32)]``, a stack of T deltas' signs.
        scales: float ``[T]`` (fp32), one per stacked delta.
        tenant: ``int32``/``int64`` ``[M]``, values in ``[-1, T)``.
        bias: ``[N]`` floating, or None.
        validate: check the tenant id values (always done here; kept for signature parity).

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    m, n, k, t = check_multi_tenant(x, weight, packed, scales, tenant, bias)
    check_tenant_ids(tenant, t)
    xf = x.float()
    y = xf @ weight.float().T if weight is not None else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for tid in torch.unique(tenant).tolist():
        if tid < 0:
            continue
        rows = tenant == tid
        signs = unpack_signs_dense(packed[tid], k)
        y[rows] = y[rows] + scales[tid].float() * (xf[rows] @ signs.T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def apply_delta_ref(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W + scale·S`` computed in fp32 and rounded once (exactly deltahub's sign1 reconstruction).

    Args:
        weight: ``[N, K]`` float16 / bfloat16 / float32 base weight.
        packed: ``int32`` ``[N, ceil(K/32)]``.
        scale: python number or one-element float tensor (fp32).
        out: optional ``[N, K]`` float tensor to write into (may be ``weight`` itself).

    Returns:
        ``out`` if given, else a new ``[N, K]`` tensor in ``weight.dtype``.
    """
    _, k = check_apply_delta(weight, packed, scale, out)
    result = weight.float() + _scale_f32(scale, weight.device) * unpack_signs_dense(packed, k)
    if out is None:
        return result.to(weight.dtype)
    out.copy_(result)
    return out


def _add_planes(acc: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """``acc + Σᵢ sᵢ ⊙ Sᵢ`` in fp32, planes added in order (as deltahub's planes decode does).

    Args:
        acc: fp32 ``[N, K]`` (the base weight, or zeros).
        packed: int32 ``[P, N, ceil(K/32)]``. scales: floating ``[P, R, C]`` (R = 1 or N; C = 1 or
            ``ceil(K/group_size)``). group_size: columns per scale group, or None.
    """
    for i in range(packed.shape[0]):
        s = scales[i].detach().to(device=acc.device, dtype=torch.float32)
        if s.shape[1] > 1:
            s = s.repeat_interleave(int(group_size), dim=1)[:, :k]  # type: ignore[arg-type]
        acc = acc + s * unpack_signs_dense(packed[i], k)
    return acc


def planes_matmul_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """``y = x·(W + Σᵢ sᵢ ⊙ Sᵢ)ᵀ (+ bias)`` in fp32, rounded once to ``x.dtype``.

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        packed: int32 ``[P, N, ceil(K/32)]``: P sign planes (layout v1), 1 <= P <= 8.
        scales: floating ``[P, R, C]`` (fp32): ``[P, 1, 1]`` per matrix, ``[P, N, 1]`` per row,
            ``[P, N, ceil(K/group_size)]`` per row and group of ``group_size`` columns.
        weight: ``[N, K]`` in ``x.dtype``, or None for the delta term alone.
        bias: ``[N]`` floating, or None.
        group_size: columns per scale group (a multiple of 32) with per-group scales, else None.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    _, n, k, _ = check_planes_matmul(x, packed, scales, weight, bias, group_size)
    acc = weight.float() if weight is not None else torch.zeros(n, k, dtype=torch.float32, device=x.device)
    y = x.float() @ _add_planes(acc, packed, scales, k, group_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def multi_tenant_planes_matmul_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``y[m] = x[m]·Wᵀ + x[m]·(Σᵢ s_{t,i} ⊙ S_{t,i})ᵀ (+ bias)`` with ``t = tenant[m]`` (``-1``: base only).

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        weight: ``[N, K]`` shared base in ``x.dtype``, or None.
        packed: int32 ``[T, P, N, ceil(K/32)]``: T deltas of P planes each.
        scales: floating ``[T, P, R, C]`` (fp32), R and C as in :func:`planes_matmul_ref`.
        tenant: ``int32``/``int64`` ``[M]``, values in ``[-1, T)``.
        bias: ``[N]`` floating, or None.
        group_size: columns per scale group with per-group scales, else None.
        validate: check the tenant id values (always done here; kept for signature parity).

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    m, n, k, t, _ = check_multi_tenant_planes(x, weight, packed, scales, tenant, bias, group_size)
    check_tenant_ids(tenant, t)
    xf = x.float()
    y = xf @ weight.float().T if weight is not None else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for tid in torch.unique(tenant).tolist():
        if tid < 0:
            continue
        rows = tenant == tid
        zero = torch.zeros(n, k, dtype=torch.float32, device=x.device)
        y[rows] = y[rows] + xf[rows] @ _add_planes(zero, packed[tid], scales[tid], k, group_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
