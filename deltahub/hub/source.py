"""Where a checkpoint given on the command line comes from: a local folder or a Hub repo.

:func:`resolve_source` is the one place that decides (``add``, ``compress``, ``compress --calibrate``
and ``calibrate``/``eval --finetune`` all call it). The rule, for a spec that is a string:

1. An existing path is local.
2. A spec that starts with ``./``, ``../``, ``/`` or ``~``, holds a backslash or more than one ``/``
   before any ``@``, or is no valid repo id, is a local path (the caller says "no such checkpoint
   directory").
3. ``REPO_ID@REVISION`` (``NAME@REV`` or ``NAMESPACE/NAME@REV``) is a Hub repo: an explicit revision
   says the Hub was meant.
4. ``NAMESPACE/NAME`` without a revision reads as a relative path or a Hub repo; it is the Hub repo
   only if the Hub has it (the same request that resolves its ``main`` branch; offline: if the HF
   cache has it). Otherwise the error names both readings (no folder, no repo), and nothing is
   downloaded. A bare ``NAME`` is a local path (write ``NAME@main`` for a Hub repo without namespace).

A :class:`pathlib.Path` (from the Python API) is always a local folder.

For a Hub repo (:func:`fetch_checkpoint`):

1. The revision (``main`` when none is given, always passed explicitly) is resolved to a commit id
   (one ``repo_info``), and the HF cache's ``refs/<branch>`` is pointed at it.
2. Only what :func:`deltahub.formats.checkpoint.open_checkpoint` reads is downloaded, at that commit,
   into the user's HF cache: ``config.json``, the safetensors weights (and their index), and the
   :data:`AUX_FILES` the repo has. Pickles are never downloaded; a repo with only pickle weights is
   refused. Files already in the HF cache at that commit are not downloaded again; with
   ``HF_HUB_OFFLINE=1`` the cached snapshot is used as is.

Recording the Hub id and commit of a stored base is the index's job (``ops`` joins them).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import (
    HubConnectionError,
    HubError,
    InputError,
    PickleCheckpointError,
)
from deltahub.formats import safe_json
from deltahub.formats.checkpoint import (
    AUX_FILES,
    CONFIG_FILE,
    CONVERT_HINT,
    PULL_HINT,
    WEIGHTS_INDEX,
    open_checkpoint,
    select_weight_files,
)
from deltahub.hub.cache import write_ref
from deltahub.hub.layout import HUB_MANIFEST_FILE, parse_base_repo
from deltahub.hub.transfer import (
    RepoInfo,
    cached_snapshot,
    check_repo_id,
    download_file,
    download_snapshot,
    hub_endpoint,
    is_valid_repo_id,
    offline_mode,
    repo_info,
)

logger = logging.getLogger(__name__)

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^({_PART}/)?{_PART}$")
_REVISION = re.compile(r"^[^\s@]+$")

#: what :func:`source_kind` answers
LOCAL, HUB, EITHER = "local", "hub", "either"


@dataclass(frozen=True)
class Source:
    """A checkpoint folder, and where it came from when that is a Hub repo (its id and commit)."""

    path: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def hub(self) -> tuple[str, str] | None:
        """``(repo_id, commit)`` for a Hub checkpoint, else None."""
        return (self.repo_id, self.commit) if self.repo_id is not None and self.commit is not None else None

    @property
    def label(self) -> str:
        """``hub:REPO_ID@COMMIT`` or the folder (what the index records as a teacher)."""
        return f"hub:{self.repo_id}@{self.commit}" if self.hub else str(self.path)


def _local_path(text: str) -> Path:
    """``text`` as a local path, ``~`` expanded when it can be (``~nosuchuser`` stays as typed)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # no such user, or no home directory
        return Path(text)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def source_kind(spec: str | Path) -> str:
    """:data:`LOCAL`, :data:`HUB` or :data:`EITHER` (a relative path or a Hub repo: the Hub decides),
    by the rule of this module's docstring; no request."""
    if isinstance(spec, Path):
        return LOCAL
    text = str(spec)
    if not text.strip():
        raise InputError("the checkpoint to read is an empty string", "give a checkpoint folder or a Hub REPO_ID[@REVISION]")
    if _exists(_local_path(text)):
        return LOCAL
    if text.startswith(("./", "../", "/", "~")) or text in (".", "..") or "\\" in text:
        return LOCAL
    repo, at, revision = text.partition("@")
    if not _REPO.match(repo):
        return LOCAL  # more than one "/", or characters no repo id has
    if at:  # an explicit revision: the Hub was meant ("a/b@" or "a/b@x@y" is no REPO_ID@REVISION)
        return HUB if _REVISION.match(revision) else LOCAL
    if "/" not in repo or not is_valid_repo_id(repo):
        return LOCAL  # a bare NAME, or "a--b/c" (no repo id)
    return EITHER


