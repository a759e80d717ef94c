"""The Hub repo layout of a pushed delta (format ``deltahub.hub`` v1).

A pushed delta is an ordinary Hub model repo (see docs/hub.md)::

    deltahub.json                      the manifest in its Hub form (below)
    delta.safetensors                  packed signs (int32 [N, ceil(K/32)]) and dense tensors, or
    delta-00001-of-0000N.safetensors   ... shards of it, above the shard size limit
    config.json, tokenizer*, ...       the fine-tune's files, byte for byte
    README.md                          the model card (deltahub.hub.card)

``deltahub.json`` (keys sorted, 2-space indent, trailing newline; deterministic)::

    {
      "format": "deltahub.hub", "format_version": 1, "kind": "delta",
      "manifest": "<id of the store manifest this was made from>",
      "model": {"model_type", "architectures", "dtype"},
      "files": {"config.json": {"sha256": "<sha256 of the file>"}, ...},
      "tensors": {
        "<name>": {"codec": "sign1", "codec_version": 1, "dtype", "shape", "scale",
                   "file": "delta.safetensors", "key": "<name>", "stored_dtype": "int32",
                   "stored_shape": [N, ceil(K/32)], "sha256": "<sha256 of the stored bytes>"},
        "<name>": {"codec": "dense", ..., "file", "key", "stored_dtype", "stored_shape", "sha256"},
        "<name>": {"codec": "same", "codec_version": 1, "dtype", "shape"}
      },
      "base": {"manifest": "<base manifest id>", "hub": {"repo_id", "revision"|null} | null,
               "tensors": {"<name>": "<sha256 of the base tensor>"}},
      "packing": {...}
    }

Each ``sha256`` is the store's object id of that tensor or file, so a pull can rebuild the store
manifest exactly (and check it hashes to ``manifest``).

This module knows nothing of the store: it plans files from a parsed manifest and renders and parses
the JSON. Talking to the Hub (and its error table) is :mod:`deltahub.hub.transfer`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub.errors import CorruptObjectError, UnsupportedFormatError
from deltahub.formats import safe_json
from deltahub.formats.checkpoint import DELTA_MANIFEST_FILE
from deltahub.formats.manifest import MANIFEST_FORMAT, Manifest, ModelKind, parse_manifest
from deltahub.formats.safetensors_io import TensorSpec, dtype_from_name, dtype_name

logger = logging.getLogger(__name__)

HUB_FORMAT = "deltahub.hub"
HUB_FORMAT_VERSION = 2
"""The newest Hub format this deltahub writes: a delta is pushed in the Hub format version equal to
its manifest's format version (v1 for deltas of the built-in codecs, so older deltahub versions
pull them)."""
HUB_READABLE_VERSIONS = (1, 2)
HUB_MANIFEST_FILE = DELTA_MANIFEST_FILE  # "deltahub.json": also what `add` refuses as a checkpoint
CARD_FILE = "README.md"
DELTA_STEM = "delta"
#: safetensors header metadata of every delta file.
DELTA_FILE_METADATA = {"format": HUB_FORMAT, "format_version": "1"}  # the delta files' own layout: unchanged


def delta_file_names(n: int) -> list[str]:
    """``delta.safetensors`` or ``delta-0000i-of-0000N.safetensors`` (never an HF weight name)."""
    if n == 1:
        return [f"{DELTA_STEM}.safetensors"]
    return [f"{DELTA_STEM}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def is_delta_file(path: str) -> bool:
    """Whether ``path`` is a delta file deltahub wrote (stale ones are deleted on re-push)."""
    if path == f"{DELTA_STEM}.safetensors":
        return True
    return path.startswith(f"{DELTA_STEM}-") and path.endswith(".safetensors") and "/" not in path


@dataclass(frozen=True)
class StoredTensor:
    """One stored part of a manifest tensor, as an entry of a delta file: the part's object, as is.

    ``name`` is the safetensors key: the tensor's name in Hub format v1 (one part per tensor),
    ``<tensor>:<part>`` in v2 (``:`` never occurs in a tensor name)."""

    name: str
    object: str
    dtype: str
    shape: tuple[int, ...]
    tensor: str = ""
    part: str = ""

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, dtype_from_name(self.dtype), self.shape)


@dataclass
class HubLayout:
    """Which stored tensor goes into which delta file, and the carried files."""

    shards: dict[str, list[StoredTensor]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # repo path -> object id

    def file_of(self) -> dict[str, str]:
        return {t.name: fname for fname, ts in self.shards.items() for t in ts}


def part_key(manifest: Manifest, tensor: str, part: str) -> str:
    """The safetensors key of ``part`` of ``tensor``: the tensor's name in v1, ``tensor:part`` in v2."""
    return tensor if manifest.version() == 1 else f"{tensor}:{part}"


