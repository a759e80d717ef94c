"""Packing layout v1 of deltahub, as far as the kernels need it (re-implemented here on purpose:
``deltahub.kernels`` imports nothing else of deltahub).

For a delta ``D`` of shape ``[N, K]`` (``N`` = out_features, ``K`` = in_features) the signs are
packed along ``K`` into ``int32`` words: packed shape ``[N, ceil(K/32)]``; bit ``j`` (LSB first) of
word ``w`` of row ``n`` is column ``k = 32*w + j``; bit 1 means ``+1``, bit 0 means ``-1``; padding
bits (columns ``K .. 32*ceil(K/32) - 1``) are zero and ignored.
"""

from __future__ import annotations

import torch

__all__ = ["WORD_BITS", "words_per_row", "unpack_signs_dense"]

WORD_BITS = 32
"""Sign bits per packed ``int32`` word (layout v1)."""


def words_per_row(k: int) -> int:
    """Packed words per row for ``k`` columns: ``ceil(k / 32)``."""
    return (k + WORD_BITS - 1) // WORD_BITS


def unpack_signs_dense(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expand packed signs into a dense ``+1/-1`` tensor (on ``packed``'s device).

    This builds the whole matrix (plus an ``int32`` temporary of the same element count): it is
    for the references and tests, not a memory-bounded path.

    Args:
        packed: ``int32`` ``[..., ceil(k/32)]`` (any leading dims, e.g. ``[N, W]`` or ``[T, N, W]``).
        k: number of columns of the unpacked matrix.
        dtype: dtype of the result.

    Returns:
        ``dtype`` ``[..., k]`` of ``+1`` / ``-1``.
    """
    shifts = torch.arange(WORD_BITS, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [..., W, 32]; >> is arithmetic: bit 31 still ok
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * WORD_BITS)[..., :k]
    return (bits * 2 - 1).to(dtype)
