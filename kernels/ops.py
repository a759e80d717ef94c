"""The public kernel entry points: check the arguments, check that Triton can run, launch.

Each function has a plain-torch twin with the same signature in :mod:`.reference`. These run the
Triton kernel when :func:`~deltahub.kernels.backend.triton_can_run` says it can (CUDA tensors and
triton importable, or ``TRITON_INTERPRET=1`` and CPU tensors) and raise
:class:`~deltahub.kernels.errors.TritonUnavailableError` otherwise: they never fall back silently
(choosing the CPU path is the runtime's job).

The ``launch_*`` functions take an optional explicit block config (a dict like the ones in
:mod:`.tl_common`), bypassing the autotuner: tests use them to cover several block shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import interpreter_enabled, triton_unavailable_reason
from .checks import (
    check_apply_delta,
    check_multi_tenant,
    check_multi_tenant_planes,
    check_planes_matmul,
    check_sign_matmul,
    check_tenant_ids,
)
from .errors import KernelInputError, TritonUnavailableError
from .layout import words_per_row

__all__ = [
    "sign_matmul",
    "multi_tenant_sign_matmul",
    "apply_delta",
    "launch_sign_matmul",
    "launch_multi_tenant",
    "launch_apply_delta",
    "planes_matmul",
    "multi_tenant_planes_matmul",
    "launch_planes_matmul",
    "launch_multi_tenant_planes",
    "STRATEGIES",
]

STRATEGIES = ("auto", "grouped", "rows")
"""Multi-tenant kernel strategies (see :mod:`.tl_multi_tenant`)."""

_MAX_GRID_Y = 65535


def _require_triton(*tensors: torch.Tensor | None) -> None:
    reason = triton_unavailable_reason(*tensors)
    if reason is not None:
        raise TritonUnavailableError(
            f"the Triton kernel cannot run: {reason}",
            "use the *_ref function or deltahub.runtime's CPU path, move the tensors to a CUDA "
            "device, or set TRITON_INTERPRET=1 before importing triton (CPU tests)",
        )


_MAX_ELEMENTS = 2**31 - 1


def _check_int32_offsets(out_elements: int = 0, **tensors: torch.Tensor | None) -> None:
    """The kernels index with int32 offsets (all but the tenant axis of a stack): refuse a tensor
    (or an output of ``out_elements``) whose elements cannot all be reached that way rather than
    read or write the wrong memory."""
    if out_elements > _MAX_ELEMENTS:
        raise KernelInputError(
            f"the output would have {out_elements} elements; the kernels index with 32-bit offsets",
            "split the batch (rows of x) and call the kernel per part",
        )
    for name, t in tensors.items():
        if t is None:
            continue
        dims = list(zip(t.shape, t.stride()))
        if name == "packed" and t.dim() == 3:  # tenant offsets are int64
            dims = dims[1:]
        span = 1 + sum((size - 1) * abs(stride) for size, stride in dims if size > 0)
        if t.numel() and span > _MAX_ELEMENTS:
            raise KernelInputError(
                f"{name} spans {span} elements; the kernels index with 32-bit offsets (at most {_MAX_ELEMENTS})",
                "split the matrix along its rows (or the batch) and call the kernel per part",
            )


def _scale_args(scale: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """``(scale_ptr, scale_val, from_ptr)``: a tensor on the kernel's device is read in the kernel
    (no device sync); a python number or a CPU tensor (for a GPU kernel) is passed by value."""
    if isinstance(scale, torch.Tensor):
        if scale.device == like.device:
            s = scale.reshape(())
            if s.dtype != torch.float32:
                s = s.float()
            return s, 0.0, True
        return like, float(scale.item()), False  # a CPU scalar tensor: no GPU sync
    return like, float(scale), False


def _fp32_dot(dtype: torch.dtype) -> bool:
    from .tl_common import use_fp32_dot

    return use_fp32_dot(dtype == torch.float32)


def _bf16_fix(dtype: torch.dtype) -> bool:
    from .tl_common import bf16_fix

    return bf16_fix(dtype == torch.bfloat16)


def _launch_cfg(config: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(meta, launch kwargs)`` for an explicit config, the interpreter's default, or autotune (None)."""
    from .tl_common import INTERPRET_CONFIG

    if config is None and interpreter_enabled():
        config = INTERPRET_CONFIG
    if config is None:
        return None, {}
    meta = {k: v for k, v in config.items() if k.startswith("BLOCK_") and v}
    return meta, {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 2)}


