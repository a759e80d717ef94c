"""The queries and writes everyone else calls: the only code outside ``models`` that touches ORM rows.

:class:`IndexQueries` is mixed into :class:`deltahub.index.Index`; every method runs in one short
transaction of :meth:`Index.session` and returns plain dataclasses (:mod:`deltahub.index.records`).

Write order (invariant 2 of DESIGN.md): the caller has made every object and the manifest object
durable first; :meth:`IndexQueries.add_manifest` then writes the object rows, the manifest row, its
links and per-tensor statistics (and a calibration record) in ONE transaction; the name comes last,
with :meth:`IndexQueries.set_name` or, when the name must still point at the manifest the work
started from, :meth:`IndexQueries.move_name` (compare-and-set). The caller holds ``names.lock`` around
name writes; pruning (:meth:`IndexQueries.prune_unreachable`) runs only under the exclusive gc lock.
File locks live in the store: this module never imports ``deltahub.store``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from deltahub.errors import DeltaHubError, InUseError, NameChangedError, NameExistsError
from deltahub.index.models import (
    CalibrationRow,
    EvaluationRow,
    ManifestObjectRow,
    ManifestRow,
    NameRow,
    ObjectRow,
    TensorStatRow,
    latest_record,
    record_from,
    utcnow,
)
from deltahub.index.records import (
    IndexSnapshot,
    ManifestDetails,
    ManifestEntry,
    NamedModel,
    NameEntry,
    NewManifest,
    ObjectEntry,
    Pruned,
    ResolvedName,
    TensorStat,
    TensorStatEntry,
)

__all__ = ["IndexQueries"]


def _manifest_entry(row: ManifestRow) -> ManifestEntry:
    return ManifestEntry(
        id=row.id,
        kind=row.kind,
        format_version=row.format_version,
        base_id=row.base_id,
        model_type=row.model_type,
        dtype=row.dtype,
        n_tensors=row.n_tensors,
        stored_bytes=row.stored_bytes,
        fp16_bytes=row.fp16_bytes,
        created_at=row.created_at,
        info=row.info,
    )


def _name_entry(row: NameRow) -> NameEntry:
    return NameEntry(row.name, row.manifest_id, row.created_at, row.updated_at)


def _stat_entry(row: TensorStatRow) -> TensorStatEntry:
    return TensorStatEntry(
        name=row.name,
        codec=row.codec,
        dtype=row.dtype,
        shape=tuple(json.loads(row.shape)),
        numel=row.numel,
        stored_bytes=row.stored_bytes,
        scale=row.scale,
        initial_scale=row.initial_scale,
        rel_delta_norm=row.rel_delta_norm,
        rel_recon_error=row.rel_recon_error,
    )


def _names_by_manifest(session: Session) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in session.scalars(select(NameRow).order_by(NameRow.name)):
        out.setdefault(row.manifest_id, []).append(row.name)
    return out


def _reachable_manifests(session: Session) -> set[str]:
    """Manifest ids some name reaches, directly or as (the base of) a named delta."""
    reachable: set[str] = set(session.scalars(select(NameRow.manifest_id)))
    frontier = set(reachable)
    while frontier:
        bases = set(
            session.scalars(
                select(ManifestRow.base_id).where(ManifestRow.id.in_(list(frontier)), ManifestRow.base_id.is_not(None))
            )
        )
        frontier = bases - reachable
        reachable |= bases
    return reachable


def _prune(session: Session, reachable: set[str]) -> list[str]:
    """Delete the rows of manifests not in ``reachable``, then object rows no manifest links."""
    doomed = [
        (row.id, row.kind)
        for row in session.execute(select(ManifestRow.id, ManifestRow.kind))
        if row.id not in reachable
    ]
    # Deltas first: they reference their base through a foreign key.
    for kind in ("delta", "base"):
        ids = [mid for mid, k in doomed if k == kind]
        if ids:
            session.execute(delete(ManifestRow).where(ManifestRow.id.in_(ids)))
    if doomed:
        session.execute(
            delete(ObjectRow).where(ObjectRow.sha256.not_in(select(ManifestObjectRow.object_id)))
        )
    return [mid for mid, _ in doomed]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class IndexQueries:
    """Queries and writes of the index (mixed into :class:`deltahub.index.Index`)."""

    def session(self, *, write: bool = True) -> AbstractContextManager[Session]:  # pragma: no cover - Index's
        raise NotImplementedError

    # ------------------------------------------------------------------------------ names
    def get_name(self, name: str) -> NameEntry | None:
        """The name's entry, or None when no such name is stored."""
        with self.session(write=False) as session:
            row = session.get(NameRow, name)
            return _name_entry(row) if row is not None else None

    def resolve_name(self, name: str) -> ResolvedName | None:
        """The name, the manifest it points at and that manifest's row (None: dangling), read in
        one transaction; None when no such name is stored."""
        with self.session(write=False) as session:
            row = session.get(NameRow, name)
            if row is None:
                return None
            manifest = session.get(ManifestRow, row.manifest_id)
            return ResolvedName(row.name, row.manifest_id, _manifest_entry(manifest) if manifest is not None else None)

    def names_of(self, manifest_id: str) -> list[str]:
        """The names pointing at ``manifest_id``, sorted."""
        with self.session(write=False) as session:
            return sorted(session.scalars(select(NameRow.name).where(NameRow.manifest_id == manifest_id)))

    def free_name(self, name: str, reserved: str | None = None) -> str:
        """``name``, or ``name-2``, ``name-3``... : the first that is neither stored nor ``reserved``."""
        with self.session(write=False) as session:
            candidate, n = name, 1
            while candidate == reserved or session.get(NameRow, candidate) is not None:
                n += 1
                candidate = f"{name[:120]}-{n}"
        return candidate

    def count_names(self) -> int:
        with self.session(write=False) as session:
            return int(session.scalar(select(func.count()).select_from(NameRow)) or 0)

    def list_models(self) -> list[NamedModel]:
        """Every name (sorted) with its manifest and the names of that manifest's base."""
        out = []
        with self.session(write=False) as session:
            names = _names_by_manifest(session)
            for name_row in session.scalars(select(NameRow).order_by(NameRow.name)):
                m = session.get(ManifestRow, name_row.manifest_id)
                assert m is not None
                out.append(NamedModel(name_row.name, name_row.updated_at, _manifest_entry(m), names.get(m.base_id or "", [])))
        return out

    def set_name(self, name: str, manifest_id: str, force: bool) -> None:
        """Point ``name`` at ``manifest_id`` (the caller holds ``names.lock``). A name another process
        took meanwhile is re-pointed only with ``force``; the old manifest's rows stay until gc
        prunes them under the exclusive gc lock.

        Raises:
            NameExistsError: the name points at another manifest and ``force`` is false.
        """
        with self.session() as session:
            row = session.get(NameRow, name)
            if row is None:
                session.add(NameRow(name=name, manifest_id=manifest_id, created_at=utcnow(), updated_at=utcnow()))
            elif row.manifest_id != manifest_id:
                if not force:
                    raise NameExistsError(
                        f"the name {name!r} was taken by another process meanwhile",
                        "choose another --name or pass --force",
                    )
                row.manifest_id = manifest_id
                row.updated_at = utcnow()

    def move_name(self, name: str, expected: str, manifest_id: str) -> None:
        """Compare-and-set: move ``name`` from manifest ``expected`` to ``manifest_id`` only if it
        still points at ``expected`` (the caller holds ``names.lock``).

        Raises:
            NameChangedError: the name was removed or points at another manifest.
        """
        with self.session() as session:
            row = session.get(NameRow, name)
            if row is None or row.manifest_id != expected:
                now = "was removed" if row is None else f"points at manifest {row.manifest_id[:12]}"
                raise NameChangedError(
                    f"{name!r} was changed by another process: it {now}, not at {expected[:12]} any more",
                    "run the command again",
                )
            if row.manifest_id != manifest_id:
                row.manifest_id = manifest_id
                row.updated_at = utcnow()

    def remove_name(self, name: str, force: bool = False) -> str | None:
        """Delete ``name``; returns the manifest it pointed at (None: no such name). The manifest's
        rows stay until gc prunes them.

        Raises:
            InUseError: ``name`` is the only name of a base that named deltas use, and not ``force``.
        """
        with self.session() as session:
            row = session.get(NameRow, name)
            if row is None:
                return None
            other_names = set(
                session.scalars(select(NameRow.name).where(NameRow.manifest_id == row.manifest_id, NameRow.name != name))
            )
            dependants = list(
                session.scalars(
                    select(NameRow.name)
                    .join(ManifestRow, ManifestRow.id == NameRow.manifest_id)
                    .where(ManifestRow.base_id == row.manifest_id)
                )
            )
            if dependants and not other_names and not force:
                raise InUseError(
                    f"{name!r} is the base of {len(dependants)} stored delta(s): {', '.join(sorted(dependants)[:5])}",
                    "remove those first, or pass --force to drop the name and keep the base for them",
                )
            manifest_id = row.manifest_id
            session.delete(row)
        return manifest_id

    # -------------------------------------------------------------------------- manifests
    def manifest(self, manifest_id: str) -> ManifestEntry | None:
        """The indexed manifest, or None."""
        with self.session(write=False) as session:
            row = session.get(ManifestRow, manifest_id)
            return _manifest_entry(row) if row is not None else None

    def tensor_stats(self, manifest_id: str) -> list[TensorStatEntry]:
        """The per-tensor statistics of ``manifest_id``, by tensor name."""
        with self.session(write=False) as session:
            return [_stat_entry(row) for row in self._stat_rows(session, manifest_id)]

    @staticmethod
    def _stat_rows(session: Session, manifest_id: str) -> Iterator[TensorStatRow]:
        yield from session.scalars(
            select(TensorStatRow).where(TensorStatRow.manifest_id == manifest_id).order_by(TensorStatRow.name)
        )

    def manifest_details(self, manifest_id: str) -> ManifestDetails | None:
        """The manifest, its base's names, its statistics and latest calibration and evaluation
        records, in one transaction; None when it is not indexed."""
        with self.session(write=False) as session:
            m = session.get(ManifestRow, manifest_id)
            if m is None:
                return None
            names = _names_by_manifest(session)
            return ManifestDetails(
                manifest=_manifest_entry(m),
                base_names=names.get(m.base_id or "", []),
                stats=[_stat_entry(row) for row in self._stat_rows(session, m.id)],
                calibration=latest_record(session, CalibrationRow, m.id),
                evaluation=latest_record(session, EvaluationRow, m.id),
            )

    def add_manifest(
        self,
        manifest: NewManifest,
        objects: Iterable[ObjectEntry],
        stats: Sequence[TensorStat],
        *,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        """Index a manifest whose objects are all durable in the store, in ONE transaction: the
        object rows not indexed yet, then (unless the manifest is indexed already) its row, its links
        and its per-tensor statistics, then the ``calibration`` record (the columns of a
        ``calibrations`` row, ``manifest_id`` set here), if any. The name comes after, in its own
        transaction (:meth:`set_name`, :meth:`move_name`).

        Raises:
            DeltaHubError: a linked object is neither given nor indexed.
        """
        now = utcnow()
        new_objects = {o.sha256: o for o in objects}
        with self.session() as session:
            existing = set(
                session.scalars(select(ObjectRow.sha256).where(ObjectRow.sha256.in_(list(new_objects))))
            )
            for oid, obj in new_objects.items():
                if oid not in existing:
                    session.add(
                        ObjectRow(sha256=oid, size=obj.size, stored_size=obj.stored_size, encoding=obj.encoding, created_at=now)
                    )
            if session.get(ManifestRow, manifest.id) is None:
                self._add_manifest_rows(session, manifest, stats, now)
            if calibration is not None:
                session.add(record_from(CalibrationRow, calibration, manifest_id=manifest.id, created_at=now))

    @staticmethod
    def _add_manifest_rows(session: Session, manifest: NewManifest, stats: Sequence[TensorStat], now: datetime) -> None:
        session.flush()  # the new object rows, for the sizes and the links' foreign keys
        sizes = {
            oid: size
            for oid, size in session.execute(
                select(ObjectRow.sha256, ObjectRow.stored_size).where(ObjectRow.sha256.in_(list(manifest.links)))
            )
        }
        missing = sorted(set(manifest.links) - set(sizes))
        if missing:
            raise DeltaHubError(f"object {missing[0][:12]} of the {manifest.kind} is not indexed", "run `deltahub verify`")
        stored_bytes = manifest.stored_bytes if manifest.stored_bytes is not None else sum(sizes.values())
        session.add(
            ManifestRow(
                id=manifest.id,
                kind=manifest.kind,
                format_version=manifest.format_version,
                base_id=manifest.base_id,
                model_type=manifest.model_type,
                dtype=manifest.dtype,
                n_tensors=manifest.n_tensors,
                stored_bytes=stored_bytes,
                fp16_bytes=manifest.fp16_bytes,
                created_at=now,
                info=manifest.info,
            )
        )
        session.flush()
        for oid, role in manifest.links.items():
            session.add(ManifestObjectRow(manifest_id=manifest.id, object_id=oid, role=role))
        for st in stats:
            values: dict[str, Any] = {}
            if st.initial_scale is not None:  # else the column default: the scale of a sign1 tensor
                values["initial_scale"] = st.initial_scale
            session.add(
                TensorStatRow(
                    manifest_id=manifest.id,
                    name=st.name,
                    codec=st.codec,
                    dtype=st.dtype,
                    shape=_shape_text(st.shape),
                    numel=math.prod(st.shape),
                    stored_bytes=st.stored_bytes,
                    scale=st.scale,
                    rel_delta_norm=st.rel_delta_norm,
                    rel_recon_error=st.rel_recon_error,
                    **values,
                )
            )

    def record_evaluation(self, values: Mapping[str, Any]) -> bool:
        """Add an ``evaluations`` row (the columns named in ``values``, ``manifest_id`` included);
        False, and nothing written, when that manifest is no longer indexed."""
        with self.session() as session:
            if session.get(ManifestRow, values["manifest_id"]) is None:
                return False
            session.add(record_from(EvaluationRow, values, created_at=utcnow()))
        return True

    # ------------------------------------------------------------------------- Hub sources
    def set_hub_source(self, manifest_id: str, repo_id: str, commit: str) -> None:
        """Remember that manifest ``manifest_id`` is Hub repo ``repo_id`` at ``commit`` (in its
        ``info`` blob: ``{"hub": {"repo_id", "revision"}}``). Nothing happens when it is not indexed."""
        with self.session() as session:
            row = session.get(ManifestRow, manifest_id)
            if row is None:  # pragma: no cover - registered just before
                return
            info = json.loads(row.info) if row.info else {}
            info["hub"] = {"repo_id": repo_id, "revision": commit}
            row.info = json.dumps(info, sort_keys=True)

    def hub_source(self, manifest_id: str) -> tuple[str, str] | None:
        """(repo_id, commit) recorded for ``manifest_id`` (a base added from or pushed to the Hub), else None."""
        entry = self.manifest(manifest_id)
        try:
            hub = (entry.info_dict() if entry is not None else {}).get("hub") or {}
        except ValueError:
            return None
        if isinstance(hub, dict) and hub.get("repo_id") and hub.get("revision"):
            return str(hub["repo_id"]), str(hub["revision"])
        return None

    # ----------------------------------------------------------------------- gc and verify
    def linked_objects(self) -> set[str]:
        """Every object some indexed manifest links (reachable or not)."""
        with self.session(write=False) as session:
            return set(session.scalars(select(ManifestObjectRow.object_id)))

    def referenced_objects(self) -> set[str]:
        """The objects linked by manifests some name reaches (directly or as a delta's base)."""
        with self.session(write=False) as session:
            return self._referenced(session, _reachable_manifests(session))

    @staticmethod
    def _referenced(session: Session, reachable: set[str]) -> set[str]:
        return set(
            session.scalars(
                select(ManifestObjectRow.object_id).where(ManifestObjectRow.manifest_id.in_(list(reachable)))
            )
        )

    def prune_unreachable(self, dry_run: bool = False) -> Pruned:
        """Delete the rows of manifests no name reaches (unless ``dry_run``), in one transaction.

        MUST run only under the exclusive gc lock: a writer between indexing its manifest and
        publishing its name holds that lock shared, so its rows are never pruned. Objects stay on
        disk; returns the unreachable manifest ids (sorted) and the objects the reachable ones use.
        """
        with self.session(write=not dry_run) as session:
            reachable = _reachable_manifests(session)
            doomed = sorted(mid for mid in session.scalars(select(ManifestRow.id)) if mid not in reachable)
            if not dry_run:
                _prune(session, reachable)
            return Pruned(doomed, self._referenced(session, reachable))

    def snapshot(self) -> IndexSnapshot:
        """Object ids, manifests, links and names, read in one transaction (for ``verify``)."""
        with self.session(write=False) as session:
            indexed = set(session.scalars(select(ObjectRow.sha256)))
            manifests = [_manifest_entry(row) for row in session.scalars(select(ManifestRow))]
            links: dict[str, set[str]] = {}
            for row in session.execute(select(ManifestObjectRow.manifest_id, ManifestObjectRow.object_id)):
                links.setdefault(row.manifest_id, set()).add(row.object_id)
            names = [_name_entry(row) for row in session.scalars(select(NameRow))]
        return IndexSnapshot(indexed, manifests, links, names)
