"""The manifest: a canonical JSON object describing one model (format ``deltahub.manifest`` v1 and v2).

A manifest is stored as an object; its id is the sha256 of its canonical bytes
(``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` in UTF-8). Layout::

    {
      "format": "deltahub.manifest",
      "format_version": 1 | 2,
      "kind": "base" | "delta",
      "model": {"model_type": str|null, "architectures": [str], "dtype": "float16"|...},
      "files": {"config.json": "<object id>", "tokenizer.json": "<object id>", ...},
      "tensors": {"<name>": <tensor record>, ...},
      "base": {                        # deltas only
        "manifest": "<base manifest id>",
        "hub": {"repo_id": str, "revision": str} | null,
        "tensors": {"<name>": "<sha256 of the base tensor's bytes>", ...}
      },
      "packing": {...},                # deltas only: deltahub.codec.PackingLayout.to_json()
      "plane_order": [["<name>", plane], ...]   # v2, optional: deltas compressed to a size budget
    }

A **v2** tensor record names its codec (any codec of :mod:`deltahub.codec.registry`), the codec's
parameters and a mapping of the codec's named parts to objects::

    {"codec": "<name>", "codec_version": int, "dtype": "...", "shape": [...],
     "params": {...}, "parts": {"<part>": "<object id of the part's raw bytes>", ...}}

A **v1** record (the built-in codecs only) keeps the single part in ``object`` and a ``sign1`` scale
in ``scale``::

    {"codec": "dense", "codec_version": 1, "dtype", "shape", "object": "<id>"}
    {"codec": "sign1", "codec_version": 1, "dtype", "shape", "object": "<id of the packed signs>", "scale": s}
    {"codec": "same", "codec_version": 1, "dtype", "shape"}

Both read into the same :class:`TensorRecord`. A manifest is written in the lowest version that holds
it: v1 whenever every tensor uses a built-in codec (so the same input keeps the same manifest id, and
older deltahub versions keep reading it), v2 otherwise. A manifest read as v1 writes back as v1 bytes.

A base's tensors all use ``dense`` (the tensor itself). In a delta, ``dtype`` is the fine-tune's dtype
of that tensor; tensors whose codec ``uses_base`` reconstruct from the base tensor of the same name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from deltahub import codec as codecs
from deltahub.codec import PACKING_V1, CodecError, PackingLayout, TensorCodec
from deltahub.errors import CorruptObjectError, InputError, UnsupportedFormatError
from deltahub.formats.checkpoint import AUX_FILES, CONFIG_FILE
from deltahub.formats import safe_json
from deltahub.formats.paths import TENSOR_NAME_RULE, is_stored_tensor_name, is_tensor_name, safe_relpath
from deltahub.formats.safetensors_io import NAME_TO_DTYPE, dtype_from_name

MANIFEST_FORMAT = "deltahub.manifest"
MANIFEST_VERSION = 2
"""The newest manifest format version this deltahub writes and reads."""
READABLE_VERSIONS = (1, 2)

#: v1 records: the one part each built-in codec stores (v1 calls it ``object``) and the
#: parameters v1 holds as top-level keys.
_V1_PART = {"dense": "tensor", "sign1": "signs", "same": None}
_V1_PARAMS = {"dense": (), "sign1": ("scale",), "same": ()}


class ModelKind(str, enum.Enum):
    BASE = "base"
    DELTA = "delta"


@dataclass
class TensorRecord:
    """One tensor of a manifest: its codec, dtype, shape, the codec's parameters and its parts
    (part name → object id)."""

    name: str
    codec: str
    dtype: str
    shape: tuple[int, ...]
    parts: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    codec_version: int | None = None  # None: the registered codec's version

    def __post_init__(self) -> None:
        self.codec = str(getattr(self.codec, "value", self.codec))  # accept the old Codec enum
        self.shape = tuple(self.shape)
        if self.codec_version is None:
            self.codec_version = codecs.get(self.codec).version

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def impl(self) -> TensorCodec:
        """The registered codec of this record."""
        return codecs.get(self.codec)

    @property
    def object(self) -> str | None:
        """The object of a one-part codec (``None`` for ``same``); see :attr:`parts`."""
        if len(self.parts) > 1:
            raise AttributeError(f"tensor {self.name!r} ({self.codec}) has several parts: use .parts")
        return next(iter(self.parts.values()), None)

    @property
    def scale(self) -> float | None:
        """The ``scale`` parameter of codecs that have one (``sign1``), else ``None``."""
        value = self.params.get("scale")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def fits_v1(self) -> bool:
        return (
            self.codec in _V1_PART
            and self.codec_version == 1
            and set(self.params) <= set(_V1_PARAMS[self.codec])
            and set(self.parts) <= ({_V1_PART[self.codec]} if _V1_PART[self.codec] else set())
        )

    def to_json(self, version: int = MANIFEST_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec,
            "codec_version": self.codec_version,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if version == 1:
            if not self.fits_v1():
                raise ValueError(f"tensor {self.name!r} ({self.codec}) cannot be written in manifest v1")
            if self.parts:
                out["object"] = next(iter(self.parts.values()))
            out.update(self.params)
        else:
            out["parts"] = dict(sorted(self.parts.items()))
            out["params"] = dict(sorted(self.params.items()))
        return out


@dataclass
class BaseRef:
    """What a delta was computed against."""

    manifest: str
    tensors: dict[str, str]
    hub_repo_id: str | None = None
    hub_revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        hub = None
        if self.hub_repo_id:
            hub = {"repo_id": self.hub_repo_id, "revision": self.hub_revision}
        return {"manifest": self.manifest, "hub": hub, "tensors": dict(self.tensors)}


@dataclass
class Manifest:
    kind: ModelKind
    model_type: str | None
    architectures: list[str]
    dtype: str
    files: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    base: BaseRef | None = None
    packing: PackingLayout | None = None
    format_version: int | None = None
    """``None`` (new manifests): written in the lowest version that holds them; a parsed manifest
    keeps the version it was read in, so it writes back as the same bytes."""
    plane_order: list[tuple[str, int]] | None = None
    """v2, progressive deltas compressed to a size budget: the order in which planes are worth
    adding, ``(tensor, plane)`` for every stored plane ≥ 1 (plane 0 of every tensor always comes
    first). Any prefix of it is the best delta of its size (:meth:`at_size`). ``None``: the implicit
    order of :meth:`order` (plane 1 of every tensor, then plane 2, ...)."""

    def version(self) -> int:
        """The format version this manifest is written in."""
        if self.format_version is not None:
            return self.format_version
        if self.plane_order is not None:
            return MANIFEST_VERSION
        return 1 if all(rec.fits_v1() for rec in self.tensors.values()) else MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        version = self.version()
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": version,
            "kind": self.kind.value,
            "model": {
                "model_type": self.model_type,
                "architectures": list(self.architectures),
                "dtype": self.dtype,
            },
            "files": dict(self.files),
            "tensors": {name: rec.to_json(version) for name, rec in self.tensors.items()},
        }
        if self.kind is ModelKind.DELTA:
            assert self.base is not None and self.packing is not None
            out["base"] = self.base.to_json()
            out["packing"] = self.packing.to_json()
        if self.plane_order is not None:
            if version < 2:
                raise ValueError("a plane order needs manifest v2")
            out["plane_order"] = [[tname, plane] for tname, plane in self.plane_order]
        return out

    def to_bytes(self) -> bytes:
        """Canonical bytes: the same manifest always gives the same bytes, hence the same id."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("utf-8")

    def manifest_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def stored_planes(self) -> int:
        """The most planes any tensor stores (1 for a ``sign1`` delta, 0 for a base)."""
        return max((rec.impl.planes(rec.params) for rec in self.tensors.values() if rec.impl.stores_delta), default=0)

    def planes_of(self) -> dict[str, int]:
        """Tensor → planes stored, for the tensors of a progressive codec."""
        return {n: rec.impl.planes(rec.params) for n, rec in self.tensors.items() if rec.impl.progressive and rec.parts}

    def order(self) -> list[tuple[str, int]]:
        """The order in which planes ≥ 1 are added: the stored :attr:`plane_order`, else plane 1 of
        every progressive tensor (by name), then plane 2, and so on."""
        if self.plane_order is not None:
            return list(self.plane_order)
        planes = self.planes_of()
        return [(n, p) for p in range(1, max(planes.values(), default=0)) for n in sorted(planes) if planes[n] > p]

    def tensor_nbytes(self) -> int:
        """Bytes of the tensors' parts (before the store's zstd): what a pull fetches for them, and
        what ``--max-size`` / ``--avg-bits`` count. Carried files and the manifest are not counted."""
        return sum(rec.impl.stored_nbytes(rec.shape, dtype_from_name(rec.dtype), rec.params) for rec in self.tensors.values())

    def prefix_sizes(self) -> list[int]:
        """``sizes[m]``: :meth:`tensor_nbytes` of the delta made of plane 0 of every progressive
        tensor plus the first ``m`` entries of :meth:`order` (``m`` = 0 … ``len(order)``)."""
        planes = self.planes_of()
        one = self._cut({n: 1 for n in planes})
        sizes = [one.tensor_nbytes()]
        have = dict.fromkeys(planes, 1)
        for tname, plane in self.order():
            rec = self.tensors[tname]
            dtype = dtype_from_name(rec.dtype)
            before = rec.impl.stored_nbytes(rec.shape, dtype, rec.impl.prefix(rec.params, rec.parts, have[tname])[0])
            have[tname] = plane + 1
            after = rec.impl.stored_nbytes(rec.shape, dtype, rec.impl.prefix(rec.params, rec.parts, plane + 1)[0])
            sizes.append(sizes[-1] + after - before)
        return sizes

    def at_size(self, max_bytes: int, name: str = "the model") -> Manifest:
        """The longest prefix of :meth:`order` whose :meth:`tensor_nbytes` is at most ``max_bytes``:
        for a delta compressed to a budget, the best delta of that size its stored artifact holds.

        Raises:
            InputError: ``max_bytes`` is below the smallest delta (one plane per tensor).
        """
        return self.at_order_prefix(self.fit_order(max_bytes, name))

    def fit_order(self, max_bytes: int, name: str = "the model") -> int:
        """How many entries of :meth:`order` the largest prefix within ``max_bytes`` holds.

        Raises:
            InputError: ``max_bytes`` is not a positive int or is below the smallest delta.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InputError(f"--max-size must be a positive number of bytes, got {max_bytes!r}", "use e.g. --max-size 40MB")
        if self.kind is not ModelKind.DELTA:
            raise InputError(f"{name} is a base model: --max-size applies to deltas only", "drop --max-size")
        sizes = self.prefix_sizes()
        if max_bytes < sizes[0]:
            raise InputError(
                f"{name} needs at least {sizes[0]} bytes of tensor data (one plane per matrix), so --max-size "
                f"{max_bytes} is too small",
                f"use --max-size {sizes[0]} or more (all it stores: {sizes[-1]})",
            )
        return max(i for i, size in enumerate(sizes) if size <= max_bytes)

    def at_order_prefix(self, m: int) -> Manifest:
        """This manifest with plane 0 of every progressive tensor and the first ``m`` entries of
        :meth:`order`."""
        counts = dict.fromkeys(self.planes_of(), 1)
        for tname, _plane in self.order()[:m]:
            counts[tname] += 1
        # byte-identical copies (both names of a tied weight stored) keep one count: the smaller
        groups: dict[tuple, list[str]] = {}
        for tname in counts:
            rec = self.tensors[tname]
            key = (rec.codec, rec.shape, rec.dtype, tuple(sorted(rec.parts.items())),
                   json.dumps(rec.params, sort_keys=True, default=str))
            groups.setdefault(key, []).append(tname)
        for names in groups.values():
            if len(names) > 1:
                low = min(counts[n] for n in names)
                for n in names:
                    counts[n] = low
        return self._cut(counts)

    def _cut(self, counts: dict[str, int]) -> Manifest:
        """Progressive tensors cut to ``counts[name]`` planes; the plane order keeps what remains."""
        tensors = {}
        for tname, rec in self.tensors.items():
            if tname in counts:
                params, parts = rec.impl.prefix(rec.params, rec.parts, counts[tname])
                rec = dataclasses.replace(rec, params=params, parts=parts)
            tensors[tname] = rec
        order = None
        if self.plane_order is not None:
            order = [(n, p) for n, p in self.plane_order if p < counts.get(n, 0)]
        return dataclasses.replace(self, tensors=tensors, plane_order=order)

    def select(self, bits: int | None = None, max_size: int | None = None, name: str = "the model") -> Manifest:
        """:meth:`at_bits` (``bits``) or :meth:`at_size` (``max_size``), or this manifest for neither.

        Raises:
            InputError: both given, or the one given does not fit what is stored.
        """
        if bits is not None and max_size is not None:
            raise InputError("--bits and --max-size both choose the planes to read: give one", "drop one of them")
        if bits is not None:
            return self.at_bits(bits, name)
        if max_size is not None:
            return self.at_size(max_size, name)
        return self

    def at_bits(self, bits: int, name: str = "the model") -> Manifest:
        """This manifest with every progressive tensor cut to its first ``bits`` planes: a coarser,
        valid model whose later planes are never read (tensors with fewer planes keep them all).

        Raises:
            InputError: ``bits`` < 1, or more planes than any tensor stores.
        """
        most = self.stored_planes()
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise InputError(f"--bits must be a whole number of planes, 1 or more, got {bits!r}", "use --bits 1, 2, ...")
        if bits > most:
            raise InputError(
                f"{name} stores at most {most} plane(s) per tensor, so --bits {bits} asks for planes it does not have",
                f"use --bits 1..{most}" if most else "--bits applies to deltas only",
            )
        return self._cut({n: min(bits, k) for n, k in self.planes_of().items()})

    def object_ids(self) -> dict[str, str]:
        """Every object the manifest references (object id -> role: 'tensor' or 'file')."""
        ids: dict[str, str] = {}
        for rec in self.tensors.values():
            for oid in rec.parts.values():
                ids[oid] = "tensor"
        for oid in self.files.values():
            ids.setdefault(oid, "file")
        return ids


def _corrupt(why: str) -> CorruptObjectError:
    return CorruptObjectError(f"invalid manifest: {why}", "run `deltahub verify`")


def _object_id(value: Any, where: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise _corrupt(f"{where} is not an object id")
    return value


def _tensor_name(name: str, strict: bool) -> str:
    """Tensor names become safetensors keys of materialized checkpoints. ``strict`` (new input):
    :func:`is_tensor_name`; else (a stored manifest) :func:`is_stored_tensor_name`, so manifests
    written before the rule existed keep reading."""
    if not (is_tensor_name(name) if strict else is_stored_tensor_name(name)):
        raise _corrupt(f"invalid tensor name {str(name)[:80]!r} ({TENSOR_NAME_RULE})")
    return name


def _optional_str(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _corrupt(f"{where} is not a string")
    return value


def _carried_file(name: str) -> str:
    """Only config.json and the known tokenizer/generation files may come from a manifest: a
    manifest must never plant weights (or anything else) next to the shards it describes."""
    if name != CONFIG_FILE and name not in AUX_FILES:
        raise _corrupt(f"file {safe_relpath(name)!r} is not one deltahub carries")
    return name


def _plane_order(raw: Any, tensors: dict[str, TensorRecord]) -> list[tuple[str, int]]:
    """A stored plane order: ``[tensor, plane]`` pairs naming every stored plane ≥ 1 of every
    progressive tensor exactly once, each tensor's planes in increasing order."""
    if not isinstance(raw, list):
        raise _corrupt("plane_order is not a list")
    order: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise _corrupt("plane_order entries must be [tensor, plane] pairs")
        tname, plane = entry
        rec = tensors.get(tname)
        if rec is None or not rec.impl.progressive:
            raise _corrupt(f"plane_order names {tname[:80]!r}, not a progressive tensor of the manifest")
        if plane != seen.get(tname, 0) + 1 or plane >= rec.impl.planes(rec.params):
            raise _corrupt(f"plane_order gives tensor {tname!r} plane {plane} out of order or beyond what it stores")
        seen[tname] = plane
        order.append((tname, plane))
    for tname, rec in tensors.items():
        if rec.impl.progressive and rec.parts and seen.get(tname, 0) != rec.impl.planes(rec.params) - 1:
            raise _corrupt(f"plane_order leaves out planes of tensor {tname!r}")
    return order


