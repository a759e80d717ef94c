"""Codec ``dense`` (v1): the tensor itself, in its own dtype (one part, ``tensor``). Every tensor of a
base uses it; in a delta, 1-D and non-float tensors, embeddings stored dense, resized vocabularies and
tensors the base lacks. Decoding is ``W.to(D)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Encoded, JSONValue, PartSpec, TensorCodec, as_output
from .codecs import CodecError

__all__ = ["DenseCodec"]


class DenseCodec(TensorCodec):
    name = "dense"
    version = 1
    part_names = ("tensor",)
    uses_base = False
    stores_delta = False
    compressible = True

    def accepts(self, shape, dtype, base_shape, base_dtype) -> bool:  # type: ignore[no-untyped-def]
        return True

    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        return Encoded(parts={"tensor": finetuned}, rel_recon_error=0.0)

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype,
                   params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        return {"tensor": PartSpec(dtype, tuple(shape))}

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        t = parts.get("tensor")
        if t is None:
            raise CodecError("codec dense needs its part 'tensor'")
        return as_output(t, out_dtype, out)
