"""``add``: import a base model from a local Hugging Face checkpoint directory, or from the Hub.

A base from the Hub (``deltahub add REPO_ID[@REVISION]``, and the base step of ``pull``) is fetched
into the HF cache (:func:`deltahub.hub.source.fetch_checkpoint`: pinned to its commit, no pickles,
offline from the cache), added like a local checkpoint, and its Hub id and commit are recorded in the
index (the manifest row's ``info``: ``{"hub": {"repo_id": ..., "revision": <commit>}}``; the base
manifest itself stays content-derived), so ``push`` of a delta on that base needs no
``--base-repo``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from deltahub import codec as codecs
from deltahub.config import hf_hub_cache
from deltahub.formats.checkpoint import open_checkpoint
from deltahub.formats.manifest import Manifest, ModelKind, TensorRecord
from deltahub.formats.paths import validate_name
from deltahub.formats.safetensors_io import dtype_name, tensor_bytes
from deltahub.hub.layout import default_pull_name
from deltahub.hub.source import Source, fetch_checkpoint, resolve_source
from deltahub.ops.context import StoreContext, TensorStat
from deltahub.ops.files import store_files
from deltahub.ops.finite import check_finite
from deltahub.progress import progress_bar
from deltahub.store import Compression, ObjectInfo
from deltahub.store.objects import Encoding

logger = logging.getLogger(__name__)


@dataclass
class AddResult:
    name: str
    manifest_id: str
    n_tensors: int
    stored_bytes: int
    hub_repo_id: str | None = None  # set when added from the Hub (add_from_hub)
    hub_revision: str | None = None  # the commit id it was downloaded at
    #: bytes of weights left in the Hugging Face cache and stored as references (not copied)
    referenced_bytes: int = 0


def default_name(src: Path) -> str:
    """A valid model name derived from the source folder's name."""
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(src).resolve().name).strip(".-_") or "model"
    return validate_name(name.replace("..", ".")[:128])


def hf_cache_blob(path: Path) -> str | None:
    """``path``'s blob relative to the Hugging Face hub cache, when it is one (a snapshot file of
    the cache is a symlink to ``models--*/blobs/<hash>``); else None."""
    try:
        cache = hf_hub_cache().resolve()
        real = Path(path).resolve()
    except OSError:
        return None
    if not real.is_file() or not real.is_relative_to(cache) or real.parent.name != "blobs":
        return None
    return real.relative_to(cache).as_posix()


def add_base(
    ctx: StoreContext,
    src: Path | str,
    name: str | None = None,
    force: bool = False,
    copy: bool = False,
    allow_nonfinite: bool = False,
) -> AddResult:
    """Store every tensor of ``src`` raw (memory-mappable) and record it as a base model.

    ``src`` that is no local path but a Hub ``REPO_ID[@REVISION]`` is fetched from the Hub
    (:func:`add_from_hub`; the rule is :func:`deltahub.hub.source.resolve_source`'s). Weights that
    are blobs of the Hugging Face cache are stored as *references* to their bytes there (no second
    copy; every read re-hashes them) unless ``copy``.
    ``name=None`` derives the name from the folder (or repo); any given name, ``""`` included, must
    be valid. A floating tensor holding NaN/Inf is refused unless ``allow_nonfinite``
    (:mod:`deltahub.ops.finite`).
    """
    if name is not None:
        validate_name(name)  # "" is an invalid name, never "use the default"
    source = resolve_source(src)
    if source.hub is not None:
        return add_from_hub(ctx, source, name=name, force=force, copy=copy, allow_nonfinite=allow_nonfinite)
    src = source.path
    name = name if name is not None else default_name(src)
    checkpoint = open_checkpoint(Path(src))
    ctx.check_name_free(name, force)
    records: dict[str, TensorRecord] = {}
    objects: dict[str, ObjectInfo] = {}
    stats: list[TensorStat] = []
    with ctx.writing():
        files, file_infos = store_files(ctx, checkpoint)
        objects.update(file_infos)
        names = sorted(checkpoint.tensors)
        with progress_bar(checkpoint.total_bytes(), f"add {name}", unit="B", unit_scale=True) as bar:
            blobs: dict[Path, str | None] = {}
            for tname in names:
                reader, entry = checkpoint.tensors[tname]
                if reader.path not in blobs:
                    blobs[reader.path] = None if copy else hf_cache_blob(reader.path)
                blob = blobs[reader.path]
                tensor = None
                if not allow_nonfinite and entry.dtype.is_floating_point and entry.nbytes:
                    tensor = checkpoint.read(tname, copy=False)
                    check_finite(tensor, tname, "the base")  # refused: the writer rolls back
                if blob is not None and entry.nbytes:
                    info = ctx.put_ref(blob, entry.start, entry.nbytes)
                else:
                    if tensor is None:
                        tensor = checkpoint.read(tname, copy=False)
                    info = ctx.put(tensor_bytes(tensor), Compression.NONE)
                del tensor
                dtype, shape = dtype_name(entry.dtype), tuple(entry.shape)
                objects[info.sha256] = info
                dense = codecs.DENSE  # a base stores every tensor as it is
                records[tname] = TensorRecord(tname, dense.name, dtype, shape, parts={dense.part_names[0]: info.sha256})
                stats.append(TensorStat(tname, dense.name, dtype, shape, info.stored_size))
                bar.update(info.size)
        manifest = Manifest(
            kind=ModelKind.BASE,
            model_type=checkpoint.model_type,
            architectures=checkpoint.architectures,
            dtype=dtype_name(checkpoint.main_dtype()),
            files=files,
            tensors=records,
        )
        manifest_info = ctx.put(manifest.to_bytes(), Compression.AUTO)
        manifest_id = ctx.register(manifest, manifest_info, objects, stats, name, force)
    logger.info("added base %s (%s)", name, manifest_id[:12])
    unique = {oid: info for oid, info in objects.items()}
    referenced = sum(i.size for i in unique.values() if i.encoding is Encoding.REF)
    return AddResult(
        name, manifest_id, len(records), sum(i.stored_size for i in unique.values()), referenced_bytes=referenced
    )


def add_from_hub(
    ctx: StoreContext,
    repo: str | Source,
    name: str | None = None,
    force: bool = False,
    copy: bool = False,
    allow_nonfinite: bool = False,
) -> AddResult:
    """``deltahub add REPO_ID[@REVISION]``: add a base straight from the Hub (or the HF cache).

    ``repo``: ``REPO_ID[@REVISION]``, or a checkpoint already fetched. The weights stay in the HF
    cache and the store keeps references to them, unless ``copy``.
    """
    source = fetch_checkpoint(repo) if isinstance(repo, str) else repo
    assert source.repo_id is not None and source.commit is not None
    result = add_base(
        ctx, source.path, name=name if name is not None else default_pull_name(source.repo_id), force=force,
        copy=copy, allow_nonfinite=allow_nonfinite,
    )
    ctx.index.set_hub_source(result.manifest_id, source.repo_id, source.commit)
    result.hub_repo_id, result.hub_revision = source.repo_id, source.commit
    logger.info("base %s is %s@%s", result.name, source.repo_id, source.commit[:12])
    return result
