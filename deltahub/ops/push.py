"""``push``: publish a stored delta as a Hub model repo (layout: :mod:`deltahub.hub.layout`).

The repo's files are built in a temporary folder under the store's ``tmp/``, tensor by tensor
(resident memory stays at about one tensor), then compared with what the target revision already
holds (git blob id for regular files, LFS sha256 for large ones). Only changed files are uploaded,
all in ONE commit; when nothing changed no commit is made. Delta shards of an earlier push that the
new layout no longer has are deleted in the same commit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub.errors import HubError, HubNotFoundError, InputError, NameExistsError
from deltahub.fileio import disk_full_as, write_file
from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES
from deltahub.formats.manifest import ModelKind
from deltahub.formats.paths import join_inside
from deltahub.formats.safetensors_io import SafetensorsWriter
from deltahub.hub.card import render_card
from deltahub.hub.layout import (
    CARD_FILE,
    DELTA_FILE_METADATA,
    HUB_MANIFEST_FILE,
    hub_manifest,
    hub_manifest_bytes,
    is_delta_file,
    parse_base_repo,
    plan_layout,
)
from deltahub.hub.transfer import (
    check_online,
    check_repo_id,
    hub_endpoint,
    repo_info,
    upload_changes,
)
from deltahub.ops.context import StoreContext
from deltahub.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str | None  # the new commit, or None when the revision already held these files
    uploaded: bool
    files: list[str] = field(default_factory=list)
    bytes: int = 0  # total size of the repo files deltahub wrote
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: for a base: the commit the branch holds it at (new or already there); for a delta pushed
    #: with --base-repo: the commit that base repo and revision resolved to when it was checked
    base_commit: str | None = None
    #: with --with-base: the push of the base
    base: PushResult | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "base"}
        out["base"] = self.base.to_json() if self.base is not None else None
        return out


def _still_named(ctx: StoreContext, name: str, manifest_id: str) -> None:
    """Called under :meth:`StoreContext.reading` before the objects are read: ``name`` must still
    point at the manifest resolved when the push started (else it was removed or re-pointed meanwhile)."""
    if ctx.resolve(name).manifest_id != manifest_id:
        raise NameExistsError(
            f"{name!r} was re-pointed to another model while it was being pushed", "run the push again"
        )


def _build(ctx: StoreContext, name: str, manifest_id, manifest, repo_id, base_repo, base_rev, out: Path, max_shard_bytes):
    _still_named(ctx, name, manifest_id)
    layout = plan_layout(manifest, max_shard_bytes)
    n = sum(len(ts) for ts in layout.shards.values())
    with progress_bar(total=n, desc=f"packing {name}", unit="tensor") as bar:
        for fname, tensors in layout.shards.items():
            with SafetensorsWriter(out / fname, [t.spec for t in tensors], metadata=DELTA_FILE_METADATA) as w:
                for t in tensors:
                    w.write(t.name, ctx.read_tensor(t.object, t.dtype, t.shape, verify=True, owned=False))
                    bar.update(1)
    for fname, oid in layout.files.items():
        write_file(join_inside(out, fname), ctx.objects.read(oid, verify=True))
    hub = hub_manifest(manifest, manifest_id, layout, base_repo, base_rev)
    write_file(out / HUB_MANIFEST_FILE, hub_manifest_bytes(hub))
    write_file(out / CARD_FILE, render_card(repo_id, hub, local_name=name, endpoint=hub_endpoint()).encode("utf-8"))
    return sorted([*layout.shards, *layout.files, HUB_MANIFEST_FILE, CARD_FILE])


def _build_base(ctx: StoreContext, name: str, manifest_id: str, manifest, out: Path, max_shard_bytes: int) -> list[str]:
    """Write stored base ``name`` as an ordinary HF checkpoint: its carried files byte for byte
    (so that adding the pushed repo gives the same manifest id) and its tensors in safetensors shards."""
    from deltahub.ops.materialize import write_checkpoint
    from deltahub.ops.reconstruct import ModelSource

    _still_named(ctx, name, manifest_id)
    source = ModelSource.open(ctx, name)
    files = write_checkpoint(source, out, source.specs(None), f"packing base {name}", max_shard_bytes)
    if CARD_FILE not in files:
        write_file(out / CARD_FILE, render_base_card(out, manifest).encode("utf-8"))
        files.append(CARD_FILE)
    return sorted(files)


def render_base_card(out: Path, manifest) -> str:
    arch = ", ".join(manifest.architectures) or "unknown architecture"
    return (
        "---\nlibrary_name: transformers\ntags:\n- deltahub-base\n---\n\n"
        f"# Base model ({arch}, {manifest.dtype})\n\n"
        "An ordinary Hugging Face checkpoint, pushed by deltahub as the base of 1-bit deltas "
        "(`deltahub pull` fetches it when a delta needs it).\n"
    )


def _upload(
    ctx: StoreContext, repo_id: str, branch: str, private: bool, message: str, build, stale_of
) -> tuple[PushResult, str]:
    """Build the repo files in a temporary folder, upload what changed in one commit.

    ``build(tmp) -> files``; ``stale_of(remote_files, files) -> files to delete``. Returns the
    result and the commit id the branch ends at.
    """
    check_repo_id(repo_id)
    # push-<pid>-*: `gc` removes the staging folders of processes that no longer run.
    tmp = Path(tempfile.mkdtemp(prefix=f"push-{os.getpid()}-", dir=ctx.objects.tmp_dir))
    try:
        with ctx.reading(), disk_full_as(ctx.objects.tmp_dir, f"staging the files to push to {repo_id}"):
            files = build(tmp)  # gc waits until the files are built
        total = sum((tmp / f).stat().st_size for f in files)
        outcome = upload_changes(repo_id, branch, private, message, tmp, files, stale_of)
        result = PushResult(
            repo_id, branch, outcome.commit, outcome.commit is not None, files, total, outcome.changed, outcome.deleted
        )
        return result, outcome.head
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_base(
    ctx: StoreContext,
    name: str,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> PushResult:
    """Push stored base ``name`` to ``repo_id`` as an ordinary checkpoint and record it there
    (so deltas on it push without ``--base-repo``)."""
    resolved = ctx.resolve(name)
    if resolved.manifest.kind is not ModelKind.BASE:
        raise InputError(f"{name!r} is not a base model", "push deltas with `deltahub push NAME REPO_ID`")
    if max_shard_bytes <= 0:
        raise InputError("the shard size must be positive", "use e.g. --max-shard-size 5GB")
    check_online("deltahub push")
    weights = ("model.safetensors", "model.safetensors.index.json")

    def stale_of(remote_files: list[str], files: list[str]) -> list[str]:
        return sorted(
            f for f in remote_files
            if f not in files and (f in weights or (f.startswith("model-") and f.endswith(".safetensors")))
        )

    result, commit = _upload(
        ctx,
        repo_id,
        revision or "main",
        private,
        message or f"Push deltahub base {name}",
        lambda tmp: _build_base(ctx, name, resolved.manifest_id, resolved.manifest, tmp, max_shard_bytes),
        stale_of,
    )
    ctx.index.set_hub_source(resolved.manifest_id, repo_id, commit)
    result.base_commit = commit
    return result


def push(
    ctx: StoreContext,
    name: str,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
    base_repo: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    with_base: bool = False,
) -> PushResult:
    """Push stored model ``name`` to Hub model repo ``repo_id`` (branch ``revision``, default main).

    A delta is pushed in the deltahub layout; a base as an ordinary checkpoint (:func:`push_base`).
    ``with_base`` pushes the delta's base too, to ``base_repo`` (default ``REPO_ID-base``), first.
    """
    resolved = ctx.resolve(name)
    manifest = resolved.manifest
    if manifest.kind is ModelKind.BASE:
        if with_base or base_repo:
            raise InputError(f"{name!r} is a base model", "--with-base and --base-repo are for deltas")
        return push_base(ctx, name, repo_id, revision, private, message, max_shard_bytes)
    assert manifest.base is not None
    base_result: PushResult | None = None
    if with_base:
        base_target = base_repo or f"{repo_id}-base"
        try:
            base_id, base_rev = parse_base_repo(base_target)
        except ValueError as exc:
            raise InputError(str(exc), "use --base-repo NAMESPACE/NAME (a branch with @BRANCH)") from None
        base_name = _base_name(ctx, manifest.base.manifest)
        base_result = push_base(ctx, base_name, base_id, base_rev, private, None, max_shard_bytes)
        base_rev = base_result.base_commit
    elif base_repo is not None:
        try:
            base_id, base_rev = parse_base_repo(base_repo)
        except ValueError as exc:
            raise InputError(str(exc), "use --base-repo NAMESPACE/NAME[@REVISION]") from None
    else:
        base_id, base_rev = manifest.base.hub_repo_id, manifest.base.hub_revision
        if not base_id:  # a base added from the Hub: its id and commit are in the index
            base_id, base_rev = ctx.index.hub_source(manifest.base.manifest) or (None, None)
        if not base_id or not base_rev:
            raise HubError(
                f"the base of {name!r} has no Hub id and revision, so nobody could pull it",
                "say where the base lives with --base-repo REPO_ID[@REVISION], or push it too with --with-base",
            )
    if max_shard_bytes <= 0:
        raise InputError("the shard size must be positive", "use e.g. --max-shard-size 5GB")
    check_online("deltahub push")
    base_commit = _check_base_repo(base_id, base_rev) if base_repo is not None and not with_base else None
    result, _commit = _upload(
        ctx,
        repo_id,
        revision or "main",
        private,
        message or f"Push deltahub delta {name}",
        lambda tmp: _build(ctx, name, resolved.manifest_id, manifest, repo_id, base_id, base_rev, tmp, max_shard_bytes),
        lambda remote_files, files: sorted(f for f in remote_files if is_delta_file(f) and f not in files),
    )
    result.base = base_result
    if base_commit is not None:
        result.base_commit = base_commit
    return result


def _check_base_repo(repo_id: str, revision: str | None) -> str:
    """``--base-repo REPO_ID[@REVISION]`` must name a repo that exists at that revision on the
    configured endpoint (one ``repo_info``, before anything is uploaded). Returns its commit id."""
    at = f"{repo_id}@{revision or 'main'}"
    try:
        check_repo_id(repo_id)
        info = repo_info(repo_id, revision or "main")
    except HubNotFoundError as exc:
        raise HubNotFoundError(
            f"--base-repo {at} is not on {hub_endpoint()}: {exc.message}; nothing was pushed",
            "push the base first (`deltahub push BASE_NAME REPO_ID`, or --with-base), or fix the id or the revision after @",
        ) from None
    logger.info("base %s (--base-repo) is at commit %s", at, info.commit)
    return info.commit


def _base_name(ctx: StoreContext, base_manifest: str) -> str:
    """A name pointing at ``base_manifest`` (the base must be in the store to be pushed)."""
    names = ctx.index.names_of(base_manifest)
    if not names:
        raise InputError(
            f"the base {base_manifest[:12]} has no name in this store, so it cannot be pushed",
            "name it (`deltahub add` the base folder again) or use --base-repo",
        )
    return names[0]
