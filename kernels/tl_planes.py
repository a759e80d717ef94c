"""Triton kernels of the ``planes`` codec: ``y = x·Wᵀ + Σᵢ (x·Sᵢᵀ) ⊙ sᵢ (+ bias)`` for ``P`` packed
sign planes ``Sᵢ`` (layout v1) and fp32 scales ``sᵢ`` per matrix, per output row, or per row and
group of ``G`` columns along K.

Every kernel builds, per K step, the fp32 tile ``W + Σᵢ sᵢ ⊙ Sᵢ`` (or the delta alone) in registers
(:func:`~.tl_common.add_planes_kn3`: each plane's words are read once and expanded with a shift and
an and/xor per element; the scales are read per word, so per-group scales apply to exactly their
group's columns whatever BLOCK_K is) and feeds it to one ``tl.dot``. Folding the scales into the
tile before the product is the same sum as scaling each group's partial product, without a second
accumulator per plane or group. The fp32 tile equals deltahub's decode bit for bit (same order of
the same exact terms); on fp16/bf16 it is rounded once to the activation dtype for the tensor cores,
as the decoded weight is (fp32 inputs use IEEE fp32 dots).

* :func:`planes_matmul_kernel`: one delta (``packed [P, N, W]``, ``scales [P, R, C]``), the base
  folded into the same tile: one dot per K step (sign1's kernel needs two).
* :func:`mt_planes_grouped_kernel` / :func:`mt_planes_rows_kernel`: a stack of T deltas with the
  same ``P`` and scale layout (``packed [T, P, N, W]``, ``scales [T, P, R, C]``), each row of ``x``
  picking one (``-1``: base only); the two strategies of :mod:`.tl_multi_tenant` (grouped: tensor
  cores over the row block's distinct tenants; rows: BGMV-style, CUDA cores, for decode).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_common import (
    MT_PLANES_GROUPED_DECODE,
    MT_PLANES_GROUPED_PREFILL,
    MT_PLANES_ROWS_CONFIGS,
    PLANES_DECODE,
    PLANES_PREFILL,
    add_planes_kn3,
    store_tile,
    to_triton_configs,
)

__all__ = [
    "planes_matmul_kernel",
    "planes_matmul_decode",
    "planes_matmul_prefill",
    "mt_planes_grouped_kernel",
    "mt_planes_rows_kernel",
    "mt_planes_grouped_decode",
    "mt_planes_grouped_prefill",
    "mt_planes_rows_tuned",
]

_NO_TENANT = tl.constexpr(2147483647)  # larger than any tenant id


@triton.jit
def planes_matmul_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32
    w_ptr,  # [N, K] x's dtype (unused unless HAS_WEIGHT)
    p_ptr,  # [P, N, NW] int32 packed signs
    s_ptr,  # [P, R, C] fp32 scales (strides 0 on broadcast dims)
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N] output
    M,
    N,
    K,
    NW,
    G,  # columns per scale group (GROUPED only)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pp,
    stride_pn,
    stride_pw,
    stride_sp,
    stride_sn,
    stride_sc,
    stride_ym,
    stride_yn,
    M_BUCKET,  # autotuning key only
    NUM_PLANES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row blocks vary fastest: programs in flight share W tiles in L2
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 32)
    offs_k3 = offs_w[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BK/32, 32]: column of (word, bit)
    m_mask = offs_m < M
    n_mask = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k3[:, :, None] * stride_wk + offs_n[None, None, :] * stride_wn
    p_ptrs = p_ptr + offs_w[:, None] * stride_pw + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = ((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :]
        if HAS_WEIGHT:
            k3_mask = (k0 + offs_k3) < K
            tile = tl.load(w_ptrs, mask=k3_mask[:, :, None] & n_mask[None, None, :], other=0.0).to(tl.float32)
        else:
            tile = tl.full((BLOCK_K // 32, 32, BLOCK_N), -0.0, tl.float32)  # -0.0 + v == v exactly
        tile = add_planes_kn3(tile, p_ptrs, s_ptr, k0, offs_w, offs_n, w_mask, n_mask, G, stride_pp, stride_sp,
                              stride_sn, stride_sc, NUM_PLANES, GROUPED)
        d = tl.reshape(tile, (BLOCK_K, BLOCK_N))
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), d, input_precision="ieee")
        else:
            acc += tl.dot(x, d.to(x.dtype))
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        p_ptrs += (BLOCK_K // 32) * stride_pw

    store_tile(acc, acc, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, stride_ym, stride_yn,
               False, HAS_BIAS, BF16_FIX)


@triton.jit
def mt_planes_grouped_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32
    w_ptr,  # [N, K] shared base (unused unless HAS_WEIGHT)
    p_ptr,  # [T, P, N, NW] int32 packed signs
    s_ptr,  # [T, P, R, C] fp32 scales
    t_ptr,  # [M] int32/int64 tenant ids, -1 = base only
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    NW,
    G,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pt,
    stride_pp,
    stride_pn,
    stride_pw,
    stride_st,
    stride_sp,
    stride_sn,
    stride_sc,
    stride_ym,
    stride_yn,
    M_BUCKET,  # autotuning key only
    NUM_PLANES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 32)
    m_mask = offs_m < M
    n_mask = offs_n < N

    tid = tl.load(t_ptr + offs_m, mask=m_mask, other=-1).to(tl.int32)
    first = tl.min(tl.where(tid >= 0, tid, _NO_TENANT), axis=0)
    last = tl.max(tid, axis=0)

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    p_off = offs_w[:, None] * stride_pw + offs_n[None, :] * stride_pn
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if FP32_DOT:
            x = x.to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP32_DOT:
                acc_b += tl.dot(x, w.to(tl.float32), input_precision="ieee")
            else:
                acc_b += tl.dot(x, w)
        w_mask = ((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :]
        cur = first
        while cur <= last:
            t64 = cur.to(tl.int64)
            tile = tl.full((BLOCK_K // 32, 32, BLOCK_N), -0.0, tl.float32)
            tile = add_planes_kn3(tile, p_ptr + t64 * stride_pt + p_off, s_ptr + t64 * stride_st, k0, offs_w, offs_n,
                                  w_mask, n_mask, G, stride_pp, stride_sp, stride_sn, stride_sc, NUM_PLANES, GROUPED)
            d = tl.reshape(tile, (BLOCK_K, BLOCK_N))
            xt = tl.where((tid == cur)[:, None], x, 0.0).to(x.dtype)
            if FP32_DOT:
                acc_s += tl.dot(xt, d, input_precision="ieee")
            else:
                acc_s += tl.dot(xt, d.to(x.dtype))
            cur = tl.min(tl.where(tid > cur, tid, _NO_TENANT), axis=0)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        p_off += (BLOCK_K // 32) * stride_pw

    store_tile(acc_b, acc_s, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, stride_ym, stride_yn,
               HAS_WEIGHT, HAS_BIAS, BF16_FIX)


@triton.jit
def mt_planes_rows_kernel(
    x_ptr,
    w_ptr,
    p_ptr,
    s_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    NW,
    G,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pt,
    stride_pp,
    stride_pn,
    stride_pw,
    stride_st,
    stride_sp,
    stride_sn,
    stride_sc,
    stride_ym,
    stride_yn,
    M_BUCKET,
    NUM_PLANES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUPED: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 32)
    offs_k3 = offs_w[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BK/32, 32]
    m_mask = offs_m < M
    n_mask = offs_n < N

    # base: one GEMM over the row block, W read once for all its rows
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_WEIGHT:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if FP32_DOT:
                acc_b += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc_b += tl.dot(x, w)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    # deltas: each row streams its own tenant's planes; x[k]·(Σᵢ sᵢ Sᵢ)[k, n] summed on CUDA cores
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid_m * BLOCK_M
    row1 = tl.minimum(row0 + BLOCK_M, M)
    p_off = offs_w[:, None] * stride_pw + offs_n[None, :] * stride_pn
    for r in range(row0, row1):
        t = tl.load(t_ptr + r).to(tl.int32)
        if t >= 0:
            t64 = t.to(tl.int64)
            part = tl.zeros((BLOCK_K // 32, 32, BLOCK_N), dtype=tl.float32)
            p_ptrs = p_ptr + t64 * stride_pt + p_off
            s_base = s_ptr + t64 * stride_st
            xr_ptrs = x_ptr + r * stride_xm + offs_k3 * stride_xk
            for k0 in range(0, K, BLOCK_K):
                xr = tl.load(xr_ptrs, mask=(k0 + offs_k3) < K, other=0.0).to(tl.float32)  # [BK/32, 32]
                w_mask = ((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :]
                tile = tl.full((BLOCK_K // 32, 32, BLOCK_N), -0.0, tl.float32)
                tile = add_planes_kn3(tile, p_ptrs, s_base, k0, offs_w, offs_n, w_mask, n_mask, G, stride_pp,
                                      stride_sp, stride_sn, stride_sc, NUM_PLANES, GROUPED)
                part += xr[:, :, None] * tile
                xr_ptrs += BLOCK_K * stride_xk
                p_ptrs += (BLOCK_K // 32) * stride_pw
            row_sum = tl.sum(tl.sum(part, axis=0), axis=0)  # [BLOCK_N]
            acc_s = tl.where((offs_m == r)[:, None], row_sum[None, :], acc_s)

    store_tile(acc_b, acc_s, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, stride_ym, stride_yn,
               HAS_WEIGHT, HAS_BIAS, BF16_FIX)


_KEY = ["M_BUCKET", "N", "K", "HAS_WEIGHT", "FP32_DOT", "NUM_PLANES", "GROUPED"]
planes_matmul_decode = triton.autotune(configs=to_triton_configs(PLANES_DECODE), key=_KEY)(planes_matmul_kernel)
"""Autotuned for decode batches (``M <= DECODE_MAX_M``)."""
planes_matmul_prefill = triton.autotune(configs=to_triton_configs(PLANES_PREFILL), key=_KEY)(planes_matmul_kernel)
"""Autotuned for prefill batches."""
mt_planes_grouped_decode = triton.autotune(configs=to_triton_configs(MT_PLANES_GROUPED_DECODE), key=_KEY)(
    mt_planes_grouped_kernel
)
mt_planes_grouped_prefill = triton.autotune(configs=to_triton_configs(MT_PLANES_GROUPED_PREFILL), key=_KEY)(
    mt_planes_grouped_kernel
)
mt_planes_rows_tuned = triton.autotune(configs=to_triton_configs(MT_PLANES_ROWS_CONFIGS), key=_KEY)(mt_planes_rows_kernel)