def _check_block_k(meta: dict[str, Any] | None) -> None:
    if meta is not None and (meta["BLOCK_K"] < 32 or meta["BLOCK_K"] % 32):
        raise KernelInputError(f"BLOCK_K must be a multiple of 32, got {meta['BLOCK_K']}", "one int32 word = 32 columns")


# ------------------------------------------------------------------------------------- sign_matmul
def launch_sign_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`sign_matmul` with an optional explicit block config (None: autotuned / interpreter)."""
    m, n, k = check_sign_matmul(x, packed, scale, weight, bias)
    _check_int32_offsets(m * n, x=x, weight=weight, packed=packed)
    _require_triton(x, packed, weight, bias)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    from .tl_common import DECODE_MAX_M, m_bucket
    from .tl_sign_matmul import sign_matmul_decode, sign_matmul_kernel, sign_matmul_prefill

    scale_ptr, scale_val, from_ptr = _scale_args(scale, x)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    meta, launch = _launch_cfg(config)
    _check_block_k(meta)
    args = (
        x, w, packed, scale_ptr, scale_val, b, y, m, n, k, words_per_row(k),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), packed.stride(0), packed.stride(1),
        y.stride(0), y.stride(1), m_bucket(m),
    )
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "SCALE_FROM_PTR": from_ptr,
        "FP32_DOT": _fp32_dot(x.dtype),
        "BF16_FIX": _bf16_fix(x.dtype),
    }
    if meta is not None:
        grid = (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(n, meta["BLOCK_N"]))
        sign_matmul_kernel[grid](*args, **flags, **meta, **launch)
    else:
        kernel = sign_matmul_decode if m <= DECODE_MAX_M else sign_matmul_prefill
        kernel[lambda c: (triton_cdiv(m, c["BLOCK_M"]), triton_cdiv(n, c["BLOCK_N"]))](*args, **flags)
    return y


def sign_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + scale·(x·Sᵀ) (+ bias)`` on the GPU (Triton), fp32 accumulation.

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32 (any M; 1 for decode).
        packed: ``int32`` ``[N, ceil(K/32)]``: the signs ``S`` (layout v1).
        scale: python number or one-element float tensor (fp32; on x's device: read in the
            kernel, no sync).
        weight: ``[N, K]`` base weight in ``x.dtype``, or None (delta term only).
        bias: ``[N]`` floating, or None.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        KernelInputError: bad shapes, dtypes or devices.
        TritonUnavailableError: the Triton path cannot run for these tensors.
    """
    return launch_sign_matmul(x, packed, scale, weight, bias)


