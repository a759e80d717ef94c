"""The torch path of the sign products, memory-bounded: ``x·Sᵀ`` and ``g·S`` from packed bits.

``S ∈ {−1, +1}^{N×K}`` is given by its packed bits (layout v1, :mod:`deltahub.codec.packing`):
``packed`` int32 ``[N, W]``, ``W = ceil(K/32)``, bit ``j`` of word ``w`` of row ``n`` is column
``32w + j``, LSB first, 1 = +1.

Nothing here ever builds the full ``[N, K]`` sign matrix: rows of ``S`` are unpacked in chunks of
at most :data:`CHUNK_BYTES` bytes of temporaries, used, and dropped: a chunk of rows of ``S`` is
expanded (a byte → 8 signs table, :func:`deltahub.codec.packing.sign_lut`) into the compute dtype and
multiplied with ``x``. (A byte-lookup variant — tabulating the 256 signed sums of every 8 columns of
``x`` and gathering them per packed byte, as LUT GEMV kernels do — was measured 1.5–3× slower than
this on the CPU for 576×1536 and 8192×576 at 1–4 rows, single thread, and dropped.)

On the CPU the products are computed in fp32 (fp16/bf16 inputs are upcast: exact signs, fp32 accumulation);
elsewhere they run in the input's dtype. This module imports only torch and deltahub.codec.
"""

from __future__ import annotations

import torch

from .packing import WORD_BITS, sign_lut

__all__ = [
    "CHUNK_BYTES",
    "unpack_rows",
    "sign_matmul_torch",
    "sign_matmul_t_torch",
    "sign_rows",
]

CHUNK_BYTES = 4 << 20
"""Bound on the temporaries of one chunk of unpacked sign rows (4 MiB; tests lower it)."""

_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    """The byte → 8 signs table (int64 [256], 8 int8 lanes) on ``device``."""
    lut = _LUT_CACHE.get(device)
    if lut is None:
        lut = sign_lut().to(device)
        _LUT_CACHE[device] = lut
    return lut


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype sign products are computed in: fp32 on the CPU, the input's dtype elsewhere."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def rows_per_chunk(k: int, elem_bytes: int) -> int:
    """Rows of ``S`` unpacked at once: temporaries of one row are an int32 index and an int64 of
    signs per packed byte (``1.5·K`` bytes) plus the row in the compute dtype; at least one row."""
    wide = -(-k // WORD_BITS) * WORD_BITS
    per_row = wide * (2 + elem_bytes)
    return max(1, CHUNK_BYTES // per_row)


def unpack_rows(packed_rows: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Signs of a few rows: int32 ``[R, W]`` packed → ``[R, K]`` of ``dtype`` (±1).

    The caller bounds ``R`` (see :func:`rows_per_chunk`); this is the only place rows of ``S`` are
    expanded, so a test can watch it.
    """
    r, w = packed_rows.shape
    idx = packed_rows.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    signs = torch.index_select(_lut(packed_rows.device), 0, idx).view(torch.int8).view(r, w * WORD_BITS)
    return signs[:, :k].to(dtype)


def sign_rows(packed: torch.Tensor, rows: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Signs of the selected rows (an embedding lookup): ``rows`` int64 ``[L]`` → ``[L, K]``."""
    return unpack_rows(packed.index_select(0, rows), k, dtype)


def sign_matmul_torch(x2d: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    """``z = x·Sᵀ`` without building ``S``.

    Args:
        x2d: ``[M, K]`` float activations (any float dtype, any device).
        packed: int32 ``[N, ceil(K/32)]`` packed signs of ``S`` on ``x2d``'s device.
        k: ``K``.

    Returns:
        ``[M, N]`` in :func:`compute_dtype` of ``x2d`` (fp32 on the CPU for fp16/bf16 inputs).
    """
    m = x2d.shape[0]
    n = packed.shape[0]
    dtype = compute_dtype(x2d)
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=dtype, device=x2d.device)
    xc = x2d.to(dtype)
    out = torch.empty((m, n), dtype=dtype, device=x2d.device)
    rows = rows_per_chunk(k, torch.empty((), dtype=dtype).element_size())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s = unpack_rows(packed[r0:r1], k, dtype)  # [r, K]
        out[:, r0:r1] = xc @ s.t()
    return out


def sign_matmul_t_torch(g2d: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    """``g·S`` without building ``S`` (the input gradient of ``x·Sᵀ``).

    Args:
        g2d: ``[M, N]`` float.
        packed: int32 ``[N, ceil(K/32)]``.
        k: ``K``.

    Returns:
        ``[M, K]`` in :func:`compute_dtype` of ``g2d``.
    """
    m = g2d.shape[0]
    n = packed.shape[0]
    dtype = compute_dtype(g2d)
    out = torch.zeros((m, k), dtype=dtype, device=g2d.device)
    if m == 0 or n == 0:
        return out
    gc = g2d.to(dtype)
    rows = rows_per_chunk(k, torch.empty((), dtype=dtype).element_size())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out.addmm_(gc[:, r0:r1], unpack_rows(packed[r0:r1], k, dtype))
    return out
