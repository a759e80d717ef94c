"""Codecs: how each tensor of a stored model is kept, as a registry of one module per codec.

* :mod:`~deltahub.codec.base` — :class:`TensorCodec` (name, version, named parts, encode, exact
  decode, byte count, parameters) and :class:`DeltaOperator` (the inference apply: torch path and
  kernel hook; :class:`TenantDeltas` for many tenants of one weight).
* :mod:`~deltahub.codec.registry` — ``register`` / ``get`` / ``names`` (and the ``deltahub.codecs``
  entry point group).
* the built-in codecs: :mod:`~deltahub.codec.same`, :mod:`~deltahub.codec.dense`,
  :mod:`~deltahub.codec.sign1` (BitDelta; its apply in :mod:`~deltahub.codec.sign_apply`),
  :mod:`~deltahub.codec.planes` (progressive sign planes, per-matrix/row/group scales),
  :mod:`~deltahub.codec.lossless` (the exact fine-tune: XOR with the base, bytes split for zstd),
  :mod:`~deltahub.codec.rowsparse` (embeddings and heads: changed rows as signs + a scale per row,
  unchanged rows free, added tokens dense).

Pure tensor math: imports only torch, numpy and the standard library -- nothing from the rest of
deltahub. Nothing outside this package branches on a codec's name.
"""

from . import registry
from .base import DeltaOperator, DenseDeltaOperator, Encoded, LoopedTenantDeltas, PartSpec, TenantDeltas, TensorCodec
from .codecs import CODEC_VERSIONS, Codec, CodecError, NonFiniteDeltaError
from .dense import DenseCodec
from .packing import (
    PACKING_V1,
    WORD_BITS,
    PackingLayout,
    pack_signs,
    packed_shape,
    unpack_signs,
)
from .registry import UnknownCodecError, get, names, register
from .lossless import LosslessCodec
from .planes import PlanesCodec
from .rowsparse import RowSparseCodec
from .same import SameCodec
from .sign1 import (
    DeltaStats,
    Sign1Codec,
    Sign1Encoded,
    decode_sign1,
    encode_sign1,
    fp32_scale,
    reference_decode_sign1,
)

SAME = register(SameCodec())
DENSE = register(DenseCodec())
SIGN1 = register(Sign1Codec())
PLANES = register(PlanesCodec())
LOSSLESS = register(LosslessCodec())
ROWSPARSE = register(RowSparseCodec())

__all__ = [
    "Codec",
    "CODEC_VERSIONS",
    "CodecError",
    "DENSE",
    "DeltaOperator",
    "DenseDeltaOperator",
    "Encoded",
    "LoopedTenantDeltas",
    "NonFiniteDeltaError",
    "PackingLayout",
    "PACKING_V1",
    "PartSpec",
    "SAME",
    "PLANES",
    "LOSSLESS",
    "LosslessCodec",
    "ROWSPARSE",
    "RowSparseCodec",
    "PlanesCodec",
    "SIGN1",
    "TenantDeltas",
    "TensorCodec",
    "UnknownCodecError",
    "WORD_BITS",
    "get",
    "names",
    "register",
    "registry",
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