def resolve_source(spec: str | Path) -> Source:
    """The checkpoint ``spec`` names: a local folder (not checked here: ``open_checkpoint`` says what
    is wrong with it), or a Hub repo fetched into the HF cache (:func:`fetch_checkpoint`).

    Raises:
        InputError: ``NAMESPACE/NAME`` is neither a folder nor a Hub repo (both readings named).
        HubConnectionError: offline and not in the HF cache (both readings named for ``NAMESPACE/NAME``).
        HubError: the Hub refused or failed (see :mod:`deltahub.hub.transfer`).
    """
    kind = source_kind(spec)
    if kind == LOCAL:
        return Source(spec if isinstance(spec, Path) else _local_path(str(spec)))
    return fetch_checkpoint(str(spec), or_folder=kind == EITHER)


def _where(repo_id: str, commit: str) -> str:
    return f"{repo_id}@{commit[:12]}"


def _no_folder(spec: str) -> str:
    return f"there is no folder {spec!r} (in {os.getcwd()})"


def _wanted_files(repo_id: str, commit: str, names: set[str] | frozenset[str]) -> list[str]:
    """The repo files ``open_checkpoint`` needs (no pickles); refuses repos it could not open."""
    at = _where(repo_id, commit)
    if HUB_MANIFEST_FILE in names:  # the same rule as open_checkpoint for a local folder
        raise InputError(f"{at} holds {HUB_MANIFEST_FILE}: it is a deltahub delta, not a checkpoint", PULL_HINT)
    if CONFIG_FILE not in names:
        raise InputError(f"{at} has no {CONFIG_FILE}: not a Hugging Face checkpoint", "add a Hugging Face checkpoint repo")
    top = {n for n in names if "/" not in n}

    def load_index() -> Any:
        index_path = download_file(repo_id, WEIGHTS_INDEX, commit)
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


def fetch_checkpoint(repo: str, or_folder: bool = False) -> Source:
    """Download (or find in the HF cache) the checkpoint ``REPO_ID[@REVISION]``.

    ``or_folder``: ``repo`` may also have meant a relative folder that does not exist; a repo the
    Hub (or offline, the HF cache) does not have is then an error naming both readings.
    """
    try:
        repo_id, revision = parse_base_repo(repo)
    except ValueError as exc:
        raise InputError(str(exc), "use REPO_ID[@REVISION]") from None
    revision = revision or "main"  # explicit: some mirrors (olah) only resolve /revision/<rev>
    check_repo_id(repo_id)
    if offline_mode():
        # config.json only: the full listing would count files deltahub never downloads;
        # open_checkpoint below says whether the weights are all there.
        folder = cached_snapshot(repo_id, revision, [CONFIG_FILE])
        detail = ""
        if folder is not None:
            try:
                open_checkpoint(folder)
                return Source(folder, repo_id, folder.name)
            except InputError as exc:
                if _weights_cached(folder):
                    raise  # everything is in the cache: a problem with the checkpoint itself, not the network
                detail = f": {exc.message}"
        if or_folder:
            raise HubConnectionError(
                f"{_no_folder(repo)}, and HF_HUB_OFFLINE is set and the Hub repo {repo_id}@{revision} is not in "
                f"the HF cache{detail}",
                "check the path (./PATH always means a folder), or unset HF_HUB_OFFLINE to download the repo once",
            )
        raise HubConnectionError(
            f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the HF cache{detail}",
            "unset HF_HUB_OFFLINE to download it once",
        )
    info = _repo_info(repo, repo_id, revision, or_folder)
    wanted = _wanted_files(repo_id, info.commit, info.files or frozenset())
    folder = download_snapshot(repo_id, info.commit, wanted)
    # As a download by branch would: an offline `add REPO_ID[@BRANCH]` later finds the snapshot.
    write_ref(repo_id, revision, info.commit)
    return Source(folder, repo_id, info.commit)


def _repo_info(spec: str, repo_id: str, revision: str, or_folder: bool) -> RepoInfo:
    """``repo_info``; for a spec that may have meant a folder, a missing repo (or no Hub to ask)
    is an error naming both readings."""
    try:
        return repo_info(repo_id, revision)
    except HubConnectionError as exc:
        if not or_folder:
            raise
        raise HubConnectionError(f"{_no_folder(spec)}, and the Hub cannot be asked for repo {repo_id}: {exc.message}", exc.hint) from exc
    except HubError as exc:
        if not (or_folder and getattr(exc, "repo_not_found", False)):
            raise
        raise InputError(
            f"{_no_folder(spec)} and no Hub repo {repo_id} on {hub_endpoint()} (or it is not visible with your token)",
            "check the path (./PATH always means a folder) or the repo id; for a private repo log in "
            "(`hf auth login` or HF_TOKEN)",
        ) from exc


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


def remember_main(repo_id: str, commit: str | None) -> None:
    """A checkpoint fetched by commit id leaves no branch ref in the HF cache; when that commit is
    the repo's ``main`` (one ``repo_info``), record ``refs/main`` so that an offline
    ``deltahub add REPO_ID`` later finds it. Best effort: any failure only costs that shortcut."""
    if not commit:
        return
    try:
        main = repo_info(repo_id, "main").commit
    except HubError as exc:
        logger.debug("could not resolve %s@main: %s", repo_id, exc)
        return
    if main == commit:
        write_ref(repo_id, "main", commit)


__all__ = [
    "EITHER",
    "HUB",
    "LOCAL",
    "Source",
    "fetch_checkpoint",
    "remember_main",
    "resolve_source",
    "source_kind",
]
