"""Triton kernels of ``multi_tenant_sign_matmul``: one shared base, a stack of T packed deltas, and
for every row of ``x`` the index of its delta (``-1``: base only).

``y[m] = x[m]·Wᵀ + scales[t]·(x[m]·S_tᵀ) (+ bias)``, ``t = tenant[m]``, fp32 accumulation.

Two strategies (in the spirit of Punica/S-LoRA's SGMV and BGMV):

* **grouped** (:func:`mt_grouped_kernel`): a program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y``.
  Each K step loads the ``x`` tile once and the base tile once (``acc_b += x·Wᵀ`` on tensor cores
  for the whole row block), then loops over the *distinct* tenants present in the row block,
  reading each one's packed words once and adding ``x_t·S_tᵀ`` with the rows of other tenants
  masked to zero. With rows sorted by tenant (the dispatcher sorts large batches) a tenant's bits
  are read once per row block sharing it. Best when rows share tenants (prefill, grouped batches).
* **rows** (:func:`mt_rows_kernel`): BGMV-style for decode. The base GEMM runs as above over the
  row block (W read once for the block); then each row streams its own tenant's packed words and
  accumulates ``±x[m, k]`` on CUDA cores (no tensor-core padding of single rows to 16): ``±x`` is
  ``-x`` with its fp32 sign bit XOR-ed by the packed bit moved to bit 31 (shift, and+xor, add per
  element; exact).

Both keep ``acc_s`` unscaled per row and apply ``scales[t]`` once in the epilogue.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_common import (
    MT_GROUPED_DECODE,
    MT_GROUPED_PREFILL,
    MT_ROWS_CONFIGS,
    sign_bits_kn,
    store_tile,
    to_triton_configs,
    unpack_signs_kn,
)

__all__ = ["mt_grouped_kernel", "mt_rows_kernel", "mt_grouped_decode", "mt_grouped_prefill", "mt_rows_tuned"]

_NO_TENANT = tl.constexpr(2147483647)  # larger than any tenant id


@triton.jit
def _epilogue(acc_b, acc_s, tid, offs_m, offs_n, m_mask, n_mask, scales_ptr, b_ptr, y_ptr, stride_ym, stride_yn,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_FIX: tl.constexpr):
    """``y = acc_b + scales[tid]·acc_s (+ bias)`` for a ``[BLOCK_M, BLOCK_N]`` tile (tid < 0: 0)."""
    row_scale = tl.load(scales_ptr + tl.where(tid >= 0, tid, 0), mask=m_mask & (tid >= 0), other=0.0)
    store_tile(acc_b, row_scale.to(tl.float32)[:, None] * acc_s, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr,
               stride_ym, stride_yn, HAS_WEIGHT, HAS_BIAS, BF16_FIX)


@triton.jit
def mt_grouped_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32
    w_ptr,  # [N, K] shared base (unused unless HAS_WEIGHT)
    p_ptr,  # [T, N, NW] int32 packed signs
    scales_ptr,  # [T] fp32
    t_ptr,  # [M] int32/int64 tenant ids, -1 = base only
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N]
    M,
    N,
    K,
    NW,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pt,
    stride_pn,
    stride_pw,
    stride_ym,
    stride_yn,
    M_BUCKET,  # autotuning key only
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
        wp_mask = ((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :]
        cur = first
        while cur <= last:
            words = tl.load(p_ptr + cur.to(tl.int64) * stride_pt + p_off, mask=wp_mask, other=0)
            s = unpack_signs_kn(words, BLOCK_K, BLOCK_N)
            xt = tl.where((tid == cur)[:, None], x, 0.0).to(x.dtype)
            if FP32_DOT:
                acc_s += tl.dot(xt, s.to(tl.float32), input_precision="ieee")
            else:
                acc_s += tl.dot(xt, s.to(x.dtype))
            cur = tl.min(tl.where(tid > cur, tid, _NO_TENANT), axis=0)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        p_off += (BLOCK_K // 32) * stride_pw

    _epilogue(acc_b, acc_s, tid, offs_m, offs_n, m_mask, n_mask, scales_ptr, b_ptr, y_ptr, stride_ym, stride_yn,
              HAS_WEIGHT, HAS_BIAS, BF16_FIX)


@triton.jit
def mt_rows_kernel(
    x_ptr,
    w_ptr,
    p_ptr,
    scales_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    NW,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pt,
    stride_pn,
    stride_pw,
    stride_ym,
    stride_yn,
    M_BUCKET,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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

    # deltas: each row streams its own tenant's words; signs flip x on CUDA cores
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row0 = pid_m * BLOCK_M
    row1 = tl.minimum(row0 + BLOCK_M, M)
    p_off = offs_w[:, None] * stride_pw + offs_n[None, :] * stride_pn
    for r in range(row0, row1):
        t = tl.load(t_ptr + r).to(tl.int32)
        if t >= 0:
            part = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            p_ptrs = p_ptr + t.to(tl.int64) * stride_pt + p_off
            xr_ptrs = x_ptr + r * stride_xm + offs_k * stride_xk
            for k0 in range(0, K, BLOCK_K):
                k_mask = (k0 + offs_k) < K
                neg_x = -(tl.load(xr_ptrs, mask=k_mask, other=0.0).to(tl.float32))
                words = tl.load(p_ptrs, mask=((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :], other=0)
                # s·x = -x with its sign bit flipped where the sign bit is 1 (+1): shift, and-xor, add
                flip = sign_bits_kn(words, BLOCK_K, BLOCK_N)
                part += (neg_x.to(tl.int32, bitcast=True)[:, None] ^ flip).to(tl.float32, bitcast=True)
                xr_ptrs += BLOCK_K * stride_xk
                p_ptrs += (BLOCK_K // 32) * stride_pw
            row_sum = tl.sum(part, axis=0)  # [BLOCK_N]
            acc_s = tl.where((offs_m == r)[:, None], row_sum[None, :], acc_s)

    _epilogue(acc_b, acc_s, tid, offs_m, offs_n, m_mask, n_mask, scales_ptr, b_ptr, y_ptr, stride_ym, stride_yn,
              HAS_WEIGHT, HAS_BIAS, BF16_FIX)


_KEY = ["M_BUCKET", "N", "K", "HAS_WEIGHT", "FP32_DOT"]
mt_grouped_decode = triton.autotune(configs=to_triton_configs(MT_GROUPED_DECODE), key=_KEY)(mt_grouped_kernel)
mt_grouped_prefill = triton.autotune(configs=to_triton_configs(MT_GROUPED_PREFILL), key=_KEY)(mt_grouped_kernel)
mt_rows_tuned = triton.autotune(configs=to_triton_configs(MT_ROWS_CONFIGS), key=_KEY)(mt_rows_kernel)
