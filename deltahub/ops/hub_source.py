"""Bases from the Hugging Face Hub: ``deltahub add REPO_ID[@REVISION]`` and the base step of ``pull``.

1. The revision (``main`` when none is given, always passed explicitly) is resolved to a commit id
   (``HfApi.repo_info(...).sha``), and the HF cache's ``refs/<branch>`` is pointed at it.
2. Only what :func:`deltahub.formats.checkpoint.open_checkpoint` reads is downloaded, at that commit,
   with ``snapshot_download(allow_patterns=[...])`` into the user's HF cache: ``config.json``, the
   safetensors weights (and their index), and the :data:`AUX_FILES` the repo has. Pickles are never
   downloaded; a repo with only pickle weights is refused. Files already in the HF cache at that
   commit are not downloaded again; with ``HF_HUB_OFFLINE=1`` the cached snapshot is used as is.
3. The snapshot folder is added like a local checkpoint, and the Hub id and commit are recorded in
   the index (``ManifestRow.info`` = ``{"hub": {"repo_id": ..., "revision": <commit>}}``; the base
   manifest itself stays content-derived), so ``push`` of a delta on that base needs no
   ``--base-repo``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from deltahub.errors import HubConnectionError, HubError, InputError, PickleCheckpointError, WrongBaseError
from deltahub.formats.checkpoint import (
    AUX_FILES,
    CONFIG_FILE,
    CONVERT_HINT,
    PULL_HINT,
    WEIGHTS_INDEX,
    open_checkpoint,
    select_weight_files,
)
from deltahub.formats import safe_json
from deltahub.hub.cache import is_commit_id, write_ref
from deltahub.hub.layout import (
    HUB_MANIFEST_FILE,
    default_pull_name,
    hub_errors,
    offline_mode,
    parse_base_repo,
    with_retries,
)
from deltahub.index.models import ManifestRow, NameRow
from deltahub.ops.context import StoreContext

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^\s@]+)?$")


def looks_like_hub_id(src: str | Path) -> bool:
    """``namespace/name[@revision]`` that is not an existing local path."""
    text = str(src)
    return not Path(text).exists() and bool(_HUB_ID.match(text))


def _where(repo_id: str, commit: str) -> str:
    return f"{repo_id}@{commit[:12]}"


def _wanted_files(repo_id: str, commit: str, names: set[str]) -> list[str]:
    """The repo files ``open_checkpoint`` needs (no pickles); refuses repos it could not open."""
    from huggingface_hub import hf_hub_download

    at = _where(repo_id, commit)
    if HUB_MANIFEST_FILE in names:  # the same rule as open_checkpoint for a local folder
        raise InputError(f"{at} holds {HUB_MANIFEST_FILE}: it is a deltahub delta, not a checkpoint", PULL_HINT)
    if CONFIG_FILE not in names:
        raise InputError(f"{at} has no {CONFIG_FILE}: not a Hugging Face checkpoint", "add a Hugging Face checkpoint repo")
    top = {n for n in names if "/" not in n}

    def load_index() -> Any:
        with hub_errors(repo_id):
            index_path = hf_hub_download(repo_id, WEIGHTS_INDEX, revision=commit, repo_type="model")
        return safe_json.loads(Path(index_path).read_bytes(), WEIGHTS_INDEX)

    try:
        weights = select_weight_files(top, at, load_index)
    except PickleCheckpointError as exc:
        raise PickleCheckpointError(
            f"{exc.message}; deltahub never downloads them", CONVERT_HINT.replace("SRC", repo_id)
        ) from None
    if WEIGHTS_INDEX in top:
        weights = [WEIGHTS_INDEX, *weights]
    return [CONFIG_FILE, *weights, *(n for n in AUX_FILES if n in top)]


def fetch_checkpoint(repo: str) -> tuple[str, str, Path]:
    """Download (or find in the HF cache) the checkpoint ``REPO_ID[@REVISION]``.

    Returns (repo_id, commit id, snapshot folder).
    """
    try:
        repo_id, revision = parse_base_repo(repo)
    except ValueError as exc:
        raise InputError(str(exc), "use REPO_ID[@REVISION]") from None
    revision = revision or "main"  # explicit: some mirrors (olah) only resolve /revision/<rev>
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    with hub_errors(repo_id):
        validate_repo_id(repo_id)
    if offline_mode():
        try:
            folder = Path(
                # config.json only: the full listing would count files deltahub never downloads;
                # open_checkpoint below says whether the weights are all there.
                snapshot_download(
                    repo_id, revision=revision, repo_type="model", local_files_only=True, allow_patterns=[CONFIG_FILE]
                )
            )
            open_checkpoint(folder)
        except (LocalEntryNotFoundError, InputError) as exc:
            if isinstance(exc, InputError) and _weights_cached(folder):
                raise  # everything is in the cache: a problem with the checkpoint itself, not the network
            detail = f": {exc.message}" if isinstance(exc, InputError) else ""
            raise HubConnectionError(
                f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the HF cache{detail}",
                "unset HF_HUB_OFFLINE to download it once",
            ) from None
        return repo_id, folder.name, folder
    with hub_errors(repo_id):
        info = HfApi().repo_info(repo_id, revision=revision, repo_type="model")
    commit = info.sha
    wanted = _wanted_files(repo_id, commit, {s.rfilename for s in (info.siblings or [])})
    def download() -> Path:
        with hub_errors(repo_id):
            return Path(snapshot_download(repo_id, revision=commit, repo_type="model", allow_patterns=wanted))

    folder = with_retries(download, f"downloading {repo_id}@{commit[:12]}")
    # As a download by branch would: an offline `add REPO_ID[@BRANCH]` later finds the snapshot.
    write_ref(repo_id, revision, commit)
    return repo_id, commit, folder


def _weights_cached(folder: Path) -> bool:
    """Whether a cached snapshot holds its weight files (all shards its index lists, or a
    ``.safetensors`` file): then ``open_checkpoint``'s complaint is about the content, not a gap in
    the cache."""
    try:
        names = {p.name for p in folder.iterdir()}
        if WEIGHTS_INDEX in names:
            index = safe_json.loads((folder / WEIGHTS_INDEX).read_bytes(), f"{WEIGHTS_INDEX} of {folder}")
            return {str(f) for f in index["weight_map"].values()} <= names
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InputError):
        return True
    return any(n.endswith(".safetensors") for n in names)


def record_hub_source(ctx: StoreContext, manifest_id: str, repo_id: str, commit: str) -> None:
    """Remember in the index that base ``manifest_id`` is ``repo_id`` at ``commit``."""
    with ctx.index.session() as session:
        row = session.get(ManifestRow, manifest_id)
        if row is None:  # pragma: no cover - registered just before
            return
        info = json.loads(row.info) if row.info else {}
        info["hub"] = {"repo_id": repo_id, "revision": commit}
        row.info = json.dumps(info, sort_keys=True)


def hub_source_of(ctx: StoreContext, manifest_id: str) -> tuple[str, str] | None:
    """(repo_id, commit) recorded for a base added from the Hub, else None."""
    with ctx.index.session(write=False) as session:
        row = session.get(ManifestRow, manifest_id)
        raw = row.info if row is not None else None
    try:
        hub = (json.loads(raw) if raw else {}).get("hub") or {}
    except ValueError:
        return None
    if isinstance(hub, dict) and hub.get("repo_id") and hub.get("revision"):
        return str(hub["repo_id"]), str(hub["revision"])
    return None


def add_from_hub(
    ctx: StoreContext,
    repo: str,
    name: str | None = None,
    force: bool = False,
    copy: bool = False,
    allow_nonfinite: bool = False,
):
    """``deltahub add REPO_ID[@REVISION]``: add a base straight from the Hub (or the HF cache).

    The weights stay in the HF cache and the store keeps references to them, unless ``copy``.
    """
    from deltahub.ops.add import add_base

    repo_id, commit, folder = fetch_checkpoint(repo)
    result = add_base(
        ctx, folder, name=name if name is not None else default_pull_name(repo_id), force=force, copy=copy,
        allow_nonfinite=allow_nonfinite,
    )
    record_hub_source(ctx, result.manifest_id, repo_id, commit)
    result.hub_repo_id, result.hub_revision = repo_id, commit
    logger.info("base %s is %s", result.name, _where(repo_id, commit))
    return result


def _free_name(ctx: StoreContext, name: str, reserved: str | None) -> str:
    with ctx.index.session(write=False) as session:
        candidate, n = name, 1
        while candidate == reserved or session.get(NameRow, candidate) is not None:
            n += 1
            candidate = f"{name[:120]}-{n}"
    return candidate


def fetch_base_for_pull(ctx: StoreContext, delta_repo: str, base_manifest: str, base_repo_id: str,
                        base_revision: str, reserved: str | None = None) -> str:
    """Add the base a pulled delta names (``base.hub``); returns its local name.

    A base whose manifest is not the one the delta was made from is a :class:`WrongBaseError`
    naming both revisions; the fetched base stays in the store under its own name.
    """
    name = _free_name(ctx, default_pull_name(base_repo_id), reserved)
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
        _remember_main(base_repo_id, result.hub_revision)
    logger.info("fetched base %s for %s as %s", _where(base_repo_id, result.hub_revision), delta_repo, result.name)
    return result.name


def _remember_main(repo_id: str, commit: str | None) -> None:
    """A base fetched by commit id leaves no branch ref in the HF cache; when that commit is the
    repo's ``main`` (one ``repo_info``), record ``refs/main`` so that an offline
    ``deltahub add REPO_ID`` later finds it. Best effort: any failure only costs that shortcut."""
    if not commit:
        return
    from huggingface_hub import HfApi

    try:
        with hub_errors(repo_id):
            main = HfApi().repo_info(repo_id, revision="main", repo_type="model").sha
    except HubError as exc:
        logger.debug("could not resolve %s@main: %s", repo_id, exc)
        return
    if main == commit:
        write_ref(repo_id, "main", commit)
