"""Inspecting and managing the store: ``ls``, ``show``, ``du``, ``rm``, ``gc``, ``verify``."""

from __future__ import annotations

import re

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from deltahub.errors import DeltaHubError, DiskFullError, NameNotFoundError
from deltahub.formats.paths import validate_name
from deltahub.ops.context import StoreContext
from deltahub.progress import progress_bar
from deltahub.store import file_lock
from deltahub.store.objects import Encoding, tree_bytes

logger = logging.getLogger(__name__)


def _ratio(fp16: int, stored: int) -> float | None:
    return round(fp16 / stored, 3) if stored else None


def list_models(ctx: StoreContext) -> list[dict[str, Any]]:
    """One dict per name: name, kind, base, manifest id, bytes on disk, fp16 bytes, ratio."""
    rows = []
    for named in ctx.index.list_models():
        m = named.manifest
        rows.append(
            {
                "name": named.name,
                "kind": m.kind,
                "base": named.base_names[0] if named.base_names else (m.base_id[:12] if m.base_id else None),
                "manifest_id": m.id,
                "model_type": m.model_type,
                "dtype": m.dtype,
                "n_tensors": m.n_tensors,
                "stored_bytes": m.stored_bytes,
                "fp16_bytes": m.fp16_bytes,
                "ratio": _ratio(m.fp16_bytes, m.stored_bytes),
                "updated_at": named.updated_at.isoformat(),
            }
        )
    return rows


def show_model(ctx: StoreContext, name: str, tensors: bool = False) -> dict[str, Any]:
    """Everything known about ``name``: kind, base, codecs, bytes, ratio, statistics, and for a delta
    its latest calibration and evaluation (``None`` when there is none)."""
    with ctx.reading():
        return _show_model(ctx, name, tensors)


def _show_model(ctx: StoreContext, name: str, tensors: bool) -> dict[str, Any]:
    from deltahub.formats.manifest import ModelKind

    resolved = ctx.resolve(name)
    details = ctx.index.manifest_details(resolved.manifest_id)
    if details is None:
        raise DeltaHubError(
            f"{name!r} points at manifest {resolved.manifest_id[:12]} which is not indexed",
            "run `deltahub verify`",
        )
    m, stats = details.manifest, details.stats
    codecs: dict[str, dict[str, int]] = {}
    for st in stats:
        c = codecs.setdefault(st.codec, {"tensors": 0, "params": 0, "stored_bytes": 0})
        c["tensors"] += 1
        c["params"] += st.numel
        c["stored_bytes"] += st.stored_bytes
    sign1 = [st for st in stats if _stores_delta(st.codec)]
    summary: dict[str, Any] = {
        "name": name,
        "kind": m.kind,
        "manifest_id": m.id,
        "model_type": m.model_type,
        "architectures": resolved.manifest.architectures,
        "dtype": m.dtype,
        "n_tensors": m.n_tensors,
        "params": sum(st.numel for st in stats),
        "stored_bytes": m.stored_bytes,
        "fp16_bytes": m.fp16_bytes,
        "ratio": _ratio(m.fp16_bytes, m.stored_bytes),
        "codecs": codecs,
        "files": sorted(resolved.manifest.files),
        "created_at": m.created_at.isoformat(),
        "info": m.info_dict(),
    }
    if m.kind == ModelKind.DELTA.value:
        summary["base"] = {"manifest_id": m.base_id, "names": details.base_names}
        summary["packing"] = resolved.manifest.packing.to_json() if resolved.manifest.packing else None
        summary["calibration"] = details.calibration
        summary["evaluation"] = details.evaluation
        if sign1:
            weights = [st.numel for st in sign1]
            total = sum(weights)
            summary["statistics"] = {
                "delta_tensors": len(sign1),
                "sign1_tensors": len(sign1),  # the name before codecs: tensors stored as a delta
                "mean_rel_delta_norm": sum((st.rel_delta_norm or 0.0) * w for st, w in zip(sign1, weights)) / total,
                "max_rel_delta_norm": max(st.rel_delta_norm or 0.0 for st in sign1),
                "mean_rel_recon_error": sum((st.rel_recon_error or 0.0) * w for st, w in zip(sign1, weights)) / total,
                "max_rel_recon_error": max(st.rel_recon_error or 0.0 for st in sign1),
            }
    planes = resolved.manifest.stored_planes()
    if planes > 1:  # what each --bits prefix costs (its objects, carried files included)
        summary["planes"] = planes
        summary["bytes_by_bits"] = {
            k: sum(ctx.objects.info(oid).stored_size for oid in resolved.manifest.at_bits(k).object_ids())
            for k in range(1, planes + 1)
        }
    allocation = planes_allocation(resolved.manifest)
    if allocation is not None:
        summary["allocation"] = allocation
    if tensors:
        summary["tensors"] = [
            {
                "name": st.name,
                "codec": st.codec,
                "dtype": st.dtype,
                "shape": list(st.shape),
                "stored_bytes": st.stored_bytes,
                "scale": st.scale,
                "initial_scale": st.initial_scale,
                "rel_delta_norm": st.rel_delta_norm,
                "rel_recon_error": st.rel_recon_error,
            }
            for st in stats
        ]
    return summary


