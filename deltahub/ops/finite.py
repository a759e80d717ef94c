"""The non-finite rule of ``add`` and ``compress``: one rule for every tensor.

A base or a fine-tune holding NaN or ±Inf in any floating tensor (1-D, matrix, embedding, whatever
its codec would be) is refused with a one-line :class:`~deltahub.errors.CodecError` naming the
tensor and the first bad value, before the model is named (what was written is rolled back), unless
``allow_nonfinite`` (``--allow-nonfinite``). Then dense tensors keep the values bit for bit, and a
matrix that would be ``sign1`` but whose delta is not finite is stored ``dense`` instead: the sign
of ``NaN`` or ``Inf − Inf`` means nothing, and one scale of ``mean|Δ|`` would be NaN/Inf for the
whole matrix.
"""

from __future__ import annotations

import math

import torch

from deltahub.errors import CodecError

ALLOW_HINT = "fix the checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) to store such tensors as they are"

#: Elements checked per step (bounded temporaries: one bool per element of a chunk).
CHUNK = 1 << 22


def nonfinite_summary(tensor: torch.Tensor) -> str | None:
    """None when ``tensor`` is not floating or all its values are finite; else where the first NaN
    or Inf is and how many there are, e.g. ``"NaN at [3, 5] (2 non-finite values)"``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.reshape(-1)
    widen = not _isfinite_supported(flat.dtype)
    count = 0
    first: int | None = None
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        ok = torch.isfinite(part.float() if widen else part)
        if bool(ok.all()):
            continue
        bad = ~ok
        count += int(bad.sum())
        if first is None:
            first = start + int(bad.nonzero()[0, 0])
    if first is None:
        return None
    value = float(flat[first])
    kind = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    index, rest = [], first
    for dim in reversed(tensor.shape):
        index.append(rest % dim)
        rest //= dim
    return f"{kind} at {list(reversed(index))} ({count} non-finite value{'s' if count > 1 else ''})"


def _isfinite_supported(dtype: torch.dtype) -> bool:
    try:
        torch.isfinite(torch.zeros(1, dtype=dtype))
    except (RuntimeError, TypeError):
        return False
    return True


def check_finite(tensor: torch.Tensor, name: str, what: str) -> None:
    """Raise :class:`CodecError` when tensor ``name`` of ``what`` (``"the base"``, ``"the
    fine-tune"``) holds NaN or Inf."""
    problem = nonfinite_summary(tensor)
    if problem is not None:
        raise CodecError(f"tensor {name!r} of {what} holds {problem}", ALLOW_HINT)


__all__ = ["ALLOW_HINT", "CHUNK", "check_finite", "nonfinite_summary"]
