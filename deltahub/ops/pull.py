"""``pull``: fetch a delta pushed by ``deltahub push`` into the store (layout: :mod:`deltahub.hub.layout`).

1. The revision is resolved to a commit id first; every file is downloaded at that commit through
   ``huggingface_hub`` (into the user's HF cache).
2. ``deltahub.json`` is parsed and the store manifest rebuilt from it; its id must be the recorded
   ``manifest``. Unknown formats and versions are refused before anything else is downloaded.
3. The base must be in the store (found by its manifest id, checked against the recorded base
   tensor hashes). When it is not and ``base.hub`` names a repo and revision, it is added from the
   Hub first (:func:`fetch_base_for_pull`); a fetched base that is not the recorded one is a
   ``WrongBaseError`` and the delta is not stored (the fetched base stays under its own name).
4. Every carried file and every stored tensor (read from the downloaded safetensors one at a time)
   is hashed while it is written to the store (once) and compared with ``deltahub.json``; the
   sha256s are the object ids. Any failure, a mismatch included, leaves the store as it was
   (:meth:`StoreContext.writing` rolls back what was written).

When the manifest and all its objects are already in the store, only ``deltahub.json`` is
downloaded.

With ``HF_HUB_OFFLINE=1`` nothing is requested: the revision is resolved through the HF cache's
``refs/<branch>`` (or is a commit id) and every file must already be in the HF cache at that
commit (or the delta already in the store); else a :class:`HubConnectionError` says what is
missing. An online pull writes ``refs/<branch>`` for the commit it resolved, so that works later.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub.errors import (
    CorruptObjectError,
    HubConnectionError,
    HubNotFoundError,
    InputError,
    MalformedSafetensorsError,
    NameExistsError,
    WrongBaseError,
)
from deltahub.formats.checkpoint import carried_file_problem
from deltahub.formats.paths import validate_name
from deltahub.formats.safetensors_io import SafetensorsReader, dtype_from_name, tensor_bytes
from deltahub.hub.cache import cached_commit, is_commit_id, write_ref
from deltahub.formats.manifest import Manifest
from deltahub.hub.layout import (
    HUB_MANIFEST_FILE,
    HubManifest,
    default_pull_name,
    parse_base_repo,
    parse_hub_manifest,
)
from deltahub.hub.source import remember_main
from deltahub.hub.transfer import check_repo_id, fetch_file, offline_mode, repo_info
from deltahub.ops.add import add_from_hub
from deltahub.ops.context import StoreContext, TensorStat
from deltahub.progress import progress_bar
from deltahub.store import Compression, ObjectInfo

logger = logging.getLogger(__name__)


@dataclass
class PullResult:
    repo_id: str
    revision: str  # as asked (default main)
    commit: str  # the commit id it was resolved to; every file was downloaded at this commit
    name: str
    manifest_id: str
    downloaded: list[str] = field(default_factory=list)  # repo files fetched (deltahub.json included)
    bytes: int = 0  # size of the fetched files
    already_stored: bool = False  # the manifest was in the store already: nothing beyond deltahub.json
    base_fetched: str | None = None  # local name of the base fetched from the Hub (base.hub), if any

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]{1,255})?$", re.ASCII)


def looks_like_repo_id(name: str) -> bool:
    """Whether a requested model name is shaped like a Hub repo id (``[owner/]repo[@revision]``): the
    servers pull only such names (``--pull``); anything else (a path, ``..``) is simply unknown."""
    return ".." not in name and _REPO_ID.match(name) is not None


def _corrupt(what: str, where: str) -> CorruptObjectError:
    return CorruptObjectError(
        f"{what} in {where} does not match deltahub.json",
        "the download or the repo is damaged; pull again, or ask the repo's owner to push again",
    )


def _name_target(ctx: StoreContext, name: str) -> str | None:
    entry = ctx.index.get_name(name)
    return entry.manifest_id if entry is not None else None


def _base_stored(ctx: StoreContext, manifest_id: str) -> bool:
    """Whether base ``manifest_id`` is stored: indexed, not merely its objects on disk (a write killed
    between publishing its objects and indexing them leaves those; the delta's index rows need the
    base's)."""
    return ctx.index.manifest(manifest_id) is not None and ctx.objects.exists(manifest_id)


def _check_base(ctx: StoreContext, repo_id: str, hub: HubManifest, reserved: str | None = None) -> str | None:
    """Check the delta's base is stored; fetch it from ``base.hub`` when it is not. Returns the fetched base's name."""
    base = hub.manifest.base
    assert base is not None
    fetched = None
    if not _base_stored(ctx, base.manifest) and hub.base_repo_id:
        if not hub.base_revision:
            # Pushed with `--base-repo REPO_ID` and no revision: the base's main branch is tried, and
            # like any fetched base it must hash to the recorded manifest (else an error naming both).
            logger.warning("%s names base %s without a revision; trying its main branch", repo_id, hub.base_repo_id)
        try:
            fetched = fetch_base_for_pull(
                ctx, repo_id, base.manifest, hub.base_repo_id, hub.base_revision or "main", reserved
            )
        except HubNotFoundError as exc:
            raise WrongBaseError(
                f"the base of {repo_id} ({hub.base_repo_id}@{hub.base_revision or 'main'}, manifest {base.manifest[:12]}) "
                f"is not in the store and cannot be fetched: {exc.message}",
                "download that base and `deltahub add` it first",
            ) from None
    if not _base_stored(ctx, base.manifest):
        where = f"{hub.base_repo_id}@{hub.base_revision or 'main'}" if hub.base_repo_id else "Hub id unknown"
        raise WrongBaseError(
            f"the base of {repo_id} ({where}, manifest {base.manifest[:12]}) is not in the store",
            "download that base and `deltahub add` it first (its Hub id and revision are unknown)",
        )
    ctx.base_of(hub.manifest)  # the recorded base tensor hashes
    return fetched


def pull(ctx: StoreContext, repo: str, name: str | None = None, force: bool = False, bits: int | None = None,
         max_size: int | None = None) -> PullResult:
    """Pull the delta in Hub repo ``repo`` (``REPO_ID[@REVISION]``) into the store as ``name``.

    ``bits``: fetch and store only the first ``bits`` planes of each progressive tensor (a coarser
    delta; the Hub layout puts later planes in later files, which are not downloaded). ``max_size``:
    the longest prefix of the delta's plane order whose tensor data fits that many bytes and ends at
    a file boundary of the repo (:func:`prefix_on_file_boundary`), so no plane is fetched that is not
    kept. ``name`` then points at that prefix's own manifest."""
    try:
        repo_id, revision = parse_base_repo(repo)
    except ValueError as exc:
        raise InputError(str(exc), "use REPO_ID[@REVISION]") from None
    local = validate_name(name if name is not None else default_pull_name(repo_id))
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits < 1):
        raise InputError(f"--bits must be a whole number of planes, 1 or more, got {bits!r}", "use --bits 1, 2, ...")
    revision = revision or "main"  # explicit: some mirrors (olah) only resolve /revision/<rev>
    offline = offline_mode()

    check_repo_id(repo_id)
    if offline:
        # No request at all: the branch is resolved through the HF cache's refs/.
        commit = cached_commit(repo_id, revision)
        if commit is None:
            raise HubConnectionError(
                f"HF_HUB_OFFLINE is set and the HF cache does not know {repo_id}@{revision} (no refs/{revision})",
                f"unset HF_HUB_OFFLINE to download it once, or pull {repo_id}@COMMIT of a cached commit",
            )
        files = None
    else:
        info = repo_info(repo_id, revision)
        commit, files = info.commit, info.files
    at = f"{repo_id}@{commit[:12]}"
    result = PullResult(repo_id, revision, commit, local, "")

    def fetch(fname: str) -> Path:
        path = fetch_file(repo_id, fname, commit, offline)
        result.downloaded.append(fname)
        result.bytes += path.stat().st_size
        return path

    if files is not None and HUB_MANIFEST_FILE not in files:
        raise InputError(
            f"{repo_id}@{revision} is not a deltahub delta: it has no {HUB_MANIFEST_FILE}",
            "pull a repo written by `deltahub push`; add a plain checkpoint with `deltahub add`",
        )
    hub = parse_hub_manifest(fetch(HUB_MANIFEST_FILE).read_bytes())
    if not offline:
        write_ref(repo_id, revision, commit)  # a later offline pull/add of the branch finds it
    manifest, manifest_id = hub.manifest, hub.manifest_id
    if bits is not None or max_size is not None:
        manifest = manifest.select(bits, max_size, f"{repo_id}@{revision}")
        if max_size is not None:
            manifest = prefix_on_file_boundary(hub, max_size, f"{repo_id}@{revision}")
        manifest_id = manifest.manifest_id()
    needed = set(manifest.object_ids())
    tensors = [t for t in hub.tensors if t.stored.object in needed]
    result.manifest_id = manifest_id

    target = _name_target(ctx, local)
    if target is not None and target != manifest_id and not force:
        raise NameExistsError(
            f"the name {local!r} is already taken",
            "choose another --name, `deltahub rm` it first, or pass --force to re-point it",
        )
    result.base_fetched = _check_base(ctx, repo_id, hub, reserved=local)

    with ctx.writing():
        objects: dict[str, ObjectInfo] = {}
        if all(ctx.objects.exists(oid) for oid in [manifest_id, *needed]):
            result.already_stored = True
            objects = {oid: ctx.objects.info(oid) for oid in manifest.object_ids()}
            manifest_info = ctx.objects.info(manifest_id)
        else:
            for fname, sha in hub.files.items():
                data = fetch(fname).read_bytes()
                problem = carried_file_problem(fname, data)  # the checks of add/compress, before storing
                if problem is not None:
                    raise CorruptObjectError(f"{fname} in {at} {problem}", "the repo is damaged or hostile; nothing was stored")
                file_info = ctx.put(data, Compression.AUTO)
                # put() hashes while it writes: a mismatch raises, and the writer's rollback
                # deletes the object it just created, so the store is left as it was.
                if file_info.sha256 != sha:
                    raise _corrupt(f"file {fname}", at)
                objects[file_info.sha256] = file_info
            stored = {t.stored.object for t in tensors if ctx.objects.exists(t.stored.object)}
            tensors = [t for t in tensors if t.stored.object not in stored]  # fetch only what is missing
            objects.update({oid: ctx.objects.info(oid) for oid in stored})
            total = sum(t.stored.spec.nbytes for t in tensors)
            with progress_bar(total, f"pull {local}", unit="B", unit_scale=True) as bar:
                for shard in sorted({t.file for t in tensors}):
                    path = fetch(shard)
                    try:
                        reader = SafetensorsReader(path)
                    except MalformedSafetensorsError as exc:
                        raise CorruptObjectError(f"{shard} in {at} is damaged: {exc.message}", "pull again") from None
                    for t in (t for t in tensors if t.file == shard):
                        entry = reader.entries.get(t.key)
                        if entry is None or entry.dtype != dtype_from_name(t.stored.dtype) or entry.shape != t.stored.shape:
                            raise _corrupt(f"tensor {t.name!r} (file {shard})", at)
                        view = tensor_bytes(reader.read(t.key, copy=False))
                        compressible = manifest.tensors[t.name].impl.compressible
                        tinfo = ctx.put(view, Compression.AUTO if compressible else Compression.NONE)
                        if tinfo.sha256 != t.stored.object:  # hashed while written; rolled back
                            raise _corrupt(f"tensor {t.name!r} (file {shard})", at)
                        objects[tinfo.sha256] = tinfo
                        bar.update(entry.nbytes)
                        del view
            manifest_info = ctx.put(manifest.to_bytes(), Compression.AUTO)
            if manifest_info.sha256 != manifest_id:  # pragma: no cover - checked by parse_hub_manifest
                raise _corrupt("the manifest", at)
        stats = [
            TensorStat(
                tname,
                rec.codec,
                rec.dtype,
                tuple(rec.shape),
                sum(objects[oid].stored_size for oid in rec.parts.values()),
                scale=rec.scale,
            )
            for tname, rec in manifest.tensors.items()
        ]
        ctx.register(manifest, manifest_info, objects, stats, local, force)
    logger.info("pulled %s as %s (manifest %s)", at, local, manifest_id[:12])
    return result