_LAYER_RE = re.compile(r"^(.*?\.\d+)\.(.+)$")


def planes_allocation(manifest: Any) -> dict[str, Any] | None:
    """For a delta with progressive tensors: the planes each got, grouped by layer, whether a plane
    order is stored (compressed to a budget) and the tensor data of the smallest and the whole
    delta (bytes and bits per parameter), the range ``--max-size`` picks from. ``None`` otherwise."""
    planes = manifest.planes_of()
    if not planes:
        return None
    by_layer: dict[str, dict[str, int]] = {}
    for tname in sorted(planes):
        short = tname.removesuffix(".weight")
        match = _LAYER_RE.match(short)
        layer, rest = (match.group(1), match.group(2)) if match else (short, "")
        by_layer.setdefault(layer, {})[rest] = planes[tname]
    sizes = manifest.prefix_sizes()
    n_params = sum(rec.numel for rec in manifest.tensors.values())
    return {
        "ordered": manifest.plane_order is not None,
        "planes": dict(sorted(planes.items())),
        "by_layer": [{"layer": layer, "planes": tensors} for layer, tensors in by_layer.items()],
        "tensor_bytes": sizes[-1],
        "min_tensor_bytes": sizes[0],
        "avg_bits": 8 * sizes[-1] / max(1, n_params),
        "min_avg_bits": 8 * sizes[0] / max(1, n_params),
        "further_planes": len(sizes) - 1,
    }


def disk_usage(ctx: StoreContext) -> dict[str, Any]:
    """Bytes on disk: objects (indexed / unreferenced), the index, and per model."""
    on_disk = {oid: ctx.objects.path_of(oid).stat().st_size for oid in ctx.objects.iter_ids()}
    index_bytes = sum(
        p.stat().st_size for p in ctx.home.glob("index.sqlite*") if p.is_file()
    )
    tmp_entries, tmp_bytes = ctx.objects.temp_usage()
    stale = ctx.objects.stale_temp_files()
    try:
        reserve_bytes = ctx.reserve_path.stat().st_size
    except OSError:
        reserve_bytes = 0
    referenced = ctx.index.referenced_objects()
    models = [
        {"name": r["name"], "kind": r["kind"], "stored_bytes": r["stored_bytes"]} for r in list_models(ctx)
    ]
    unreferenced = {oid: size for oid, size in on_disk.items() if oid not in referenced}
    hf_refs = 0
    hf_ref_bytes = 0
    for oid, size in on_disk.items():
        if size <= 4096:  # only a small object file can be a reference into the HF cache
            try:
                info = ctx.objects.info(oid)
            except DeltaHubError:
                continue  # `verify` reports damaged objects
            if info.encoding is Encoding.REF:
                hf_refs += 1
                hf_ref_bytes += info.size
    return {
        "home": str(ctx.home),
        "objects": len(on_disk),
        "object_bytes": sum(on_disk.values()),
        "unreferenced_objects": len(unreferenced),
        "unreferenced_bytes": sum(unreferenced.values()),
        "index_bytes": index_bytes,
        # tmp/: temporary objects and push staging folders; those of dead processes are stale
        # (`deltahub gc` removes them)
        "tmp_entries": tmp_entries,
        "tmp_bytes": tmp_bytes,
        "stale_tmp_entries": len(stale),
        "stale_tmp_bytes": sum(tree_bytes(p) for p in stale),
        "reserve_bytes": reserve_bytes,
        "total_bytes": sum(on_disk.values()) + index_bytes + tmp_bytes + reserve_bytes,
        # bytes the store uses but does not hold: base weights referenced in the HF cache
        "hf_cache_references": hf_refs,
        "hf_cache_referenced_bytes": hf_ref_bytes,
        "models": models,
    }


