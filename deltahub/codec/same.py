"""Codec ``same`` (v1): the tensor is bit-identical to the base tensor of the same name; nothing is
stored. Decoding is ``W_base.to(D)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Encoded, JSONValue, PartSpec, TensorCodec, as_output
from .codecs import CodecError

__all__ = ["SameCodec"]


class SameCodec(TensorCodec):
    name = "same"
    version = 1
    part_names = ()
    uses_base = True
    stores_delta = False

    def accepts(self, shape, dtype, base_shape, base_dtype) -> bool:  # type: ignore[no-untyped-def]
        """Chosen from the bytes (bit-identical to the base), never planned."""
        return False

    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        return Encoded(parts={}, rel_recon_error=0.0, rel_delta_norm=0.0)

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype,
                   params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        return {}

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        if base is None:
            raise CodecError("codec same needs the base tensor")
        return as_output(base, out_dtype, out)
