"""Triton kernel of ``apply_delta``: ``out = W + scale·S`` (fp32 sum, one rounding), elementwise.

A program handles a ``[BLOCK_M, BLOCK_K]`` tile of the ``[N, K]`` weight: it reads the tile of W,
the ``BLOCK_K/32`` packed words of each of its rows (expanded in registers), and writes the tile of
``out``. Bytes moved: ``N·K·(size(W) + size(out)) + N·K/8``: memory speed on a GPU. The result is
bit-identical to deltahub's ``sign1`` reconstruction ``(W.float() + scale·S).to(dtype)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_common import rtne_for_bf16, unpack_signs_nk

__all__ = ["apply_delta_kernel"]


@triton.jit
def apply_delta_kernel(
    w_ptr,  # [N, K] fp16/bf16/fp32
    p_ptr,  # [N, NW] int32
    scale_ptr,  # 0-d fp32 (if SCALE_FROM_PTR)
    scale_val,  # fp32 scalar (otherwise)
    o_ptr,  # [N, K] output (may alias w_ptr)
    N,
    K,
    NW,
    stride_wn,
    stride_wk,
    stride_pn,
    stride_pw,
    stride_on,
    stride_ok,
    SCALE_FROM_PTR: tl.constexpr,
    BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    words = tl.load(
        p_ptr + offs_n[:, None] * stride_pn + offs_w[None, :] * stride_pw,
        mask=n_mask[:, None] & (offs_w < NW)[None, :],
        other=0,
    )
    s = unpack_signs_nk(words, BLOCK_M, BLOCK_K).to(tl.float32)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_val
    out = w.to(tl.float32) + scale * s  # scale·s is exact: one rounding, then the cast
    out = rtne_for_bf16(out, BF16_FIX)
    tl.store(o_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok, out.to(o_ptr.dtype.element_ty), mask=mask)