def remove(ctx: StoreContext, name: str, force: bool = False) -> dict[str, Any]:
    """Delete a name. Index rows nothing reaches any more and their objects go at the next ``gc``.

    Works even when the model's manifest is damaged (the manifest is never read).
    """
    validate_name(name)
    with ctx.naming():
        manifest_id = ctx.index.remove_name(name, force=force)
    if manifest_id is None:
        raise NameNotFoundError(f"no model named {name!r} in {ctx.home}", "see `deltahub ls` for the stored names")
    return {"name": name, "removed": True, "manifest_id": manifest_id}


@dataclass
class GcReport:
    dry_run: bool
    pruned_manifests: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    bytes: int = 0
    temp_files: list[str] = field(default_factory=list)
    temp_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["n_objects"] = len(self.objects)
        return out


def garbage_collect(ctx: StoreContext, dry_run: bool = False) -> GcReport:
    """Delete objects that no indexed manifest references, and dead processes' temp files.

    Works on a full disk: what needs no index write goes first (temporary files and push staging
    folders of dead processes, objects no manifest row links at all), which frees space before the
    index rows of unreachable manifests are pruned; then the objects only those manifests used.
    Delete order stays name -> index rows -> objects: an object is deleted only once no indexed
    manifest references it.
    """
    report = GcReport(dry_run=dry_run)
    with ctx.collecting():
        for path in ctx.objects.stale_temp_files():
            report.temp_files.append(path.name)
            report.temp_bytes += ctx.objects.remove_temp(path) if not dry_run else tree_bytes(path)
        linked = ctx.index.linked_objects()
        on_disk = list(ctx.objects.iter_ids())
        for oid in on_disk:
            if oid not in linked:  # an orphan of an interrupted or rolled-back write
                _collect(ctx, report, oid, dry_run)
        try:
            if not dry_run:
                ctx.index.reopen()  # writable again if the disk was full when the store was opened
            pruned = ctx.index.prune_unreachable(dry_run=dry_run)
            report.pruned_manifests, referenced = pruned.manifests, pruned.referenced
        except DiskFullError as exc:
            # What needed no index write is done; the objects of removed models need their index
            # rows pruned first (delete order), and the index cannot grow on this disk.
            freed = f"freed {len(report.temp_files)} temp files and {len(report.objects)} orphan objects " \
                f"({report.temp_bytes + report.bytes} bytes), but " if report.temp_files or report.objects else ""
            raise DiskFullError(
                f"{freed}{exc.message}; the objects of removed models can be deleted only after their index rows",
                "free a few MB on that disk (other files), then run `deltahub gc` again; nothing was half-done",
            ) from None
        for oid in on_disk:
            if oid in linked and oid not in referenced:
                _collect(ctx, report, oid, dry_run)
    ctx.keep_reserve()
    return report


def _collect(ctx: StoreContext, report: GcReport, oid: str, dry_run: bool) -> None:
    try:
        size = ctx.objects.path_of(oid).stat().st_size
    except FileNotFoundError:
        return
    report.objects.append(oid)
    report.bytes += size
    if not dry_run:
        ctx.objects.delete(oid)


