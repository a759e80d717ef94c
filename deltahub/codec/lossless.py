"""Codec ``lossless`` (v1): the exact fine-tuned tensor, as a delta that compresses.

The fine-tuned and base tensors (same shape and dtype: fp16, bf16 or fp32) are XOR-ed bit for bit,
and the result is split by byte significance: part ``byte{j}`` (uint8, the tensor's shape) holds byte
``j`` (little-endian: ``byte0`` the least significant) of every element. A fine-tune changes the
sign and exponent bits of few weights, so the high byte planes are mostly zeros and the store's zstd
(``compressible``: zstd level 3 where it saves ≥ 5 %) shrinks them far more than it can shrink the
raw weights; the low, mantissa planes stay near-random.

Decoding reassembles the XOR and applies it to the base's bits: **bit-exact**, NaN payloads, infinities
and negative zero included. In delta mode the tensor is used as decoded (no operator).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import Encoded, JSONValue, PartSpec, TensorCodec, as_output
from .codecs import CodecError

__all__ = ["LosslessCodec", "BITS_VIEW"]

#: the integer view of each supported float dtype (same width).
BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class LosslessCodec(TensorCodec):
    name = "lossless"
    version = 1
    uses_base = True
    compressible = True

    def accepts(self, shape, dtype, base_shape, base_dtype) -> bool:  # type: ignore[no-untyped-def]
        return (base_shape is not None and len(shape) >= 1 and tuple(shape) == tuple(base_shape)
                and dtype == base_dtype and dtype in BITS_VIEW)

    def parts_for(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        return tuple(f"byte{j}" for j in range(int(params["width"])))  # type: ignore[arg-type]

    def check_params(self, params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> dict[str, JSONValue]:
        width = params.get("width")
        if set(params) != {"width"} or not isinstance(width, int) or isinstance(width, bool) or width not in (2, 4):
            raise CodecError(f"lossless takes one parameter, width 2 or 4, got {dict(params)}")
        return {"width": width}

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        if dtype not in BITS_VIEW or dtype.itemsize != params["width"]:
            raise CodecError(f"lossless stores fp16, bf16 or fp32 of width {params['width']}, not {dtype}")
        return {p: PartSpec(torch.uint8, tuple(shape)) for p in self.parts_for(shape, params)}

    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        if base is None or base.dtype != finetuned.dtype or base.shape != finetuned.shape or finetuned.dtype not in BITS_VIEW:
            raise CodecError("lossless needs a base tensor of the fine-tune's shape and dtype (fp16, bf16 or fp32)")
        ints = BITS_VIEW[finetuned.dtype]
        x = finetuned.contiguous().view(ints) ^ base.contiguous().view(ints)
        width = finetuned.dtype.itemsize
        planes = x.contiguous().view(torch.uint8).reshape(*x.shape, width)  # little-endian bytes
        parts = {f"byte{j}": planes[..., j].contiguous() for j in range(width)}
        return Encoded(parts=parts, params={"width": width}, rel_recon_error=0.0)

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        if base is None:
            raise CodecError("codec lossless needs the base tensor")
        width = int(params["width"])  # type: ignore[arg-type]
        if base.dtype.itemsize != width or base.dtype not in BITS_VIEW:
            raise CodecError(f"the base tensor is {base.dtype}, not a {width}-byte float")
        stacked = torch.stack([parts[f"byte{j}"] for j in range(width)], dim=-1).contiguous()
        ints = BITS_VIEW[base.dtype]
        exact = (stacked.view(ints).reshape(base.shape) ^ base.contiguous().view(ints)).view(base.dtype)
        return as_output(exact, out_dtype, out)
