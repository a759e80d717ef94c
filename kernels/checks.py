"""Argument checks shared by the kernels and their references.

Every check raises :class:`~deltahub.kernels.errors.KernelInputError` naming the argument, what it
got, what it needs, and (in the hint) what to do. Nothing here reads tensor *values* except
:func:`check_tenant_ids` (one device sync, which callers can skip).
"""

from __future__ import annotations

import torch

from .errors import KernelInputError
from .layout import words_per_row

__all__ = [
    "ACT_DTYPES",
    "check_sign_matmul",
    "check_multi_tenant",
    "check_apply_delta",
    "check_scale",
    "check_tenant_ids",
    "check_planes_matmul",
    "check_multi_tenant_planes",
    "MAX_PLANES",
]

MAX_PLANES = 8
"""Sign planes per delta the planes kernels take (the ``planes`` codec stores 1..8)."""

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Activation / weight dtypes the kernels accept."""

_LAYOUT_HINT = "pack signs with layout v1: int32 [N, ceil(K/32)], bit j of word w = column 32*w + j"


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}", "pass a tensor")
    return t


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise KernelInputError(
            f"{name} is on {t.device} but the other arguments are on {device}",
            f"move {name} to {device} (tensor.to(device))",
        )


def _check_x(x: object) -> tuple[int, int]:
    x = _tensor("x", x)
    if x.dim() != 2:
        raise KernelInputError(
            f"x must be 2-D [M, K], got shape {list(x.shape)}", "flatten leading dims: x.reshape(-1, x.shape[-1])"
        )
    if x.dtype not in ACT_DTYPES:
        raise KernelInputError(f"x must be float16, bfloat16 or float32, got {x.dtype}", "cast x (x.to(torch.float16))")
    return x.shape[0], x.shape[1]


def _check_weight(weight: object, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
    w = _tensor("weight", weight)
    if w.dim() != 2 or tuple(w.shape) != (n, k):
        raise KernelInputError(
            f"weight must be [N, K] = [{n}, {k}], got shape {list(w.shape)}",
            "weight is the Linear layer's [out_features, in_features] matrix matching packed and x",
        )
    if w.dtype != dtype:
        raise KernelInputError(f"weight is {w.dtype} but x is {dtype}", "cast the weight to x's dtype once, when loading")
    _same_device("weight", w, device)


def _check_bias(bias: object, n: int, device: torch.device) -> None:
    b = _tensor("bias", bias)
    if b.dim() != 1 or b.shape[0] != n:
        raise KernelInputError(f"bias must be [N] = [{n}], got shape {list(b.shape)}", "pass the layer's bias or None")
    if not b.is_floating_point():
        raise KernelInputError(f"bias must be floating point, got {b.dtype}", "cast the bias to x's dtype")
    _same_device("bias", b, device)


def check_scale(scale: object, device: torch.device | None = None) -> None:
    """``scale`` is a python number or a one-element floating tensor (CPU, or on ``device``)."""
    if isinstance(scale, bool):
        raise KernelInputError("scale must be a number or a 0-d float32 tensor, got a bool", "pass the fp32 scale")
    if isinstance(scale, (int, float)):
        return
    if not isinstance(scale, torch.Tensor):
        raise KernelInputError(
            f"scale must be a number or a 0-d float32 tensor, got {type(scale).__name__}", "pass the fp32 scale"
        )
    if scale.numel() != 1 or scale.dim() > 1:
        raise KernelInputError(
            f"scale must hold one value (0-d tensor), got shape {list(scale.shape)}",
            "one scale per weight matrix; for several deltas use multi_tenant_sign_matmul",
        )
    if not scale.is_floating_point():
        raise KernelInputError(f"scale must be floating point, got {scale.dtype}", "pass torch.tensor(s, dtype=torch.float32)")
    if device is not None and scale.device.type != "cpu" and scale.device != device:
        raise KernelInputError(
            f"scale is on {scale.device} but the other arguments are on {device}",
            "keep the scale on the CPU or on the other arguments' device",
        )


def _check_packed2(packed: object, k: int, device: torch.device, n: int | None = None) -> int:
    p = _tensor("packed", packed)
    if p.dtype != torch.int32:
        raise KernelInputError(f"packed must be torch.int32, got {p.dtype}", _LAYOUT_HINT)
    if p.dim() != 2 or p.shape[1] != words_per_row(k) or (n is not None and p.shape[0] != n):
        want = f"[{n if n is not None else 'N'}, {words_per_row(k)}]"
        raise KernelInputError(f"packed must be {want} for K={k} columns, got shape {list(p.shape)}", _LAYOUT_HINT)
    _same_device("packed", p, device)
    return p.shape[0]


def check_sign_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: object,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Check the arguments of ``sign_matmul``; return ``(M, N, K)``."""
    m, k = _check_x(x)
    n = _check_packed2(packed, k, x.device)
    check_scale(scale, x.device)
    if weight is not None:
        _check_weight(weight, n, k, x.dtype, x.device)
    if bias is not None:
        _check_bias(bias, n, x.device)
    return m, n, k