@dataclass
class VerifyReport:
    objects_checked: int = 0
    manifests_checked: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, subject: str, detail: str) -> None:
        self.problems.append({"kind": kind, "subject": subject, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "objects_checked": self.objects_checked,
            "manifests_checked": self.manifests_checked,
            "problems": self.problems,
        }


def verify_store(ctx: StoreContext) -> VerifyReport:
    """Re-hash every object and check every manifest, name and base link. Repairs nothing."""
    report = VerifyReport()
    # Shared gc lock: gc cannot delete objects under our feet. The index is read before the disk
    # is listed, so objects a concurrent writer adds meanwhile are at worst unreferenced, never
    # "missing".
    with file_lock(ctx.locks_dir / "gc.lock", exclusive=False, timeout=600):
        _verify(ctx, report)
    if report.problems:
        logger.warning("verify found %d problem(s)", len(report.problems))
    return report


def _verify(ctx: StoreContext, report: VerifyReport) -> None:
    from deltahub.formats.manifest import ModelKind

    snapshot = ctx.index.snapshot()
    indexed, manifests, links, names = snapshot.objects, snapshot.manifests, snapshot.links, snapshot.names
    ids = list(ctx.objects.iter_ids())
    total = sum(ctx.objects.path_of(oid).stat().st_size for oid in ids)
    with progress_bar(total, "verify", unit="B", unit_scale=True) as bar:
        for oid in ids:
            try:
                got = ctx.objects.hash_content(oid)
                if got != oid:
                    report.add("corrupt-object", oid, f"content hashes to {got}")
            except DeltaHubError as exc:
                report.add("corrupt-object", oid, str(exc))
            report.objects_checked += 1
            bar.update(ctx.objects.path_of(oid).stat().st_size)
    present = set(ids)
    for oid in sorted(indexed - present):
        report.add("missing-object", oid, "indexed but not in objects/")
    manifest_ids = {m.id for m in manifests}
    for name_row in names:
        if name_row.manifest_id not in manifest_ids:
            report.add("dangling-name", name_row.name, f"points at unknown manifest {name_row.manifest_id}")
    for m in manifests:
        report.manifests_checked += 1
        if m.id not in present:
            report.add("missing-object", m.id, "manifest object missing")
            continue
        try:
            manifest = ctx.load_manifest(m.id, verify=False)
        except DeltaHubError as exc:  # damaged, or (UnsupportedFormatError) newer than this installation
            report.add("bad-manifest", m.id, str(exc))
            continue
        for oid in manifest.object_ids():
            if oid not in present:
                report.add("missing-object", oid, f"referenced by manifest {m.id[:12]}")
            if oid not in links.get(m.id, set()):
                report.add("index-mismatch", oid, f"not linked to manifest {m.id[:12]} in the index")
        _check_part_sizes(ctx, m.id, manifest, present, report)
        if manifest.kind is ModelKind.DELTA:
            try:
                ctx.base_of(manifest)
            except DeltaHubError as exc:
                report.add("bad-base", m.id, str(exc))


def _check_part_sizes(ctx: StoreContext, manifest_id: str, manifest: Any, present: set[str], report: VerifyReport) -> None:
    """Every stored part holds the bytes its codec lays out for the tensor's shape, dtype and
    parameters (a manifest whose objects hash right can still describe them wrongly)."""
    from deltahub.formats.safetensors_io import dtype_from_name

    for tname, rec in manifest.tensors.items():
        specs = rec.impl.part_specs(rec.shape, dtype_from_name(rec.dtype), rec.params)
        for part, oid in rec.parts.items():
            if oid not in present:
                continue
            try:
                size = ctx.objects.info(oid).size
            except DeltaHubError:  # reported by the hash pass as corrupt-object
                continue
            if size != specs[part].nbytes:
                report.add("bad-manifest", manifest_id,
                           f"part {part!r} of tensor {tname!r} holds {size} bytes; its {rec.codec} layout needs {specs[part].nbytes}")


def count_names(ctx: StoreContext) -> int:
    return ctx.index.count_names()


def _stores_delta(codec_name: str) -> bool:
    """Whether tensors of that codec are stored as an (approximate) delta to the base."""
    from deltahub import codec as codecs  # torch: not at import (`ls` must not load it)

    try:
        impl = codecs.get(codec_name)
    except codecs.CodecError:
        return False
    return impl.stores_delta
