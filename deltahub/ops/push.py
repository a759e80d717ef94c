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

from deltahub.errors import HubError, InputError
from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES
from deltahub.formats.manifest import ModelKind
from deltahub.formats.paths import join_inside
from deltahub.formats.safetensors_io import SafetensorsWriter
from deltahub.hub.card import render_card
from deltahub.hub.layout import (
    CARD_FILE,
    DELTA_FILE_METADATA,
    HUB_MANIFEST_FILE,
    check_online,
    file_sha256,
    git_blob_sha1,
    hub_errors,
    hub_manifest,
    hub_manifest_bytes,
    is_delta_file,
    parse_base_repo,
    plan_layout,
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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _build(ctx: StoreContext, name: str, manifest_id, manifest, repo_id, base_repo, base_rev, out: Path, max_shard_bytes):
    layout = plan_layout(manifest, max_shard_bytes)
    n = sum(len(ts) for ts in layout.shards.values())
    with progress_bar(total=n, desc=f"packing {name}", unit="tensor") as bar:
        for fname, tensors in layout.shards.items():
            with SafetensorsWriter(out / fname, [t.spec for t in tensors], metadata=DELTA_FILE_METADATA) as w:
                for t in tensors:
                    w.write(t.name, ctx.read_tensor(t.object, t.dtype, t.shape, verify=True, owned=False))
                    bar.update(1)
    for fname, oid in layout.files.items():
        join_inside(out, fname).write_bytes(ctx.objects.read(oid, verify=True))
    hub = hub_manifest(manifest, manifest_id, layout, base_repo, base_rev)
    (out / HUB_MANIFEST_FILE).write_bytes(hub_manifest_bytes(hub))
    (out / CARD_FILE).write_text(render_card(repo_id, hub, local_name=name), encoding="utf-8")
    return sorted([*layout.shards, *layout.files, HUB_MANIFEST_FILE, CARD_FILE])


def _remote_matches(entry: Any, path: Path) -> bool:
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha == file_sha256(path)
    return getattr(entry, "blob_id", None) == git_blob_sha1(path)


def push(
    ctx: StoreContext,
    name: str,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
    base_repo: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> PushResult:
    """Push stored delta ``name`` to Hub model repo ``repo_id`` (branch ``revision``, default main)."""
    resolved = ctx.resolve(name)
    manifest = resolved.manifest
    if manifest.kind is not ModelKind.DELTA:
        raise InputError(
            f"{name!r} is a base model; deltahub pushes deltas only for now",
            "push the delta; `--with-base` comes later (upload the base with `hf upload`)",
        )
    assert manifest.base is not None
    if base_repo is not None:
        try:
            base_id, base_rev = parse_base_repo(base_repo)
        except ValueError as exc:
            raise InputError(str(exc), "use --base-repo NAMESPACE/NAME[@REVISION]") from None
    else:
        base_id, base_rev = manifest.base.hub_repo_id, manifest.base.hub_revision
        if not base_id:  # a base added from the Hub: its id and commit are in the index
            from deltahub.ops.hub_source import hub_source_of

            base_id, base_rev = hub_source_of(ctx, manifest.base.manifest) or (None, None)
        if not base_id or not base_rev:
            raise HubError(
                f"the base of {name!r} has no Hub id and revision, so nobody could pull it",
                "say where the base lives with --base-repo REPO_ID[@REVISION]",
            )
    if max_shard_bytes <= 0:
        raise InputError("the shard size must be positive", "use e.g. --max-shard-size 5GB")
    check_online("deltahub push")

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import validate_repo_id

    with hub_errors(repo_id):
        validate_repo_id(repo_id)
    branch = revision or "main"
    tmp = Path(tempfile.mkdtemp(prefix=f"push_{os.getpid()}_", dir=ctx.objects.tmp_dir))
    try:
        files = _build(ctx, name, resolved.manifest_id, manifest, repo_id, base_id, base_rev, tmp, max_shard_bytes)
        total = sum((tmp / f).stat().st_size for f in files)
        api = HfApi()
        with hub_errors(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
            remote_files = api.list_repo_files(repo_id, revision=branch, repo_type="model")
            present = [f for f in files if f in remote_files]
            remote = {e.path: e for e in api.get_paths_info(repo_id, present, revision=branch, repo_type="model")} if present else {}
            changed = [f for f in files if f not in remote or not _remote_matches(remote[f], tmp / f)]
            stale = sorted(f for f in remote_files if is_delta_file(f) and f not in files)
            result = PushResult(repo_id, branch, None, False, files, total, changed, stale)
            if not changed and not stale:
                logger.info("%s@%s already holds %s; nothing to push", repo_id, branch, name)
                return result
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(tmp / f)) for f in changed]
            ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
            info = api.create_commit(
                repo_id,
                operations=ops,
                commit_message=message or f"Push deltahub delta {name}",
                revision=branch,
                repo_type="model",
            )
        result.commit = info.oid
        result.uploaded = True
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
