"""Triton helpers shared by the kernels: sign unpacking in registers and the autotuning configs.

Importing this module imports triton: only the dispatch functions (``deltahub.kernels.ops``) import
it, and only once :func:`deltahub.kernels.backend.triton_can_run` said yes.

Config lists are plain dicts (block sizes + ``num_warps``/``num_stages``) so that the ahead-of-time
compile test can compile every one of them for sm_80 and sm_90.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backend import interpreter_enabled

__all__ = [
    "unpack_signs_kn",
    "unpack_signs_nk",
    "rtne_for_bf16",
    "store_tile",
    "sign_bits_kn",
    "add_planes_kn3",
    "SIGN_MATMUL_DECODE",
    "SIGN_MATMUL_PREFILL",
    "MT_GROUPED_DECODE",
    "MT_GROUPED_PREFILL",
    "MT_ROWS_CONFIGS",
    "APPLY_DELTA_CONFIGS",
    "PLANES_DECODE",
    "PLANES_PREFILL",
    "MT_PLANES_GROUPED_DECODE",
    "MT_PLANES_GROUPED_PREFILL",
    "MT_PLANES_ROWS_CONFIGS",
    "INTERPRET_CONFIG",
    "to_triton_configs",
    "m_bucket",
    "DECODE_MAX_M",
]

DECODE_MAX_M = 64
"""Batches of at most this many rows use the decode configs (small BLOCK_M); larger ones prefill."""


_MINUS_ONE_F32_BITS = tl.constexpr(-1082130432)  # 0xBF800000, the bits of -1.0f
_SIGN_BIT = tl.constexpr(-2147483648)  # 0x80000000


@triton.jit
def unpack_signs_kn(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Expand packed words into fp32 signs, transposed for ``tl.dot(x, s)``.

    Args:
        words: ``int32`` ``[BLOCK_K // 32, BLOCK_N]``: word ``w`` of output row ``n`` (layout v1).
    Returns:
        ``float32`` ``[BLOCK_K, BLOCK_N]``: element ``(32*w + j, n)`` is ``+1.0`` if bit ``j`` of
        ``words[w, n]`` is set, else ``-1.0``. Each word is read once and expanded in registers:
        bit ``j`` is shifted to bit 31 and XOR-ed into the bits of ``-1.0f`` (a shift and one
        and/xor per element; no int-to-float conversion).
    """
    shifts = 31 - tl.arange(0, 32)
    bits = (words[:, None, :] << shifts[None, :, None]) & _SIGN_BIT  # [BK/32, 32, BN]
    signs = (bits ^ _MINUS_ONE_F32_BITS).to(tl.float32, bitcast=True)
    return tl.reshape(signs, (BLOCK_K, BLOCK_N))


