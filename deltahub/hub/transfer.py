"""Talking to the Hugging Face Hub: every ``huggingface_hub`` call of deltahub goes through here.

Repo info, downloads (one file, or a snapshot of the files a checkpoint needs) and uploads (only the
changed files, in one commit), the offline mode (``HF_HUB_OFFLINE``), retries of transient failures,
and the table mapping ``huggingface_hub`` and transport exceptions to one-line deltahub errors
(:func:`hub_errors`). Auth, ``HF_ENDPOINT``, ``HF_TOKEN``, Xet and LFS are huggingface_hub's: deltahub
has no HTTP client of its own.

This package knows nothing of the store or the index: it never imports ``deltahub.ops``,
``deltahub.store`` or ``deltahub.index``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from deltahub.config import progress_disabled
from deltahub.errors import (
    DiskFullError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
)
from deltahub.fileio import disk_full_error, is_disk_full
from deltahub.hub.layout import file_sha256, git_blob_sha1

logger = logging.getLogger(__name__)
T = TypeVar("T")


def quiet_hf_progress_bars() -> None:
    """Apply ``DELTAHUB_DISABLE_PROGRESS_BARS`` to huggingface_hub's own bars (downloads, uploads,
    Xet) too. huggingface_hub reads ``HF_HUB_DISABLE_PROGRESS_BARS`` once, at import; this turns its
    bars off at run time. Bars are never turned back on: that is the user's HF setting."""
    if not progress_disabled():
        return
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return
    if not are_progress_bars_disabled():
        with warnings.catch_warnings():  # an explicit HF_HUB_DISABLE_PROGRESS_BARS=0 wins, quietly
            warnings.simplefilter("ignore")
            disable_progress_bars()