# ------------------------------------------------------------------------------- multi-tenant
def launch_multi_tenant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
    strategy: str = "auto",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`multi_tenant_sign_matmul` with an optional explicit block config."""
    if strategy not in STRATEGIES:
        raise KernelInputError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    m, n, k, t = check_multi_tenant(x, weight, packed, scales, tenant, bias)
    _check_int32_offsets(m * n, x=x, weight=weight, packed=packed)
    _require_triton(x, weight, packed, scales, tenant, bias)
    if validate:
        check_tenant_ids(tenant, t)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    from .tl_common import DECODE_MAX_M, m_bucket
    from .tl_multi_tenant import (
        mt_grouped_decode,
        mt_grouped_kernel,
        mt_grouped_prefill,
        mt_rows_kernel,
        mt_rows_tuned,
    )

    if strategy == "auto":
        strategy = "rows" if m <= DECODE_MAX_M else "grouped"
    order = None
    if strategy == "grouped" and m > DECODE_MAX_M:
        # sort rows by tenant so that a row block holds few distinct tenants (each one's bits are
        # then read once per block); stable, so equal tenants keep their order
        order = torch.argsort(tenant, stable=True)
        x, tenant = x.index_select(0, order), tenant.index_select(0, order)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scales32 = scales if scales.dtype == torch.float32 else scales.float()
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    args = (
        x, w, packed, scales32, tenant, b, y, m, n, k, words_per_row(k),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        packed.stride(0), packed.stride(1), packed.stride(2), y.stride(0), y.stride(1), m_bucket(m),
    )
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "FP32_DOT": _fp32_dot(x.dtype),
             "BF16_FIX": _bf16_fix(x.dtype)}
    meta, launch = _launch_cfg(config)
    _check_block_k(meta)
    if meta is not None:
        raw = mt_rows_kernel if strategy == "rows" else mt_grouped_kernel
        grid = (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(n, meta["BLOCK_N"]))
        raw[grid](*args, **flags, **meta, **launch)
    else:
        if strategy == "rows":
            kernel = mt_rows_tuned
        else:
            kernel = mt_grouped_decode if m <= DECODE_MAX_M else mt_grouped_prefill
        kernel[lambda c: (triton_cdiv(m, c["BLOCK_M"]), triton_cdiv(n, c["BLOCK_N"]))](*args, **flags)
    if order is not None:
        out = torch.empty_like(y)
        out.index_copy_(0, order, y)
        return out
    return y


def multi_tenant_sign_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
    strategy: str = "auto",
) -> torch.Tensor:
    """``y[m] = x[m]·Wᵀ + scales[t]·(x[m]·S_tᵀ) (+ bias)``, ``t = tenant[m]`` (``-1``: base only),
    fused with the shared base GEMM (Triton).

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        weight: ``[N, K]`` shared base in ``x.dtype``, or None.
        packed: ``int32`` ``[T, N, ceil(K/32)]``: the stacked signs of T deltas.
        scales: float ``[T]`` (fp32), one per stacked delta.
        tenant: ``int32``/``int64`` ``[M]`` in ``[-1, T)``; any order, repeats allowed.
        bias: ``[N]`` floating, or None.
        validate: check that every id is in ``[-1, T)`` (reads the ids: one device sync; pass False
            when the caller has checked them once per batch).
        strategy: ``"grouped"`` (tensor cores, rows grouped by tenant; large batches),
            ``"rows"`` (per-row, BGMV-style; decode), or ``"auto"`` (rows for ``M <= 64``).

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        KernelInputError: bad shapes, dtypes, devices, or (validate) tenant ids.
        TritonUnavailableError: the Triton path cannot run for these tensors.
    """
    return launch_multi_tenant(x, weight, packed, scales, tenant, bias, validate=validate, strategy=strategy)


# ------------------------------------------------------------------------------------ apply_delta
def launch_apply_delta(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    out: torch.Tensor | None = None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`apply_delta` with an optional explicit block config."""
    n, k = check_apply_delta(weight, packed, scale, out)
    _check_int32_offsets(weight=weight, packed=packed, out=out)
    _require_triton(weight, packed, out)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if n == 0 or k == 0:
        return out
    from .tl_apply_delta import apply_delta_kernel
    from .tl_common import APPLY_DELTA_CONFIGS, INTERPRET_CONFIG

    scale_ptr, scale_val, from_ptr = _scale_args(scale, weight)
    if config is None:
        config = INTERPRET_CONFIG if interpreter_enabled() else APPLY_DELTA_CONFIGS[0]
    meta = {"BLOCK_M": config["BLOCK_M"], "BLOCK_K": config["BLOCK_K"]}
    launch = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 1)}
    _check_block_k(meta)
    grid = (triton_cdiv(k, meta["BLOCK_K"]), triton_cdiv(n, meta["BLOCK_M"]))
    if grid[1] > _MAX_GRID_Y:
        raise KernelInputError(f"apply_delta: {n} rows exceed the launch grid", "split the matrix by rows")
    apply_delta_kernel[grid](
        weight, packed, scale_ptr, scale_val, out, n, k, words_per_row(k),
        weight.stride(0), weight.stride(1), packed.stride(0), packed.stride(1), out.stride(0), out.stride(1),
        SCALE_FROM_PTR=from_ptr, BF16_FIX=_bf16_fix(out.dtype), **meta, **launch,
    )
    return out


