"""Pure tensor math for deltahub's codecs (BitDelta 1-bit deltas).

Imports only torch, numpy and the standard library -- nothing from the rest of deltahub.
"""

from .codecs import CODEC_VERSIONS, Codec, CodecError, NonFiniteDeltaError
from .packing import (
    PACKING_V1,
    WORD_BITS,
    PackingLayout,
    pack_signs,
    packed_shape,
    unpack_signs,
)
from .sign1 import (
    DeltaStats,
    Sign1Encoded,
    decode_sign1,
    encode_sign1,
    fp32_scale,
    reference_decode_sign1,
)

__all__ = [
    "Codec",
    "CODEC_VERSIONS",
    "CodecError",
    "NonFiniteDeltaError",
    "PackingLayout",
    "PACKING_V1",
    "WORD_BITS",
    "packed_shape",
    "pack_signs",
    "unpack_signs",
    "DeltaStats",
    "Sign1Encoded",
    "encode_sign1",
    "decode_sign1",
    "reference_decode_sign1",
    "fp32_scale",
]
