"""Triton kernel of ``sign_matmul``: ``y = x·Wᵀ + scale·(x·Sᵀ) (+ bias)`` in one pass over K.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y``. Each K step loads the ``x`` tile
once, the base weight tile (if any) and the ``BLOCK_K/32`` packed words per output row, unpacks the
words in registers (:func:`unpack_signs_kn`), and feeds two fp32 accumulators from the same ``x``
tile: ``acc_b += x·Wᵀ`` and ``acc_s += x·Sᵀ`` (the ±1 signs are exact in any dtype, so each
product is exact and only the fp32 sums round). The epilogue is ``y = acc_b + scale·acc_s + bias``,
rounded once to ``y``'s dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_common import (
    SIGN_MATMUL_DECODE,
    SIGN_MATMUL_PREFILL,
    store_tile,
    to_triton_configs,
    unpack_signs_kn,
)

__all__ = ["sign_matmul_kernel", "sign_matmul_decode", "sign_matmul_prefill"]


@triton.jit
def sign_matmul_kernel(
    x_ptr,  # [M, K] fp16/bf16/fp32
    w_ptr,  # [N, K] x's dtype (unused unless HAS_WEIGHT)
    p_ptr,  # [N, NW] int32 packed signs
    scale_ptr,  # 0-d fp32 (used if SCALE_FROM_PTR)
    scale_val,  # fp32 scalar (used otherwise)
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N] output
    M,
    N,
    K,
    NW,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_pn,
    stride_pw,
    stride_ym,
    stride_yn,
    M_BUCKET,  # autotuning key only
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_FROM_PTR: tl.constexpr,
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
    m_mask = offs_m < M
    n_mask = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    p_ptrs = p_ptr + offs_w[:, None] * stride_pw + offs_n[None, :] * stride_pn
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        words = tl.load(p_ptrs, mask=((k0 // 32 + offs_w) < NW)[:, None] & n_mask[None, :], other=0)
        s = unpack_signs_kn(words, BLOCK_K, BLOCK_N)
        if FP32_DOT:
            xf = x.to(tl.float32)
            acc_s += tl.dot(xf, s.to(tl.float32), input_precision="ieee")
            if HAS_WEIGHT:
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_b += tl.dot(xf, w.to(tl.float32), input_precision="ieee")
        else:
            acc_s += tl.dot(x, s.to(x.dtype))
            if HAS_WEIGHT:
                w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_b += tl.dot(x, w)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        p_ptrs += (BLOCK_K // 32) * stride_pw

    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_val
    store_tile(acc_b, scale * acc_s, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, stride_ym, stride_yn,
               HAS_WEIGHT, HAS_BIAS, BF16_FIX)


_KEY = ["M_BUCKET", "N", "K", "HAS_WEIGHT", "FP32_DOT"]
sign_matmul_decode = triton.autotune(configs=to_triton_configs(SIGN_MATMUL_DECODE), key=_KEY)(sign_matmul_kernel)
"""Autotuned for decode batches (``M <= DECODE_MAX_M``)."""
sign_matmul_prefill = triton.autotune(configs=to_triton_configs(SIGN_MATMUL_PREFILL), key=_KEY)(sign_matmul_kernel)
"""Autotuned for prefill batches."""
