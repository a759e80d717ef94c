"""The user's Hugging Face cache as deltahub uses it: branch refs and offline revision lookups.

``huggingface_hub`` keeps, per repo, ``<HF_HUB_CACHE>/models--NS--NAME/refs/<branch>`` holding the
commit id a branch was last seen at, and the files under ``snapshots/<commit>/``. deltahub resolves
a branch to a commit itself (one ``repo_info``) and then downloads *by commit*, which leaves no ref
behind; :func:`write_ref` records it, so a later ``HF_HUB_OFFLINE=1`` run can resolve the branch
through :func:`cached_commit` without the network.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from deltahub.config import hf_hub_cache
from deltahub.fileio import write_atomic

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_commit_id(revision: str | None) -> bool:
    return bool(revision) and bool(_COMMIT.match(revision))


def repo_cache_dir(repo_id: str, repo_type: str = "model") -> Path:
    """``<HF_HUB_CACHE>/models--NS--NAME`` (huggingface_hub's own naming)."""
    return hf_hub_cache() / "--".join([f"{repo_type}s", *repo_id.split("/")])


def _ref_path(repo_id: str, revision: str) -> Path | None:
    """The ref file of ``revision``, or None when the name could leave the refs folder."""
    parts = revision.split("/")
    if not revision or revision.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return repo_cache_dir(repo_id) / "refs" / Path(*parts)


def write_ref(repo_id: str, revision: str, commit: str) -> None:
    """Point ``refs/<revision>`` at ``commit`` (temp file + rename: a reader never sees half a ref).

    Nothing is written when ``revision`` is the commit itself. Failures only cost the offline
    shortcut, so they are logged, not raised.
    """
    if not revision or revision == commit or not is_commit_id(commit):
        return
    ref = _ref_path(repo_id, revision)
    if ref is None:
        return
    try:
        if ref.is_file() and ref.read_text(encoding="ascii").strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ref, commit.encode("ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("could not write %s: %s", ref, exc)


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` resolves to in the HF cache, without the network: a full commit id
    as is, a branch or tag through its ``refs/`` file; None when the cache does not know it."""
    if is_commit_id(revision):
        return revision
    ref = _ref_path(repo_id, revision)
    if ref is None:
        return None
    try:
        commit = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if is_commit_id(commit) else None


__all__ = ["cached_commit", "is_commit_id", "repo_cache_dir", "write_ref"]