# ---------------------------------------------------------------------------------------- errors
_TRUE = {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` set (in the environment now, or as huggingface_hub read it at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def check_online(what: str) -> None:
    if offline_mode():
        raise HubConnectionError(f"HF_HUB_OFFLINE is set: {what} needs the Hub", "unset HF_HUB_OFFLINE to go online")


def hub_endpoint() -> str:
    """The Hub huggingface_hub talks to (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:  # pragma: no cover
        return "the Hub"



def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _server_message(exc: BaseException) -> str:
    """The server's own message (``X-Error-Message`` or the body's ``error``), first line; else the
    exception's first line."""
    lines = str(getattr(exc, "server_message", None) or "").strip().splitlines()
    return lines[0].strip() if lines else _first_line(exc)


def _request_path(exc: BaseException) -> str | None:
    """The URL path (no host, no query) of the request that failed, when the exception knows it."""

    def attr(obj: Any, name: str) -> Any:
        try:  # httpx raises RuntimeError for a request it was never given
            return getattr(obj, name, None)
        except Exception:
            return None

    response = attr(exc, "response")
    url = attr(attr(response, "request"), "url") or attr(attr(exc, "request"), "url") or attr(response, "url")
    if url is None:
        return None
    return urlsplit(str(url)).path or "/"


#: The repo endpoints (``repo_info`` with or without a revision): a 404 there means the repo
#: does not exist (or is not visible); a 404 anywhere else keeps the server's message.
_REPO_ENDPOINT = re.compile(r"/api/(models|datasets|spaces)/[^/]+/[^/]+(/revision/[^/]+)?/?$")


def xet_in_use() -> bool:
    """Whether huggingface_hub uploads through Xet: ``hf_xet`` is installed and not disabled
    (``HF_HUB_DISABLE_XET``, as the client read it). Older clients without Xet: False."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    if getattr(constants, "HF_HUB_DISABLE_XET", True):
        return False
    import importlib.util

    return importlib.util.find_spec("hf_xet") is not None


def _hub_error_table() -> list[tuple[type[BaseException], Any]]:
    """huggingface_hub exception -> function building the deltahub error. First match wins."""
    from huggingface_hub import errors as hf

    transport: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):  # whichever HTTP client huggingface_hub uses
        try:
            mod = __import__(module)
        except ImportError:
            continue
        cls = getattr(mod, "TransportError", None) or getattr(getattr(mod, "exceptions", None), "ConnectionError", None)
        if isinstance(cls, type):
            transport.append(cls)

    def repo_not_found(exc, repo):
        err = HubNotFoundError(
            f"repository {repo} not found on {hub_endpoint()} or not visible with your token",
            "check the id, and log in (`hf auth login` or HF_TOKEN) with a token that can see it",
        )
        err.repo_not_found = True  # the repo itself, not a revision or a file (see hub.source)
        return err

    def gated(exc, repo):
        return HubAuthError(
            f"{repo} is a gated repository: your account has no access to its files",
            f"request access on {hub_endpoint()}/{repo}, then log in (`hf auth login` or HF_TOKEN)",
        )

    def revision_not_found(exc, repo):
        return HubNotFoundError(
            f"revision not found in {repo}", "check the revision after @ in REPO_ID@REVISION (a branch, tag or commit id)"
        )

    def http(exc, repo):
        status = _status(exc)
        if status == 401:
            return HubAuthError(
                f"the Hub refused the request to {repo}: not logged in or the token is invalid",
                "run `hf auth login` or set HF_TOKEN to a valid token",
            )
        if status == 403:
            return HubAuthError(
                f"your token may not write to {repo}",
                "use a token with write access to that namespace (`hf auth login`)",
            )
        if status == 404:
            path = _request_path(exc)
            if path is not None and _REPO_ENDPOINT.search(path):
                return repo_not_found(exc, repo)
            return HubNotFoundError(
                f"{hub_endpoint()} answered 404 to {path or 'a request'} for {repo}: {_server_message(exc)}",
                "check the repo id and revision, and that HF_ENDPOINT is a Hub that serves this request",
            )
        err = HubError(f"the Hub answered {status or 'an error'} for {repo}: {_first_line(exc)}", "retry later")
        err.transient = status is None or status >= 500 or status in (408, 429)
        return err

    def offline(exc, repo):
        return HubConnectionError("HF_HUB_OFFLINE is set: this needs the Hub", "unset HF_HUB_OFFLINE to go online")

    def unreachable(exc, repo):
        return HubConnectionError(
            f"cannot reach {hub_endpoint()} ({exc.__class__.__name__})",
            "check your network connection and HF_ENDPOINT",
        )

    def invalid(exc, repo):
        return HubError(f"invalid Hub id or revision: {_first_line(exc)}", "use NAMESPACE/NAME")

    def incomplete(exc, repo):  # huggingface_hub's size check after a short (truncated) download
        if is_disk_full(exc):  # the HF cache's disk is full: not transient, say so
            from deltahub.config import hf_hub_cache

            return disk_full_error(exc, hf_hub_cache(), f"downloading from {repo} into the Hugging Face cache")
        if "Consistency check failed" not in str(exc):
            return None
        err = HubConnectionError(
            f"incomplete download from {repo}: {_first_line(exc)}",
            "nothing was stored; run the command again",
        )
        err.transient = True
        return err

    return [
        (hf.OfflineModeIsEnabled, offline),
        # not in the local cache (local_files_only): callers catch it and say what is missing. Before
        # huggingface_hub 1.0 it subclasses HfHubHTTPError, which would make it a "retry later".
        (hf.LocalEntryNotFoundError, lambda exc, repo: None),
        (hf.GatedRepoError, gated),  # a subclass of RepositoryNotFoundError: first
        (hf.RepositoryNotFoundError, repo_not_found),
        (hf.RevisionNotFoundError, revision_not_found),
        (hf.HfHubHTTPError, http),
        (hf.HFValidationError, invalid),
        *((cls, unreachable) for cls in transport),
        (ConnectionError, unreachable),
        (TimeoutError, unreachable),
        (OSError, incomplete),
    ]


def _from_xet(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) came from the Xet transfer path: raised by ``hf_xet``,
    or a failed request to a Xet endpoint (``/xet-…-token/``, a CAS server), or saying so."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__ or ""
        path = _request_path(current) or ""
        if module.startswith("hf_xet") or "xet" in path.lower() or "xet" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def translate_hub_error(exc: BaseException, repo_id: str, upload: bool = False) -> HubError | DiskFullError | None:
    """The deltahub error for ``exc`` (None: not a Hub failure). ``upload``: ``exc`` came from an
    upload (``create_commit``); when that went through Xet, the error says so and how to avoid it."""
    mapped = None
    for cls, make in _hub_error_table():
        if isinstance(exc, cls):
            mapped = make(exc, repo_id)
            break
    if upload and xet_in_use() and _from_xet(exc) and not isinstance(mapped, (HubAuthError, HubNotFoundError)):
        kind = HubConnectionError if isinstance(mapped, HubConnectionError) else HubError
        return kind(
            f"uploading to {repo_id} through Xet failed: {_first_line(exc)}",
            "retry with HF_HUB_DISABLE_XET=1 to upload through plain LFS; the Hub or mirror at HF_ENDPOINT "
            "may not support Xet",
        )
    return mapped



#: Attempts and first back-off (doubling) for downloads that fail transiently (5xx, 408, 429, a
#: truncated body): huggingface_hub itself retries a file GET only on 408/429.
DOWNLOAD_ATTEMPTS = 4
RETRY_DELAY_S = 1.0


def with_retries(call: Callable[[], T], what: str) -> T:
    """Run ``call`` (which raises deltahub Hub errors), retrying transient failures with back-off."""
    delay = RETRY_DELAY_S
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return call()
        except HubError as exc:
            if not getattr(exc, "transient", False) or attempt == DOWNLOAD_ATTEMPTS:
                raise
            logger.warning("%s failed (%s); retrying in %.1f s", what, exc.message, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextmanager
def hub_errors(repo_id: str, upload: bool = False) -> Iterator[None]:
    """Re-raise huggingface_hub/transport exceptions as one-line deltahub errors.

    Every huggingface_hub call runs inside it, so it also applies ``DELTAHUB_DISABLE_PROGRESS_BARS``
    to huggingface_hub's own bars first. ``upload``: the block uploads (see
    :func:`translate_hub_error`).
    """
    quiet_hf_progress_bars()
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        mapped = translate_hub_error(exc, repo_id, upload=upload)
        if mapped is None:
            raise
        raise mapped from exc


# ---------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class RepoInfo:
    """A model repo at a commit: the commit id and, when the Hub was asked, its file names."""

    repo_id: str
    commit: str
    files: frozenset[str] | None = None


def is_valid_repo_id(repo_id: str) -> bool:
    """Whether huggingface_hub accepts ``repo_id`` (``NAME`` or ``NAMESPACE/NAME``); no request."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo_id: str) -> None:
    """Refuse an invalid repo id with a one-line :class:`HubError` (no request)."""
    from huggingface_hub.utils import validate_repo_id

    with hub_errors(repo_id):
        validate_repo_id(repo_id)


def repo_info(repo_id: str, revision: str) -> RepoInfo:
    """Resolve ``revision`` of model repo ``repo_id`` to its commit (one request), with its files."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id):
        info = HfApi().repo_info(repo_id, revision=revision, repo_type="model")
    return RepoInfo(repo_id, info.sha, frozenset(s.rfilename for s in (info.siblings or [])))


def download_file(repo_id: str, filename: str, commit: str, offline: bool = False) -> Path:
    """One file of ``repo_id`` at ``commit``, into the HF cache (or found there); the local path.
    ``offline``: from the HF cache only, else a :class:`HubConnectionError` saying what is missing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if offline:
        try:
            with hub_errors(repo_id):
                return Path(hf_hub_download(repo_id, filename, revision=commit, repo_type="model", local_files_only=True))
        except LocalEntryNotFoundError:
            raise HubConnectionError(
                f"HF_HUB_OFFLINE is set and {filename} of {repo_id}@{commit[:12]} is not in the HF cache",
                "unset HF_HUB_OFFLINE to download it once",
            ) from None
    with hub_errors(repo_id):
        return Path(hf_hub_download(repo_id, filename, revision=commit, repo_type="model"))


def fetch_file(repo_id: str, filename: str, commit: str, offline: bool = False) -> Path:
    """:func:`download_file`, retrying transient failures (:func:`with_retries`)."""
    return with_retries(lambda: download_file(repo_id, filename, commit, offline), f"downloading {filename} from {repo_id}")


def cached_snapshot(repo_id: str, revision: str, allow_patterns: Sequence[str]) -> Path | None:
    """The HF cache's snapshot folder of ``repo_id`` at ``revision`` (a branch through its ref),
    holding at least the files of ``allow_patterns``, without any request; None when not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, repo_type="model", local_files_only=True, allow_patterns=list(allow_patterns)
            )
        )
    except LocalEntryNotFoundError:
        return None


def download_snapshot(repo_id: str, commit: str, allow_patterns: Sequence[str]) -> Path:
    """Download (what the HF cache lacks of) the files of ``allow_patterns`` at ``commit``; the
    snapshot folder. Transient failures are retried."""
    from huggingface_hub import snapshot_download

    def download() -> Path:
        with hub_errors(repo_id):
            return Path(snapshot_download(repo_id, revision=commit, repo_type="model", allow_patterns=list(allow_patterns)))

    return with_retries(download, f"downloading {repo_id}@{commit[:12]}")


@dataclass
class UploadOutcome:
    """What :func:`upload_changes` did: the files it uploaded and deleted, the new commit (None when
    the branch already held these files) and the commit the branch ends at."""

    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commit: str | None = None
    head: str = ""


def _remote_matches(entry: Any, path: Path) -> bool:
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha == file_sha256(path)
    return getattr(entry, "blob_id", None) == git_blob_sha1(path)


def upload_changes(
    repo_id: str,
    branch: str,
    private: bool,
    message: str,
    folder: Path,
    files: list[str],
    stale_of: Callable[[list[str], list[str]], list[str]],
) -> UploadOutcome:
    """Upload the ``files`` of ``folder`` that ``branch`` of ``repo_id`` does not hold already (git
    blob id for regular files, LFS sha256 for large ones), and delete ``stale_of(remote_files,
    files)``, in ONE commit; no commit when nothing changed. Creates the repo and the branch if needed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        remote_files = api.list_repo_files(repo_id, revision=branch, repo_type="model")
        present = [f for f in files if f in remote_files]
        remote = {e.path: e for e in api.get_paths_info(repo_id, present, revision=branch, repo_type="model")} if present else {}
        changed = [f for f in files if f not in remote or not _remote_matches(remote[f], folder / f)]
        stale = stale_of(remote_files, files)
        if not changed and not stale:
            logger.info("%s@%s already holds these files; nothing to push", repo_id, branch)
            return UploadOutcome(changed, stale, None, api.repo_info(repo_id, revision=branch, repo_type="model").sha)
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in changed]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        with hub_errors(repo_id, upload=True):  # a failed Xet upload says so
            info = api.create_commit(
                repo_id, operations=ops, commit_message=message, revision=branch, repo_type="model"
            )
    return UploadOutcome(changed, stale, info.oid, info.oid)


__all__ = [
    "DOWNLOAD_ATTEMPTS",
    "RETRY_DELAY_S",
    "RepoInfo",
    "UploadOutcome",
    "cached_snapshot",
    "check_online",
    "check_repo_id",
    "download_file",
    "download_snapshot",
    "fetch_file",
    "hub_endpoint",
    "hub_errors",
    "is_valid_repo_id",
    "offline_mode",
    "quiet_hf_progress_bars",
    "repo_info",
    "translate_hub_error",
    "upload_changes",
    "with_retries",
    "xet_in_use",
]