def apply_delta(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scale: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W + scale·S`` (fp32 sum, one rounding: bit-identical to deltahub's sign1 reconstruction)
    at memory speed on the GPU (Triton).

    Args:
        weight: ``[N, K]`` float16 / bfloat16 / float32 base weight.
        packed: ``int32`` ``[N, ceil(K/32)]``.
        scale: python number or one-element float tensor (fp32).
        out: optional ``[N, K]`` float tensor to write into (may be ``weight``: in place).

    Returns:
        ``out`` if given, else a new ``[N, K]`` tensor in ``weight.dtype``.

    Raises:
        KernelInputError: bad shapes, dtypes or devices.
        TritonUnavailableError: the Triton path cannot run for these tensors.
    """
    return launch_apply_delta(weight, packed, scale, out)


# ------------------------------------------------------------------------------------------ planes
def _plane_scales(scales: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int, bool, tuple[int, int]]:
    """``(fp32 scales, G, GROUPED, (stride_sn, stride_sc))``: a broadcast dimension (one row, one
    column) gets stride 0, so per-matrix, per-row and per-group scales run the same code."""
    s = scales if scales.dtype == torch.float32 else scales.float()
    r, c = s.shape[-2], s.shape[-1]
    grouped = group_size is not None and c > 1
    stride_sn = s.stride(-2) if r > 1 else 0
    stride_sc = s.stride(-1) if grouped else 0
    return s, int(group_size) if grouped else 32, grouped, (stride_sn, stride_sc)


def launch_planes_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`planes_matmul` with an optional explicit block config (None: autotuned / interpreter)."""
    m, n, k, planes = check_planes_matmul(x, packed, scales, weight, bias, group_size)
    _check_int32_offsets(m * n, x=x, weight=weight, planes=packed, scales=scales)
    _require_triton(x, packed, scales, weight, bias)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    from .tl_common import DECODE_MAX_M, m_bucket
    from .tl_planes import planes_matmul_decode, planes_matmul_kernel, planes_matmul_prefill

    s32, g, grouped, (stride_sn, stride_sc) = _plane_scales(scales, group_size)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    meta, launch = _launch_cfg(config)
    _check_block_k(meta)
    args = (
        x, w, packed, s32, b, y, m, n, k, words_per_row(k), g,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), packed.stride(0), packed.stride(1), packed.stride(2),
        s32.stride(0), stride_sn, stride_sc, y.stride(0), y.stride(1), m_bucket(m),
    )
    flags = {
        "NUM_PLANES": planes,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "GROUPED": grouped,
        "FP32_DOT": _fp32_dot(x.dtype),
        "BF16_FIX": _bf16_fix(x.dtype),
    }
    if meta is not None:
        grid = (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(n, meta["BLOCK_N"]))
        planes_matmul_kernel[grid](*args, **flags, **meta, **launch)
    else:
        kernel = planes_matmul_decode if m <= DECODE_MAX_M else planes_matmul_prefill
        kernel[lambda c: (triton_cdiv(m, c["BLOCK_M"]), triton_cdiv(n, c["BLOCK_N"]))](*args, **flags)
    return y


def planes_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + Σᵢ (x·Sᵢᵀ) ⊙ sᵢ (+ bias)`` for a delta of P sign planes (the ``planes`` codec),
    fused with the base GEMM (Triton), fp32 accumulation.

    Per K step the kernel builds ``W + Σᵢ sᵢ ⊙ Sᵢ`` in fp32 registers (exactly deltahub's decode
    of that tile), rounds it once to ``x.dtype`` (fp16/bf16; fp32 stays fp32) and runs one dot.

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32 (any M; 1 for decode).
        packed: ``int32`` ``[P, N, ceil(K/32)]``: the P sign planes ``Sᵢ`` (layout v1), 1 <= P <= 8;
            any strides (e.g. a view of the planes' common storage).
        scales: floating ``[P, R, C]`` on x's device (fp32; other float dtypes are converted):
            ``[P, 1, 1]`` per matrix, ``[P, N, 1]`` per output row, ``[P, N, ceil(K/group_size)]``
            per row and group of ``group_size`` columns.
        weight: ``[N, K]`` base weight in ``x.dtype``, or None (delta term only).
        bias: ``[N]`` floating, or None.
        group_size: columns per scale group (a multiple of 32) for per-group scales, else None.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        KernelInputError: bad shapes, dtypes or devices.
        TritonUnavailableError: the Triton path cannot run for these tensors.
    """
    return launch_planes_matmul(x, packed, scales, weight, bias, group_size=group_size)


def launch_multi_tenant_planes(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    validate: bool = True,
    strategy: str = "auto",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """:func:`multi_tenant_planes_matmul` with an optional explicit block config."""
    if strategy not in STRATEGIES:
        raise KernelInputError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    m, n, k, t, planes = check_multi_tenant_planes(x, weight, packed, scales, tenant, bias, group_size)
    # the tenant axis is indexed with int64 offsets: check one tenant's planes and scales
    _check_int32_offsets(m * n, x=x, weight=weight, planes=packed[0] if t else None, scales=scales[0] if t else None)
    _require_triton(x, weight, packed, scales, tenant, bias)
    if validate:
        check_tenant_ids(tenant, t)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    from .tl_common import DECODE_MAX_M, m_bucket
    from .tl_planes import (
        mt_planes_grouped_decode,
        mt_planes_grouped_kernel,
        mt_planes_grouped_prefill,
        mt_planes_rows_kernel,
        mt_planes_rows_tuned,
    )

    if strategy == "auto":
        strategy = "rows" if m <= DECODE_MAX_M else "grouped"
    order = None
    if strategy == "grouped" and m > DECODE_MAX_M:
        order = torch.argsort(tenant, stable=True)  # a row block then holds few distinct tenants
        x, tenant = x.index_select(0, order), tenant.index_select(0, order)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s32, g, grouped, (stride_sn, stride_sc) = _plane_scales(scales, group_size)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    args = (
        x, w, packed, s32, tenant, b, y, m, n, k, words_per_row(k), g,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        packed.stride(0), packed.stride(1), packed.stride(2), packed.stride(3),
        s32.stride(0), s32.stride(1), stride_sn, stride_sc, y.stride(0), y.stride(1), m_bucket(m),
    )
    flags = {
        "NUM_PLANES": planes,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "GROUPED": grouped,
        "FP32_DOT": _fp32_dot(x.dtype),
        "BF16_FIX": _bf16_fix(x.dtype),
    }
    meta, launch = _launch_cfg(config)
    _check_block_k(meta)
    if meta is not None:
        raw = mt_planes_rows_kernel if strategy == "rows" else mt_planes_grouped_kernel
        grid = (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(n, meta["BLOCK_N"]))
        raw[grid](*args, **flags, **meta, **launch)
    else:
        if strategy == "rows":
            kernel = mt_planes_rows_tuned
        else:
            kernel = mt_planes_grouped_decode if m <= DECODE_MAX_M else mt_planes_grouped_prefill
        kernel[lambda c: (triton_cdiv(m, c["BLOCK_M"]), triton_cdiv(n, c["BLOCK_N"]))](*args, **flags)
    if order is not None:
        out = torch.empty_like(y)
        out.index_copy_(0, order, y)
        return out
    return y


def multi_tenant_planes_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    tenant: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    validate: bool = True,
    strategy: str = "auto",
) -> torch.Tensor:
    """``y[m] = x[m]·Wᵀ + Σᵢ (x[m]·S_{t,i}ᵀ) ⊙ s_{t,i} (+ bias)``, ``t = tenant[m]`` (``-1``: base
    only), for a stack of T ``planes`` deltas with the same P and scale layout, fused with the
    shared base GEMM (Triton).

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32.
        weight: ``[N, K]`` shared base in ``x.dtype``, or None.
        packed: ``int32`` ``[T, P, N, ceil(K/32)]``: the T deltas' planes (1 <= P <= 8).
        scales: floating ``[T, P, R, C]`` (fp32), R = 1 or N, C = 1 or ``ceil(K/group_size)``.
        tenant: ``int32``/``int64`` ``[M]`` in ``[-1, T)``; any order, repeats allowed.
        bias: ``[N]`` floating, or None.
        group_size: columns per scale group (a multiple of 32) for per-group scales, else None.
        validate: check that every id is in ``[-1, T)`` (one device sync; pass False when the
            caller checked them).
        strategy: ``"grouped"``, ``"rows"`` or ``"auto"`` (rows for ``M <= 64``), as for
            :func:`multi_tenant_sign_matmul`.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        KernelInputError: bad shapes, dtypes, devices, or (validate) tenant ids.
        TritonUnavailableError: the Triton path cannot run for these tensors.
    """
    return launch_multi_tenant_planes(x, weight, packed, scales, tenant, bias, group_size=group_size,
                                      validate=validate, strategy=strategy)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
