"""What the index hands out and takes in: plain dataclasses, never ORM rows.

Queries (:mod:`deltahub.index.queries`) return these; writes take them. They hold copies of column
values, so they stay valid after the transaction that read them and cannot write anything back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "IndexSnapshot",
    "ManifestDetails",
    "ManifestEntry",
    "NameEntry",
    "NamedModel",
    "NewManifest",
    "ObjectEntry",
    "Pruned",
    "ResolvedName",
    "TensorStat",
    "TensorStatEntry",
]


# ------------------------------------------------------------------------------------ writes
@dataclass(frozen=True)
class ObjectEntry:
    """An object to index: its id, uncompressed size, size on disk and encoding (``raw``/``zstd``)."""

    sha256: str
    size: int
    stored_size: int
    encoding: str = "raw"


@dataclass
class TensorStat:
    """Per-tensor statistics recorded in the index at compress/add time.

    ``initial_scale`` is the scale a calibrated manifest keeps from compress time; left ``None``,
    a ``sign1`` tensor's initial scale is its ``scale``.
    """

    name: str
    codec: str
    dtype: str
    shape: tuple[int, ...]
    stored_bytes: int
    scale: float | None = None
    rel_delta_norm: float | None = None
    rel_recon_error: float | None = None
    initial_scale: float | None = None


@dataclass(frozen=True)
class NewManifest:
    """A manifest row to write, with its links (object id -> role ``manifest``/``tensor``/``file``).

    ``stored_bytes=None``: the sum of the stored sizes the index holds for the linked objects
    (which must all be indexed); ``info``: the JSON blob of extra data, if any.
    """

    id: str
    kind: str
    format_version: int
    base_id: str | None
    model_type: str | None
    dtype: str | None
    n_tensors: int
    fp16_bytes: int
    links: Mapping[str, str]
    stored_bytes: int | None = None
    info: str | None = None


# ------------------------------------------------------------------------------------ reads
@dataclass(frozen=True)
class ManifestEntry:
    """An indexed manifest (a base or a delta)."""

    id: str
    kind: str
    format_version: int
    base_id: str | None
    model_type: str | None
    dtype: str | None
    n_tensors: int
    stored_bytes: int
    fp16_bytes: int
    created_at: datetime
    #: the raw JSON blob of extra data (Hub source...), or None
    info: str | None = None

    def info_dict(self) -> dict[str, Any]:
        """``info`` parsed (``{}`` when there is none); ``ValueError`` when it is not JSON."""
        return json.loads(self.info) if self.info else {}


@dataclass(frozen=True)
class NameEntry:
    """A name and the manifest it points at."""

    name: str
    manifest_id: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ResolvedName:
    """A name looked up with its manifest's row: ``manifest`` is None for a dangling name (its
    manifest is not indexed)."""

    name: str
    manifest_id: str
    manifest: ManifestEntry | None


@dataclass(frozen=True)
class NamedModel:
    """One line of ``ls``: a name, its manifest and the names of that manifest's base."""

    name: str
    updated_at: datetime
    manifest: ManifestEntry
    base_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorStatEntry:
    """Indexed per-tensor statistics of a manifest."""

    name: str
    codec: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    stored_bytes: int
    scale: float | None
    initial_scale: float | None
    rel_delta_norm: float | None
    rel_recon_error: float | None


@dataclass(frozen=True)
class ManifestDetails:
    """Everything ``show`` reads from the index about one manifest, from one transaction."""

    manifest: ManifestEntry
    base_names: list[str]
    stats: list[TensorStatEntry]
    #: the newest calibration / evaluation record (columns but ``id``/``manifest_id``), or None
    calibration: dict[str, Any] | None
    evaluation: dict[str, Any] | None


@dataclass(frozen=True)
class IndexSnapshot:
    """The whole index as ``verify`` checks it, from one transaction."""

    objects: set[str]
    manifests: list[ManifestEntry]
    links: dict[str, set[str]]
    names: list[NameEntry]


@dataclass(frozen=True)
class Pruned:
    """What pruning found: the unreachable manifests (deleted unless a dry run) and the objects
    the reachable manifests reference."""

    manifests: list[str]
    referenced: set[str]