def stored_tensors(manifest: Manifest) -> list[StoredTensor]:
    """Every stored part of ``manifest``'s tensors (as its codec lays it out), sorted by key."""
    out = []
    for name, rec in sorted(manifest.tensors.items()):
        specs = rec.impl.part_specs(rec.shape, dtype_from_name(rec.dtype), rec.params)
        for part, oid in sorted(rec.parts.items()):
            spec = specs[part]
            out.append(StoredTensor(part_key(manifest, name, part), oid, dtype_name(spec.dtype), spec.shape, name, part))
    return sorted(out, key=lambda t: t.name)


#: A delta compressed to a budget (a stored plane order) starts a new file after about this share
#: of the bytes of its further planes, so ``pull --max-size`` can stop at a file boundary close to
#: any budget without fetching a plane it does not keep.
ORDER_CHUNKS = 32


def plan_layout(manifest: Manifest, max_shard_bytes: int) -> HubLayout:
    """Deterministic: stored parts by plane, then name; a new shard when the next part would pass
    the limit, and at every plane boundary, so the parts of the first ``k`` planes of progressive
    codecs lie in a prefix of the files (``pull --bits k`` fetches only those). Without progressive
    codecs every part is plane 0: tensors in name order, as Hub format v1 always was.

    A delta with a stored plane order (compressed to a budget) lays its planes ≥ 1 out in that order
    instead, a new file after every ``1/ORDER_CHUNKS`` of their bytes: every prefix of the order that
    ends at a file boundary is a prefix of the files (``pull --max-size``)."""
    if manifest.kind is not ModelKind.DELTA:
        raise ValueError("only deltas have a Hub layout (yet)")

    def plane(t: StoredTensor) -> int:
        return manifest.tensors[t.tensor].impl.part_plane(t.part)

    rank: dict[tuple[str, int], int] = {}
    chunk = 0
    if manifest.plane_order is not None:
        rank = {entry: i + 1 for i, entry in enumerate(manifest.plane_order)}
        later = sum(t.spec.nbytes for t in stored_tensors(manifest) if plane(t) > 0)
        chunk = max(1, -(-later // ORDER_CHUNKS))

    def key(t: StoredTensor) -> tuple[int, str]:
        p = plane(t)
        return (rank.get((t.tensor, p), 0) if p and rank else p, t.name)

    groups: list[list[StoredTensor]] = []
    size = 0
    current = 0
    for t in sorted(stored_tensors(manifest), key=key):
        nbytes = t.spec.nbytes
        group = key(t)[0]
        if rank:  # a budget's order: a boundary after plane 0, then every `chunk` bytes
            boundary = (group > 0) != (current > 0) or (group > 0 and size >= chunk and group != current)
        else:
            boundary = group != current
        if not groups or (groups[-1] and (size + nbytes > max_shard_bytes or boundary)):
            groups.append([])
            size = 0
        current = group
        groups[-1].append(t)
        size += nbytes
    if not groups:
        groups = [[]]
    return HubLayout(
        shards=dict(zip(delta_file_names(len(groups)), groups, strict=True)),
        files=dict(sorted(manifest.files.items())),
    )


def hub_manifest(
    manifest: Manifest,
    manifest_id: str,
    layout: HubLayout,
    base_repo_id: str | None,
    base_revision: str | None,
) -> dict[str, Any]:
    """The ``deltahub.json`` object for ``manifest`` laid out as ``layout``."""
    assert manifest.base is not None and manifest.packing is not None
    where = layout.file_of()
    stored = {(t.tensor, t.part): t for ts in layout.shards.values() for t in ts}
    version = manifest.version()  # Hub format v1 holds manifest v1, v2 holds v2
    tensors: dict[str, Any] = {}
    for name, rec in sorted(manifest.tensors.items()):
        spec = rec.to_json(version)
        placed = {}
        for part in rec.parts:
            t = stored[(name, part)]
            placed[part] = dict(file=where[t.name], key=t.name, stored_dtype=t.dtype, stored_shape=list(t.shape), sha256=t.object)
        if version == 1:
            spec.pop("object", None)
            for entry in placed.values():
                spec.update(entry)
        else:
            spec["parts"] = placed
        tensors[name] = spec
    hub = {"repo_id": base_repo_id, "revision": base_revision} if base_repo_id else None
    return {
        "format": HUB_FORMAT,
        "format_version": version,
        "kind": manifest.kind.value,
        "manifest": manifest_id,
        "model": {
            "model_type": manifest.model_type,
            "architectures": list(manifest.architectures),
            "dtype": manifest.dtype,
        },
        "files": {name: {"sha256": oid} for name, oid in sorted(layout.files.items())},
        "tensors": tensors,
        "base": {"manifest": manifest.base.manifest, "hub": hub, "tensors": dict(sorted(manifest.base.tensors.items()))},
        "packing": manifest.packing.to_json(),
        **({"plane_order": [[t, p] for t, p in manifest.plane_order]} if manifest.plane_order is not None else {}),
    }


def hub_manifest_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode("utf-8")


def parse_base_repo(text: str) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]`` -> (repo_id, revision or None)."""
    repo_id, _, revision = text.partition("@")
    repo_id = repo_id.strip()
    if not repo_id or (_ and not revision.strip()):
        raise ValueError(f"expected REPO_ID[@REVISION], got {text!r}")
    return repo_id, revision.strip() or None


# ---------------------------------------------------------------------------------------- hashes
def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path, chunk: int = 8 << 20) -> str:
    """The git blob id of a file (what the Hub reports as ``blob_id`` for non-LFS files)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- pulling
@dataclass
class PulledTensor:
    """Where a stored tensor of a pulled delta lies in the repo, and what its bytes must hash to."""

    name: str
    file: str
    key: str
    stored: StoredTensor  # object = the sha256 of the stored bytes


@dataclass
class HubManifest:
    """A parsed, validated ``deltahub.json``: the store manifest it rebuilds and where the bytes are."""

    manifest_id: str
    manifest: Manifest
    files: dict[str, str]  # repo path -> sha256 (= object id)
    tensors: list[PulledTensor]  # tensors with bytes, in name order
    base_repo_id: str | None
    base_revision: str | None

    def shard_files(self) -> list[str]:
        return sorted({t.file for t in self.tensors})


def _hub_corrupt(why: str) -> CorruptObjectError:
    return CorruptObjectError(f"invalid deltahub.json: {why}", "the repo was not written by `deltahub push` or is damaged")


def parse_hub_manifest(data: bytes) -> HubManifest:
    """Parse ``deltahub.json`` and rebuild the store manifest it was pushed from.

    Refuses unknown formats and versions (:class:`UnsupportedFormatError`) and anything that does
    not rebuild a manifest hashing to the ``manifest`` field (:class:`CorruptObjectError`). The
    ``base.hub`` of ``deltahub.json`` may have been given at push time (``--base-repo``) without
    being part of the store manifest: the rebuild tries it as given, then without it.
    """
    try:  # written with allow_nan=False: NaN, Infinity or 1e999 (a scale, say) are damage
        obj = safe_json.loads(bytes(data), HUB_MANIFEST_FILE, allow_nan=False, unique_keys=True, strict_unicode=True)
    except safe_json.JSONInputError as exc:
        raise _hub_corrupt(str(exc)) from None
    if not isinstance(obj, dict):
        raise _hub_corrupt("not a JSON object")
    fmt = obj.get("format")
    if fmt != HUB_FORMAT:
        raise UnsupportedFormatError(
            f"deltahub.json has format {fmt!r}, unknown to this deltahub (it reads {HUB_FORMAT!r})",
            "upgrade deltahub (pip install -U deltahub)",
        )
    version = obj.get("format_version")
    if version not in HUB_READABLE_VERSIONS or isinstance(version, bool):
        raise UnsupportedFormatError(
            f"deltahub.json format version {version!r} is not supported by this deltahub "
            f"(it reads {HUB_FORMAT} versions {', '.join(map(str, HUB_READABLE_VERSIONS))})",
            "upgrade deltahub (pip install -U deltahub)",
        )
    if obj.get("kind") != ModelKind.DELTA.value:
        raise UnsupportedFormatError(
            f"deltahub.json describes a {obj.get('kind')!r}; this deltahub pulls deltas only",
            "upgrade deltahub (pip install -U deltahub)",
        )
    try:
        expected = obj["manifest"]
        files = {k: v["sha256"] for k, v in obj["files"].items()}
        tensors: dict[str, Any] = {}
        where: dict[tuple[str, str], tuple[str, str, str, list[int]]] = {}
        for name, spec in obj["tensors"].items():
            spec = dict(spec)
            if version == 1:
                if "sha256" in spec:  # the one part of a v1 codec; its name is known once parsed
                    where[(name, "")] = (spec.pop("file"), spec.pop("key"), spec.pop("stored_dtype"), spec.pop("stored_shape"))
                    spec["object"] = spec.pop("sha256")
            else:
                parts = {}
                for part, entry in dict(spec.get("parts", {})).items():
                    entry = dict(entry)
                    where[(name, part)] = (entry.pop("file"), entry.pop("key"), entry.pop("stored_dtype"), entry.pop("stored_shape"))
                    parts[part] = entry.pop("sha256")
                    if entry:
                        raise ValueError(f"unknown field {sorted(entry)[0]!r} in part {part!r} of {name!r}")
                spec["parts"] = parts
            tensors[name] = spec
        base = dict(obj["base"])
        hub = base.get("hub")
        store_obj = {
            "format": MANIFEST_FORMAT,
            "format_version": version,
            "kind": ModelKind.DELTA.value,
            "model": obj["model"],
            "files": files,
            "tensors": tensors,
            "base": base,
            "packing": obj["packing"],
        }
        if "plane_order" in obj:
            store_obj["plane_order"] = obj["plane_order"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _hub_corrupt(f"missing or malformed field ({exc!r})") from None
    try:
        canonical = json.dumps(store_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        manifest = parse_manifest(canonical.encode("utf-8"), strict_names=True)  # new input: today's name rule
    except CorruptObjectError as exc:
        raise _hub_corrupt(exc.message.removeprefix("invalid manifest: ")) from None
    except (TypeError, ValueError, OverflowError) as exc:  # not serializable (a non-string key, ...)
        raise _hub_corrupt(f"malformed content ({exc})") from None
    if manifest.manifest_id() != expected and manifest.base is not None and manifest.base.hub_repo_id:
        manifest.base.hub_repo_id = manifest.base.hub_revision = None
    if manifest.manifest_id() != expected:
        raise _hub_corrupt(f"its content does not rebuild manifest {str(expected)[:12]} (it hashes to {manifest.manifest_id()[:12]})")
    pulled = []
    for st in stored_tensors(manifest):
        loc = where.get((st.tensor, st.part if version != 1 else ""))
        if loc is None:  # an "object" given directly instead of file/key/sha256
            raise _hub_corrupt(f"tensor {st.tensor!r} does not say where its bytes are (file, key, sha256)")
        file, key, sdtype, sshape = loc
        if not (isinstance(file, str) and is_delta_file(file) and isinstance(key, str)):
            raise _hub_corrupt(f"tensor {st.tensor!r} lies in {file!r}, not a delta file")
        if sdtype != st.dtype or not isinstance(sshape, list) or tuple(sshape) != st.shape:
            raise _hub_corrupt(f"tensor {st.tensor!r} is stored as {sdtype}{sshape}, expected {st.dtype}{list(st.shape)}")
        pulled.append(PulledTensor(st.tensor, file, key, st))
    hub = hub if isinstance(hub, dict) else {}
    return HubManifest(
        manifest_id=expected,
        manifest=manifest,
        files=dict(sorted(manifest.files.items())),
        tensors=pulled,
        base_repo_id=hub.get("repo_id"),
        base_revision=hub.get("revision"),
    )


def default_pull_name(repo_id: str) -> str:
    """The local name of a pulled repo: the name part of ``repo_id``, made a valid model name."""
    raw = repo_id.rstrip("/").rpartition("/")[2]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
    name = re.sub(r"\.{2,}", ".", name).lstrip("._-")[:128]
    return name or "pulled"


__all__ = [
    "CARD_FILE",
    "DELTA_FILE_METADATA",
    "HUB_FORMAT",
    "HUB_FORMAT_VERSION",
    "HUB_MANIFEST_FILE",
    "HubLayout",
    "HubManifest",
    "PulledTensor",
    "StoredTensor",
    "default_pull_name",
    "delta_file_names",
    "file_sha256",
    "git_blob_sha1",
    "hub_manifest",
    "hub_manifest_bytes",
    "is_delta_file",
    "parse_base_repo",
    "parse_hub_manifest",
    "plan_layout",
    "stored_tensors",
]