def _tensor_record(name: str, spec: Any, version: int) -> TensorRecord:
    """One tensor record of a v1 or v2 manifest, checked against its codec."""
    if not isinstance(spec, dict):
        raise _corrupt(f"tensor {name!r} is not an object")
    codec_name = spec["codec"]
    try:
        impl = codecs.get(codec_name) if isinstance(codec_name, str) else None
    except CodecError:
        impl = None
    if impl is None or (version == 1 and codec_name not in _V1_PART):
        raise UnsupportedFormatError(
            f"tensor {name!r} uses codec {codec_name!r}, unknown to this deltahub",
            "upgrade deltahub, or install the package that provides that codec",
        )
    codec_version = spec.get("codec_version")
    if codec_version != impl.version or isinstance(codec_version, bool):
        raise UnsupportedFormatError(
            f"tensor {name!r} uses {impl.name} version {codec_version!r}; this deltahub reads version {impl.version}",
            "upgrade deltahub",
        )
    if spec["dtype"] not in NAME_TO_DTYPE:
        raise _corrupt(f"tensor {name!r} has unknown dtype {spec['dtype']!r}")
    raw_shape = spec["shape"]
    if not isinstance(raw_shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw_shape
    ):
        raise _corrupt(f"tensor {name!r} has an invalid shape {raw_shape!r}")
    shape = tuple(raw_shape)
    known = {"codec", "codec_version", "dtype", "shape"}
    if version == 1:
        part = _V1_PART[impl.name]
        raw_parts = {part: spec.get("object")} if part else {}
        raw_params = {k: spec[k] for k in _V1_PARAMS[impl.name] if k in spec}
    else:
        raw_parts, raw_params = spec.get("parts"), spec.get("params")
        if not isinstance(raw_parts, dict) or not isinstance(raw_params, dict):
            raise _corrupt(f"tensor {name!r} has no parts/params objects")
        extra = sorted(set(spec) - known - {"parts", "params"})
        if extra:
            raise _corrupt(f"tensor {name!r} has an unknown field {extra[0]!r}")
    try:
        params = impl.check_params(raw_params, shape)
        impl.part_specs(shape, dtype_from_name(spec["dtype"]), params)  # the shape suits the codec
        expected = impl.parts_for(shape, params)
    except CodecError as exc:
        raise _corrupt(f"{impl.name} tensor {name!r}: {exc}") from None
    except Exception as exc:  # a codec's own checks must not crash the reader on hostile input
        raise _corrupt(f"{impl.name} tensor {name!r} has malformed parameters ({type(exc).__name__})") from None
    if set(raw_parts) != set(expected):
        raise _corrupt(f"{impl.name} tensor {name!r} has parts {sorted(map(str, raw_parts))}, expected {sorted(expected)}")
    parts = {p: _object_id(oid, f"tensor {name!r} part {p!r}") for p, oid in raw_parts.items()}
    return TensorRecord(name, impl.name, spec["dtype"], shape, parts=parts, params=params, codec_version=impl.version)