def prefix_on_file_boundary(hub: HubManifest, max_size: int, name: str) -> Manifest:
    """The longest prefix of ``hub``'s plane order that fits ``max_size`` bytes of tensor data
    (:meth:`Manifest.at_size`) and whose files hold no part it leaves out: every file it needs is
    fetched whole, and holds nothing but parts it keeps.

    Raises:
        InputError: ``max_size`` is below the smallest delta.
    """
    full = hub.manifest
    best = m = full.fit_order(max_size, name)
    file_of = {t.stored.object: t.file for t in hub.tensors}
    parts_in: dict[str, set[str]] = {}
    for t in hub.tensors:
        parts_in.setdefault(t.file, set()).add(t.stored.object)
    while True:
        candidate = full.at_order_prefix(m)
        needed = set(candidate.object_ids())
        files = {file_of[oid] for oid in needed if oid in file_of}
        if m == 0 or all(parts_in[f] <= needed for f in files):
            if m < best:
                logger.info("--max-size %d: %d of %d further planes (the last file boundary that fits; %d would fit)",
                            max_size, m, len(full.order()), best)
            return candidate
        m -= 1


def fetch_base_for_pull(ctx: StoreContext, delta_repo: str, base_manifest: str, base_repo_id: str,
                        base_revision: str, reserved: str | None = None) -> str:
    """Add the base a pulled delta names (``base.hub``); returns its local name.

    A base whose manifest is not the one the delta was made from is a :class:`WrongBaseError`
    naming both revisions; the fetched base stays in the store under its own name.
    """
    name = ctx.index.free_name(default_pull_name(base_repo_id), reserved)
    result = add_from_hub(ctx, f"{base_repo_id}@{base_revision}", name=name)
    if result.manifest_id != base_manifest:
        raise WrongBaseError(
            f"the base of {delta_repo} does not match: the delta was made from {base_repo_id}@{base_revision} "
            f"(base manifest {base_manifest[:12]}), but {base_repo_id}@{result.hub_revision} as fetched holds "
            f"other tensors (manifest {result.manifest_id[:12]})",
            f"the delta was not stored; the fetched base was kept as {result.name!r} (`deltahub rm "
            f"{result.name}` to drop it). Add the exact base the delta was made from, then pull again",
        )
    if is_commit_id(base_revision):
        remember_main(base_repo_id, result.hub_revision)
    logger.info(
        "fetched base %s@%s for %s as %s", base_repo_id, (result.hub_revision or "")[:12], delta_repo, result.name
    )
    return result.name