@triton.jit
def unpack_signs_nk(words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expand packed words into fp32 signs in the weight's own orientation.

    Args:
        words: ``int32`` ``[BLOCK_N, BLOCK_K // 32]`` (layout v1).
    Returns:
        ``float32`` ``[BLOCK_N, BLOCK_K]``: element ``(n, 32*w + j)`` is ``+1.0`` if bit ``j`` of
        ``words[n, w]`` is set, else ``-1.0``.
    """
    shifts = 31 - tl.arange(0, 32)
    bits = (words[:, :, None] << shifts[None, None, :]) & _SIGN_BIT  # [BN, BK/32, 32]
    signs = (bits ^ _MINUS_ONE_F32_BITS).to(tl.float32, bitcast=True)
    return tl.reshape(signs, (BLOCK_N, BLOCK_K))


@triton.jit
def sign_bits_kn(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed words -> fp32 sign-bit masks, transposed like :func:`unpack_signs_kn`.

    Args:
        words: ``int32`` ``[BLOCK_K // 32, BLOCK_N]`` (layout v1).
    Returns:
        ``int32`` ``[BLOCK_K, BLOCK_N]``: element ``(32*w + j, n)`` is ``0x80000000`` if bit ``j``
        of ``words[w, n]`` is set, else 0 (bit ``j`` shifted to bit 31 and masked: two integer
        ops per element). XOR-ing it into the bits of ``-x`` gives ``s·x`` exactly.
    """
    shifts = 31 - tl.arange(0, 32)
    bits = (words[:, None, :] << shifts[None, :, None]) & _SIGN_BIT  # [BK/32, 32, BN]
    return tl.reshape(bits, (BLOCK_K, BLOCK_N))


@triton.jit
def add_planes_kn3(tile, p_ptrs, s_ptr, k0, offs_w, offs_n, w_mask, n_mask, G, stride_pp, stride_sp, stride_sn,
                   stride_sc, NUM_PLANES: tl.constexpr, GROUPED: tl.constexpr):
    """``tile + Σᵢ sᵢ ⊙ Sᵢ`` over one K step of the planes codec, transposed for ``tl.dot(x, ·)``.

    Args:
        tile: fp32 ``[BLOCK_K // 32, 32, BLOCK_N]``: element ``(w, j, n)`` is column ``k0 + 32*w + j``
            of output row ``n`` (the base weight tile, or zeros / ``-0.0`` for the delta alone).
        p_ptrs: ``[BLOCK_K // 32, BLOCK_N]`` pointers to plane 0's words of this K step (layout v1);
            plane ``i`` is at ``+ i * stride_pp``.
        s_ptr: pointer to plane 0's scales (fp32 ``[R, C]`` with strides ``stride_sn`` / ``stride_sc``:
            0 for a broadcast dimension, so per-matrix, per-row and per-group scales share the code);
            plane ``i`` at ``+ i * stride_sp``.
        k0: first column of the step; offs_w: ``arange(BLOCK_K // 32)``; offs_n: the tile's rows.
        w_mask: ``[BLOCK_K // 32, BLOCK_N]`` words in bounds; n_mask: ``[BLOCK_N]``.
        G: columns per scale group (a multiple of 32; read only if ``GROUPED``).
        NUM_PLANES: ``P`` (unrolled). GROUPED: the scales vary along K (per word: a word's 32
            columns always share a group, since G is a multiple of 32; no constraint on BLOCK_K).

    Returns:
        fp32 ``[BLOCK_K // 32, 32, BLOCK_N]``: planes added in order (as deltahub's decode does:
        bit-identical fp32 sums). ``sᵢ·Sᵢ`` is ``-sᵢ`` with its sign bit XOR-ed by the packed bit
        moved to bit 31 (shift, and, xor per element; exact). Columns past K get ``±s`` (x is 0
        there, and so is W).
    """
    shifts = 31 - tl.arange(0, 32)
    if GROUPED:
        s_off = ((k0 + offs_w * 32) // G)[:, None] * stride_sc + offs_n[None, :] * stride_sn
    else:
        s_off = offs_n * stride_sn
    for i in tl.static_range(NUM_PLANES):
        words = tl.load(p_ptrs + i * stride_pp, mask=w_mask, other=0)
        if GROUPED:
            s = tl.load(s_ptr + i * stride_sp + s_off, mask=w_mask, other=0.0).to(tl.float32)
            neg = (-s).to(tl.int32, bitcast=True)[:, None, :]
        else:
            s = tl.load(s_ptr + i * stride_sp + s_off, mask=n_mask, other=0.0).to(tl.float32)
            neg = (-s).to(tl.int32, bitcast=True)[None, None, :]
        bits = (words[:, None, :] << shifts[None, :, None]) & _SIGN_BIT  # [BK/32, 32, BN]
        tile += (bits ^ neg).to(tl.float32, bitcast=True)
    return tile


@triton.jit
def rtne_for_bf16(y, FIX: tl.constexpr):
    """Round fp32 ``y`` to the nearest-even bfloat16 value (kept in fp32) when ``FIX``.

    Only for the interpreter: its fp32 -> bf16 cast truncates, while compiled kernels round to
    nearest even. After this, the (truncating) cast is exact, so interpreter and GPU agree.
    """
    if FIX:
        bits = y.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits & -65536).to(tl.float32, bitcast=True)
    return y


@triton.jit
def store_tile(acc_b, delta, offs_m, offs_n, m_mask, n_mask, b_ptr, y_ptr, stride_ym, stride_yn,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_FIX: tl.constexpr):
    """The epilogue of the matmul kernels: store ``y = acc_b + delta (+ bias)`` rounded once.

    Args:
        acc_b: fp32 ``[BLOCK_M, BLOCK_N]`` base accumulator (ignored unless ``HAS_WEIGHT``).
        delta: fp32 ``[BLOCK_M, BLOCK_N]``, the scaled sign products.
        offs_m, offs_n / m_mask, n_mask: the tile's row and column indices and their bounds masks.
        b_ptr: bias ``[N]`` (read if ``HAS_BIAS``); y_ptr: ``[M, N]`` output, strides ``stride_ym/yn``.
    """
    y = delta
    if HAS_WEIGHT:
        y = acc_b + y
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y + bias[None, :]
    y = rtne_for_bf16(y, BF16_FIX)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


# sign_matmul / multi-tenant grouped: decode (M <= 64: one or few row blocks, memory-bound, many N
# blocks for parallelism) and prefill (square-ish tiles, compute-bound). Checked with ptxas -v for
# sm_90 (fp16, specialized): none of these spills registers (128x128x32 with 4 warps and the
# grouped 128x64x64 with 4 warps did, hence 8 warps there). Not yet tuned on a GPU.
SIGN_MATMUL_DECODE = [
    _cfg(16, 32, 128, 4, 4),
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 32, 256, 4, 3),
    _cfg(16, 64, 256, 8, 3),
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 64, 128, 4, 3),
]
SIGN_MATMUL_PREFILL = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4),
]
MT_GROUPED_DECODE = [
    _cfg(16, 32, 128, 4, 3),
    _cfg(16, 64, 128, 4, 3),
    _cfg(32, 64, 64, 4, 3),
    _cfg(64, 64, 64, 4, 3),
]
MT_GROUPED_PREFILL = [
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
]
# per-row (BGMV-style) multi-tenant kernel: BLOCK_M rows per program, CUDA-core sign products.
MT_ROWS_CONFIGS = [
    _cfg(16, 32, 128, 4, 2),
    _cfg(16, 64, 64, 4, 2),
    _cfg(16, 64, 128, 8, 2),
    _cfg(16, 128, 64, 8, 2),
]
# planes (k sign planes, scales per matrix / row / group): the same tile shapes as sign1, whose
# K-step work they resemble (one unpacked [BLOCK_K, BLOCK_N] fp32 tile, now the sum of the planes and
# the base, then ONE tl.dot instead of two). Not yet tuned on a GPU (bench/kernels_gpu.py measures).
PLANES_DECODE = SIGN_MATMUL_DECODE
PLANES_PREFILL = SIGN_MATMUL_PREFILL
MT_PLANES_GROUPED_DECODE = MT_GROUPED_DECODE
MT_PLANES_GROUPED_PREFILL = MT_GROUPED_PREFILL
MT_PLANES_ROWS_CONFIGS = MT_ROWS_CONFIGS
# apply_delta: elementwise over [N, K] tiles (BLOCK_M = rows of W). One fixed config, not autotuned:
# it is a streaming copy (any reasonable tile runs at memory speed), and autotuning would re-run it
# on `out`, which may alias the weight (in-place update).
APPLY_DELTA_CONFIGS = [_cfg(16, 0, 256, 4, 1)]

INTERPRET_CONFIG = _cfg(16, 16, 32, 1, 1)
"""Small blocks for the interpreter (tests use several shapes so K and N are not multiples)."""


def to_triton_configs(configs: list[dict]) -> list[triton.Config]:
    """The dicts above as ``triton.Config`` objects (for ``triton.autotune``)."""
    out = []
    for c in configs:
        meta = {k: v for k, v in c.items() if k.startswith("BLOCK_") and v}
        out.append(triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


def m_bucket(m: int) -> int:
    """Autotuning key for the row count: the next power of two (1, 2, 4, ... capped at 4096)."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def bf16_fix(dtype_is_bf16: bool) -> bool:
    """Whether :func:`rtne_for_bf16` must round before a bf16 store (the interpreter only)."""
    return dtype_is_bf16 and interpreter_enabled()


def use_fp32_dot(is_fp32: bool) -> bool:
    """Whether ``tl.dot`` runs on fp32 operands (IEEE): always under the interpreter (its bf16 dot
    is wrong), and for fp32 activations on a GPU (no TF32 rounding of the inputs)."""
    return is_fp32 or interpreter_enabled()