def parse_manifest(data: bytes | bytearray, strict_names: bool = False) -> Manifest:
    """Parse and validate manifest bytes; refuses unknown formats and versions.

    ``strict_names``: the manifest comes from outside (a pull), so its tensor names must follow
    today's rule for new input (:func:`~deltahub.formats.paths.is_tensor_name`)."""
    try:
        obj = safe_json.loads(bytes(data), "the manifest", allow_nan=False, unique_keys=True, strict_unicode=True)
    except safe_json.JSONInputError as exc:
        raise _corrupt(str(exc)) from None
    if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
        raise _corrupt("not a deltahub manifest")
    version = obj.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise UnsupportedFormatError(
            f"manifest format version {version!r} is not supported by this deltahub "
            f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))})",
            "upgrade deltahub (pip install -U deltahub)",
        )
    try:
        kind = ModelKind(obj["kind"])
        model = obj["model"]
        dtype = model["dtype"]
        if dtype not in NAME_TO_DTYPE:
            raise _corrupt(f"unknown dtype {dtype!r}")
        files = {_carried_file(k): _object_id(v, f"file {k}") for k, v in obj["files"].items()}
        tensors: dict[str, TensorRecord] = {}
        for name, spec in obj["tensors"].items():
            _tensor_name(name, strict_names)
            rec = _tensor_record(name, spec, version)
            if kind is ModelKind.BASE and rec.codec != codecs.DENSE.name:
                raise _corrupt(f"base tensor {name!r} uses codec {rec.codec}")
            tensors[name] = rec
        base = packing = None
        if kind is ModelKind.DELTA:
            b = obj["base"]
            hub = b.get("hub") or {}
            base = BaseRef(
                manifest=_object_id(b["manifest"], "base manifest"),
                tensors={
                    _tensor_name(k, strict_names): _object_id(v, f"base tensor {k!r}") for k, v in b["tensors"].items()
                },
                hub_repo_id=_optional_str(hub.get("repo_id"), "base.hub.repo_id"),
                hub_revision=_optional_str(hub.get("revision"), "base.hub.revision"),
            )
            unanchored = sorted(n for n, rec in tensors.items() if rec.impl.uses_base and n not in base.tensors)
            if unanchored:
                raise _corrupt(f"tensor {unanchored[0]!r} is not pinned to a base tensor hash")
            try:
                packing = PackingLayout.from_json(obj["packing"])
            except CodecError as exc:
                raise UnsupportedFormatError(f"unsupported sign packing layout: {exc}", "upgrade deltahub") from None
        plane_order = None
        if "plane_order" in obj:
            if version < 2:
                raise _corrupt("plane_order needs format version 2")
            plane_order = _plane_order(obj["plane_order"], tensors)
        architectures = model.get("architectures") or []
        if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
            raise _corrupt("model.architectures is not a list of strings")
        return Manifest(
            kind=kind,
            model_type=_optional_str(model.get("model_type"), "model.model_type"),
            architectures=list(architectures),
            dtype=dtype,
            files=files,
            tensors=tensors,
            base=base,
            packing=packing,
            format_version=version,
            plane_order=plane_order,
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        if isinstance(exc, (UnsupportedFormatError, CorruptObjectError)):
            raise
        raise _corrupt(f"missing or malformed field ({exc!r})"[:300]) from None


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "BaseRef",
    "Manifest",
    "ModelKind",
    "PACKING_V1",
    "TensorRecord",
    "parse_manifest",
]
