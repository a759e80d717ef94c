"""Bit packing of sign matrices -- packing layout v1 (a FIXED on-disk format).

Layout v1, for a 2-D delta ``D`` of shape ``[N, K]`` (``N`` = out_features rows,
``K`` = in_features columns):

* signs are packed along the LAST axis (``K``) into 32-bit words stored as
  ``torch.int32`` whose bit pattern is a little-endian ``uint32``; the packed tensor has
  shape ``[N, W]`` with ``W = ceil(K / 32)``;
* bit order is LSB-first: bit ``j`` of word ``w`` holds column ``k = 32*w + j``.
  Equivalently, viewing the int32 tensor's bytes as ``uint8`` (little-endian), byte ``b``
  of a row holds columns ``8b .. 8b+7`` with column ``8b+i`` at bit ``i`` -- exactly
  ``numpy.packbits(bits, axis=-1, bitorder="little")``;
* bit 1 means sign ``+1``, bit 0 means ``-1``; ``bit = (D >= 0)``, so a zero delta
  (``+0.0`` or ``-0.0``) gets ``+1`` and NaN gets bit 0 (callers reject NaN earlier);
* padding columns ``K .. 32*W - 1`` are zero bits; readers ignore them.

This module imports nothing from the rest of deltahub.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codecs import CodecError

__all__ = [
    "PackingLayout",
    "PACKING_V1",
    "WORD_BITS",
    "packed_shape",
    "pack_signs",
    "unpack_signs",
    "sign_lut",
    "gather_signs",
    "check_packed",
    "pack_signs_into",
]

logger = logging.getLogger(__name__)

WORD_BITS = 32
"""Bits per packed word (layout v1)."""

_DEFAULT_CHUNK_BYTES = 64 << 20

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("deltahub.codec.packing assumes a little-endian host")


@dataclass(frozen=True)
class PackingLayout:
    """Description of a packing layout, written into manifests next to packed tensors.

    Only the v1 layout exists; :meth:`from_json` refuses anything else.
    """

    version: int = 1
    axis: str = "last"
    word_bits: int = 32
    word_dtype: str = "int32"
    byte_order: str = "little"
    bit_order: str = "lsb_first"
    one_means: str = "+1"
    zero_delta_sign: str = "+1"
    padding: str = "zero bits up to a multiple of word_bits"

    def to_json(self) -> dict[str, Any]:
        """Return the layout as a JSON-serialisable ``dict`` (field name -> value)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PackingLayout":
        """Parse a layout written by :meth:`to_json`.

        Raises:
            CodecError: ``d`` is not a dict, has an unknown version, an unknown or missing
                field, or a field whose value differs from the v1 layout.
        """
        if not isinstance(d, dict):
            raise CodecError(f"packing layout must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if type(version) is not int or version != PACKING_V1.version:  # noqa: E721 (True == 1)
            raise CodecError(
                f"unknown packing layout version {version!r} (this deltahub reads version "
                f"{PACKING_V1.version} only)"
            )
        expected = PACKING_V1.to_json()
        unknown = sorted(set(d) - set(expected))
        if unknown:
            raise CodecError(f"unknown packing layout field(s) {unknown} in version {version}")
        missing = sorted(set(expected) - set(d))
        if missing:
            raise CodecError(f"packing layout version {version} is missing field(s) {missing}")
        for name, want in expected.items():
            if type(d[name]) is not type(want) or d[name] != want:
                raise CodecError(
                    f"packing layout field {name!r} is {d[name]!r}; version {version} "
                    f"requires {want!r}"
                )
        return cls(**d)


PACKING_V1 = PackingLayout()
"""The one packing layout this code reads and writes."""


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape ``(N, ceil(K/32))`` of the int32 packed signs of an ``[N, K]`` matrix."""
    if n < 0 or k < 0:
        raise CodecError(f"matrix shape must be non-negative, got [{n}, {k}]")
    return (n, (k + WORD_BITS - 1) // WORD_BITS)


def _rows_per_chunk(row_bytes: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one chunk's temporaries take about ``chunk_bytes``
    (at least one row). Depends only on the arguments, never on the machine."""
    return max(1, chunk_bytes // max(1, row_bytes))


def pack_signs_into(delta: torch.Tensor, out_bytes: np.ndarray) -> None:
    """Pack the signs of ``delta`` into an existing byte buffer (no size checks).

    Args:
        delta: ``[R, K]`` float tensor (any float dtype, CPU).
        out_bytes: ``uint8`` numpy array ``[R, 4*ceil(K/32)]`` -- the bytes of the int32
            packed words of these rows. Its padding bytes must already be zero; bytes
            ``0 .. ceil(K/8)-1`` of each row are overwritten.
    """
    bits = (delta >= 0).numpy()  # bool [R, K]; NaN -> False, -0.0 -> True
    packed = np.packbits(bits, axis=-1, bitorder="little")  # uint8 [R, ceil(K/8)]
    out_bytes[:, : packed.shape[1]] = packed


def pack_signs(delta: torch.Tensor, *, chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Pack the signs of a 2-D delta (layout v1).

    Args:
        delta: ``[N, K]`` tensor of any floating dtype on the CPU.
        chunk_bytes: bound on temporaries; rows are processed in fixed-size row chunks.

    Returns:
        ``torch.int32`` tensor ``[N, ceil(K/32)]``: bit ``j`` of word ``w`` of row ``n`` is
        ``delta[n, 32*w + j] >= 0``; padding bits are zero.

    Raises:
        CodecError: ``delta`` is not a 2-D floating-point CPU tensor.
    """
    if delta.dim() != 2:
        raise CodecError(f"pack_signs needs a 2-D tensor, got shape {list(delta.shape)}")
    if not delta.is_floating_point():
        raise CodecError(f"pack_signs needs a floating-point tensor, got {delta.dtype}")
    if delta.device.type != "cpu":
        raise CodecError(f"pack_signs runs on the CPU, got a tensor on {delta.device}")
    n, k = delta.shape
    _, w = packed_shape(n, k)
    out = torch.zeros((n, w), dtype=torch.int32)
    if n == 0 or k == 0:
        return out
    out_bytes = out.numpy().view(np.uint8)  # [N, 4W], shares memory with `out`
    rows = _rows_per_chunk(k * 2 + (k + 7) // 8, chunk_bytes)  # bool bits + packed bytes
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        pack_signs_into(delta[r0:r1], out_bytes[r0:r1])
    return out


_SIGN_LUT: torch.Tensor | None = None


def sign_lut() -> torch.Tensor:
    """Return the byte -> signs table as ``torch.int64`` ``[256]``.

    Entry ``b`` holds eight ``int8`` values (little-endian bytes of the int64): byte ``i``
    is ``+1`` if bit ``i`` of ``b`` is set, else ``-1``. Gathering it with the bytes of a
    packed row (``torch.index_select``, one 8-byte element per packed byte, much faster
    than gathering rows of a ``[256, 8]`` float table) and viewing the result as ``int8``
    yields that row's signs in column order.
    """
    global _SIGN_LUT
    if _SIGN_LUT is None:
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bit = torch.arange(8, dtype=torch.int64).unsqueeze(0)
        signs = (((byte >> bit) & 1) * 2 - 1).to(torch.int8).contiguous()  # [256, 8]
        _SIGN_LUT = signs.view(torch.int64).reshape(256)
    return _SIGN_LUT


def gather_signs(packed_bytes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Expand packed bytes into ``int8`` signs.

    Args:
        packed_bytes: ``torch.uint8`` ``[R, B]`` (the bytes of int32 packed words) or
            ``torch.int32`` ``[R*B]`` byte values already widened to int32.
        out: optional ``torch.int64`` ``[R*B]`` buffer for the result.

    Returns:
        ``torch.int64`` ``[R*B]``; ``.view(torch.int8).view(R, 8*B)`` holds ``+1``/``-1``
        for columns ``0 .. 8*B - 1`` of each row.
    """
    idx = packed_bytes.reshape(-1)
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    if out is None:
        return torch.index_select(sign_lut(), 0, idx)
    return torch.index_select(sign_lut(), 0, idx, out=out)


def check_packed(packed: torch.Tensor, k: int, n: int | None = None) -> None:
    """Validate packed signs for a matrix with ``k`` columns (and ``n`` rows if given).

    Raises:
        CodecError: ``packed`` is not a 2-D int32 CPU tensor of shape ``[n, ceil(k/32)]``.
    """
    if not isinstance(packed, torch.Tensor):
        raise CodecError(f"packed signs must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise CodecError(f"packed signs must be torch.int32, got {packed.dtype}")
    if packed.dim() != 2:
        raise CodecError(f"packed signs must be 2-D, got shape {list(packed.shape)}")
    if packed.device.type != "cpu":
        raise CodecError(f"packed signs must be on the CPU, got {packed.device}")
    if k < 0:
        raise CodecError(f"column count k must be non-negative, got {k}")
    want_w = (k + WORD_BITS - 1) // WORD_BITS
    if packed.shape[1] != want_w:
        raise CodecError(
            f"packed signs have {packed.shape[1]} words per row; k={k} columns need "
            f"ceil(k/32)={want_w}"
        )
    if n is not None and packed.shape[0] != n:
        raise CodecError(f"packed signs have {packed.shape[0]} rows; expected {n}")


def unpack_signs(
    packed: torch.Tensor,
    k: int,
    dtype: torch.dtype = torch.float32,
    *,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Unpack signs packed by :func:`pack_signs` (layout v1).

    Args:
        packed: ``torch.int32`` ``[N, ceil(k/32)]``.
        k: number of columns ``K`` of the original matrix.
        dtype: dtype of the result.
        chunk_bytes: bound on temporaries (row chunks).

    Returns:
        ``[N, k]`` tensor of ``dtype`` holding ``+1`` / ``-1``; padding bits are ignored.

    Raises:
        CodecError: ``packed`` is not int32, not 2-D, or its width is not ``ceil(k/32)``.
    """
    check_packed(packed, k)
    n, w = packed.shape
    out = torch.empty((n, k), dtype=dtype)
    if n == 0 or k == 0:
        return out
    packed_bytes = packed.contiguous().view(torch.uint8)  # [N, 4W]
    wide = w * WORD_BITS
    # int32 indices + int64 gathered signs per row
    rows = _rows_per_chunk(w * 4 * (4 + 8), chunk_bytes)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        signs = gather_signs(packed_bytes[r0:r1]).view(torch.int8).view(r1 - r0, wide)
        out[r0:r1] = signs[:, :k]
    return out