def check_multi_tenant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Check the arguments of ``multi_tenant_sign_matmul`` (not the tenant id values: see
    :func:`check_tenant_ids`); return ``(M, N, K, T)``."""
    m, k = _check_x(x)
    p = _tensor("packed", packed)
    if p.dtype != torch.int32:
        raise KernelInputError(f"packed must be torch.int32, got {p.dtype}", _LAYOUT_HINT)
    if p.dim() != 3 or p.shape[2] != words_per_row(k):
        raise KernelInputError(
            f"packed must be a stack [T, N, {words_per_row(k)}] for K={k} columns, got shape {list(p.shape)}",
            "torch.stack the [N, ceil(K/32)] packed signs of the T deltas",
        )
    _same_device("packed", p, x.device)
    t, n = p.shape[0], p.shape[1]
    if weight is not None:
        _check_weight(weight, n, k, x.dtype, x.device)
    if bias is not None:
        _check_bias(bias, n, x.device)
    s = _tensor("scales", scales)
    if s.dim() != 1 or s.shape[0] != t or not s.is_floating_point():
        raise KernelInputError(
            f"scales must be a floating tensor [T] = [{t}], got {s.dtype} {list(s.shape)}",
            "one fp32 scale per stacked delta, in the order of packed",
        )
    _same_device("scales", s, x.device)
    ten = _tensor("tenant", tenant)
    if ten.dim() != 1 or ten.shape[0] != m or ten.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"tenant must be int32/int64 [M] = [{m}], got {ten.dtype} {list(ten.shape)}",
            "one delta index per row of x (-1 = base only)",
        )
    _same_device("tenant", ten, x.device)
    return m, n, k, t


def check_tenant_ids(tenant: torch.Tensor, t: int) -> None:
    """Every ``tenant[m]`` is in ``[-1, T)``. Reads the values (one device sync on a GPU)."""
    if tenant.numel() == 0:
        return
    lo, hi = int(tenant.min()), int(tenant.max())
    if lo < -1 or hi >= t:
        bad = lo if lo < -1 else hi
        raise KernelInputError(
            f"tenant id {bad} is out of range: {t} deltas are stacked, ids must be in [-1, {t})",
            "use -1 for rows that take the base only, 0..T-1 for a stacked delta",
        )


def check_apply_delta(
    weight: torch.Tensor, packed: torch.Tensor, scale: object, out: torch.Tensor | None
) -> tuple[int, int]:
    """Check the arguments of ``apply_delta``; return ``(N, K)``."""
    w = _tensor("weight", weight)
    if w.dim() != 2:
        raise KernelInputError(f"weight must be 2-D [N, K], got shape {list(w.shape)}", "pass the base weight matrix")
    if w.dtype not in ACT_DTYPES:
        raise KernelInputError(f"weight must be float16, bfloat16 or float32, got {w.dtype}", "cast the weight")
    n, k = w.shape
    _check_packed2(packed, k, w.device, n)
    check_scale(scale, w.device)
    if out is not None:
        o = _tensor("out", out)
        if tuple(o.shape) != (n, k) or o.dtype not in ACT_DTYPES:
            raise KernelInputError(
                f"out must be a float16/bfloat16/float32 [{n}, {k}] tensor, got {o.dtype} {list(o.shape)}",
                "allocate out like the weight (torch.empty_like(weight)) or pass out=None",
            )
        _same_device("out", o, w.device)
    return n, k


# ------------------------------------------------------------------------------------------ planes
_PLANES_HINT = "stack the planes' int32 [N, ceil(K/32)] packed signs: torch.stack(planes) (layout v1)"


def _check_group_size(group_size: object) -> int | None:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 or group_size % 32:
        raise KernelInputError(
            f"group_size must be a positive multiple of 32, got {group_size!r}",
            "the planes codec groups scales by a multiple of 32 columns (one packed word); None for per-matrix/row scales",
        )
    return group_size


def _check_planes(packed: object, lead: tuple[int, ...], lead_names: str, k: int, device: torch.device) -> tuple[int, int]:
    """``packed`` int32 ``[*lead, P, N, ceil(K/32)]``; returns ``(P, N)``."""
    p = _tensor("packed", packed)
    if p.dtype != torch.int32:
        raise KernelInputError(f"packed must be torch.int32, got {p.dtype}", _LAYOUT_HINT)
    dims = len(lead) + 3
    if p.dim() != dims or p.shape[-1] != words_per_row(k) or tuple(p.shape[: len(lead)]) != lead:
        want = f"[{lead_names}P, N, {words_per_row(k)}]"
        raise KernelInputError(f"packed must be {want} for K={k} columns, got shape {list(p.shape)}", _PLANES_HINT)
    planes = p.shape[-3]
    if not 1 <= planes <= MAX_PLANES:
        raise KernelInputError(
            f"packed holds {planes} planes; the kernels take 1 to {MAX_PLANES}",
            "pass the first planes of the delta (any prefix is a valid delta)",
        )
    _same_device("packed", p, device)
    return planes, p.shape[-2]


def _check_plane_scales(scales: object, lead: tuple[int, ...], lead_names: str, n: int, k: int,
                        group_size: int | None, device: torch.device) -> None:
    """``scales`` floating ``[*lead, R, C]``: R = 1 (per matrix) or N (per row); C = 1, or
    ``ceil(K/group_size)`` when ``group_size`` is given (per row and group)."""
    s = _tensor("scales", scales)
    groups = -(-k // group_size) if group_size is not None else 1
    want = f"[{lead_names}R, C] with R = 1 or N = {n}, C = " + (
        f"ceil(K/group_size) = {groups}" if group_size is not None else "1"
    )
    if not s.is_floating_point() or s.dim() != len(lead) + 2 or tuple(s.shape[: len(lead)]) != lead:
        raise KernelInputError(
            f"scales must be a floating tensor {want}, got {s.dtype} {list(s.shape)}",
            "one fp32 [R, C] scale matrix per plane, stacked like packed",
        )
    r, c = s.shape[-2], s.shape[-1]
    if r not in (1, n):
        raise KernelInputError(
            f"scales have {r} rows; need 1 (one scale per matrix) or N = {n} (one per output row)",
            "per-matrix scales are [1, 1], per-row [N, 1], per-group [N, ceil(K/G)]",
        )
    if c != groups:
        hint = (
            "pass group_size=G with per-group scales [N, ceil(K/G)]" if group_size is None
            else f"per-group scales for K={k} and group_size={group_size} have {groups} columns"
        )
        raise KernelInputError(f"scales have {c} columns, want {want}", hint)
    _same_device("scales", s, device)


def check_planes_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int | None = None,
) -> tuple[int, int, int, int]:
    """Check the arguments of ``planes_matmul``; return ``(M, N, K, P)``."""
    m, k = _check_x(x)
    group = _check_group_size(group_size)
    planes, n = _check_planes(packed, (), "", k, x.device)
    _check_plane_scales(scales, (planes,), "P, ", n, k, group, x.device)
    if weight is not None:
        _check_weight(weight, n, k, x.dtype, x.device)
    if bias is not None:
        _check_bias(bias, n, x.device)
    return m, n, k, planes


def check_multi_tenant_planes(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None = None,
) -> tuple[int, int, int, int, int]:
    """Check the arguments of ``multi_tenant_planes_matmul`` (not the tenant id values: see
    :func:`check_tenant_ids`); return ``(M, N, K, T, P)``."""
    m, k = _check_x(x)
    group = _check_group_size(group_size)
    p = _tensor("packed", packed)
    if p.dim() != 4:
        raise KernelInputError(
            f"packed must be a stack [T, P, N, {words_per_row(k)}] for K={k} columns, got shape {list(p.shape)}",
            "torch.stack the [P, N, ceil(K/32)] planes of the T deltas (same P for all)",
        )
    t = p.shape[0]
    planes, n = _check_planes(p, (t,), "T, ", k, x.device)
    _check_plane_scales(scales, (t, planes), "T, P, ", n, k, group, x.device)
    if weight is not None:
        _check_weight(weight, n, k, x.dtype, x.device)
    if bias is not None:
        _check_bias(bias, n, x.device)
    ten = _tensor("tenant", tenant)
    if ten.dim() != 1 or ten.shape[0] != m or ten.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"tenant must be int32/int64 [M] = [{m}], got {ten.dtype} {list(ten.shape)}",
            "one delta index per row of x (-1 = base only)",
        )
    _same_device("tenant", ten, x.device)
    return m, n, k, t, planes
