"""Codec identifiers and the codec error type.

A *codec* says how one tensor of a fine-tuned model is stored relative to the shared
base model:

* ``SAME``  -- the tensor is bit-identical to the base tensor; nothing is stored.
* ``SIGN1`` -- BitDelta: the signs of ``delta = finetuned - base`` packed one bit per
  element (see :mod:`deltahub.codec.packing`) plus one fp32 scale per matrix
  (see :mod:`deltahub.codec.sign1`).
* ``DENSE`` -- the fine-tuned tensor itself, stored as is.

This module imports nothing from the rest of deltahub.
"""

from __future__ import annotations

import enum

__all__ = ["Codec", "CODEC_VERSIONS", "CodecError", "HintedError"]


class Codec(str, enum.Enum):
    """How one tensor is stored. The value is the string written into manifests."""

    SAME = "same"
    """Tensor identical to the base tensor; stores nothing."""

    SIGN1 = "sign1"
    """Packed signs (int32 ``[N, ceil(K/32)]``) plus one fp32 scale per matrix."""

    DENSE = "dense"
    """The fine-tuned tensor itself."""

    def __str__(self) -> str:  # "sign1", not "Codec.SIGN1", in messages and manifests
        return self.value


CODEC_VERSIONS: dict[Codec, int] = {
    Codec.SAME: 1,
    Codec.SIGN1: 1,
    Codec.DENSE: 1,
}
"""Format version of each codec; bumped whenever a codec's stored layout changes."""


class HintedError(Exception):
    """``message`` (what happened) and ``hint`` (what to do next), like every deltahub error. The
    layers that import nothing of ``deltahub.errors`` (this package, and the runtime above it) build
    their errors on it; the CLI's table maps them."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CodecError(HintedError, ValueError):
    """Bad input to a codec: shape mismatch, non-finite values, bad packed shape or dtype,
    or an unknown packing layout."""


class NonFiniteDeltaError(CodecError):
    """The difference to encode holds NaN or Inf (a sign and a ``mean|Δ|`` scale cannot hold it)."""
