"""The manifest: a canonical JSON object describing one model (format ``deltahub.manifest`` v1).

A manifest is stored as an object; its id is the sha256 of its canonical bytes
(``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` in UTF-8). Layout::

    {
      "format": "deltahub.manifest",
      "format_version": 1,
      "kind": "base" | "delta",
      "model": {"model_type": str|null, "architectures": [str], "dtype": "float16"|...},
      "files": {"config.json": "<object id>", "tokenizer.json": "<object id>", ...},
      "tensors": {
        "<name>": {"codec": "dense", "codec_version": 1, "dtype": "...", "shape": [...],
                   "object": "<object id of the raw little-endian tensor bytes>"},
        "<name>": {"codec": "sign1", "codec_version": 1, "dtype": "...", "shape": [N, K],
                   "object": "<object id of the packed signs, int32 [N, ceil(K/32)]>",
                   "scale": <float, exactly an fp32 value>},
        "<name>": {"codec": "same", "codec_version": 1, "dtype": "...", "shape": [...]}
      },
      "base": {                        # deltas only
        "manifest": "<base manifest id>",
        "hub": {"repo_id": str, "revision": str} | null,
        "tensors": {"<name>": "<sha256 of the base tensor's bytes>", ...}
      },
      "packing": {...}                 # deltas only: deltahub.codec.PackingLayout.to_json()
    }

A base's tensors all use ``dense`` (the tensor itself). In a delta, ``dtype`` is the fine-tune's dtype
of that tensor; ``sign1`` and ``same`` tensors reconstruct from the base tensor of the same name.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from deltahub.codec import CODEC_VERSIONS, PACKING_V1, Codec, CodecError, PackingLayout
from deltahub.errors import CorruptObjectError, UnsupportedFormatError
from deltahub.formats.checkpoint import AUX_FILES, CONFIG_FILE
from deltahub.formats import safe_json
from deltahub.formats.paths import TENSOR_NAME_RULE, is_stored_tensor_name, is_tensor_name, safe_relpath
from deltahub.formats.safetensors_io import NAME_TO_DTYPE

MANIFEST_FORMAT = "deltahub.manifest"
MANIFEST_VERSION = 1


class ModelKind(str, enum.Enum):
    BASE = "base"
    DELTA = "delta"


@dataclass
class TensorRecord:
    """One tensor of a manifest."""

    name: str
    codec: Codec
    dtype: str
    shape: tuple[int, ...]
    object: str | None = None
    scale: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec.value,
            "codec_version": CODEC_VERSIONS[self.codec],
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if self.object is not None:
            out["object"] = self.object
        if self.scale is not None:
            out["scale"] = self.scale
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
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": self.format_version,
            "kind": self.kind.value,
            "model": {
                "model_type": self.model_type,
                "architectures": list(self.architectures),
                "dtype": self.dtype,
            },
            "files": dict(self.files),
            "tensors": {name: rec.to_json() for name, rec in self.tensors.items()},
        }
        if self.kind is ModelKind.DELTA:
            assert self.base is not None and self.packing is not None
            out["base"] = self.base.to_json()
            out["packing"] = self.packing.to_json()
        return out

    def to_bytes(self) -> bytes:
        """Canonical bytes: the same manifest always gives the same bytes, hence the same id."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("utf-8")

    def manifest_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def object_ids(self) -> dict[str, str]:
        """Every object the manifest references (object id -> role: 'tensor' or 'file')."""
        ids: dict[str, str] = {}
        for rec in self.tensors.values():
            if rec.object is not None:
                ids[rec.object] = "tensor"
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
    if version != MANIFEST_VERSION:
        raise UnsupportedFormatError(
            f"manifest format version {version!r} is not supported by this deltahub "
            f"(it reads version {MANIFEST_VERSION})",
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
            try:
                codec = Codec(spec["codec"])
            except ValueError:
                raise UnsupportedFormatError(
                    f"tensor {name!r} uses codec {spec['codec']!r}, unknown to this deltahub",
                    "upgrade deltahub",
                ) from None
            if spec.get("codec_version") != CODEC_VERSIONS[codec]:
                raise UnsupportedFormatError(
                    f"tensor {name!r} uses {codec.value} version {spec.get('codec_version')!r}; "
                    f"this deltahub reads version {CODEC_VERSIONS[codec]}",
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
            rec = TensorRecord(name, codec, spec["dtype"], shape)
            if codec in (Codec.DENSE, Codec.SIGN1):
                rec.object = _object_id(spec.get("object"), f"tensor {name!r}")
            if codec is Codec.SIGN1:
                if len(shape) != 2:
                    raise _corrupt(f"sign1 tensor {name!r} is not 2-D")
                scale = spec.get("scale")
                if not isinstance(scale, (int, float)) or not math.isfinite(scale):
                    raise _corrupt(f"sign1 tensor {name!r} has no finite scale")
                rec.scale = float(scale)
            if kind is ModelKind.BASE and codec is not Codec.DENSE:
                raise _corrupt(f"base tensor {name!r} uses codec {codec.value}")
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
            unanchored = sorted(
                n for n, rec in tensors.items() if rec.codec is not Codec.DENSE and n not in base.tensors
            )
            if unanchored:
                raise _corrupt(f"tensor {unanchored[0]!r} is not pinned to a base tensor hash")
            try:
                packing = PackingLayout.from_json(obj["packing"])
            except CodecError as exc:
                raise UnsupportedFormatError(f"unsupported sign packing layout: {exc}", "upgrade deltahub") from None
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
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, (UnsupportedFormatError, CorruptObjectError)):
            raise
        raise _corrupt(f"missing or malformed field ({exc!r})") from None


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
