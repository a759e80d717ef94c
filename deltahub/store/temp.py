"""The store's ``tmp/`` folder: what is in it, which entries are stale, and removing them.

Entries are named ``<kind>-<pid>-<random>``: temporary objects (``obj-<pid>-….tmp``, see ``writer``)
and push staging folders (``push-<pid>-…/``); ``push_<pid>_…`` folders come from older versions.
An entry whose process no longer runs is stale; ``gc`` removes it (a folder recursively, never
following a symbolic link) and ``du`` counts every entry.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from deltahub.errors import StoreError

#: ``<kind>-<pid>-…`` (and the old ``<kind>_<pid>_…``): group 1 is the writer's pid.
TEMP_RE = re.compile(r"^[a-z]+[-_](\d+)[-_]")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tree_bytes(path: Path, blocks: bool = False) -> int:
    """Bytes of a file, or of every regular file under a folder (symlinks not followed); with
    ``blocks``, the disk blocks they use (``st_blocks``: a tiny file counts its whole block)."""

    def size(st: os.stat_result) -> int:
        return st.st_blocks * 512 if blocks else st.st_size

    try:
        if path.is_symlink() or not path.is_dir():
            return size(path.lstat())
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, f)):
                total += size(st)
    return total


def stale_temp_files(tmp_dir: Path) -> list[Path]:
    """Temporary files and folders in ``tmp_dir`` left by processes that no longer run."""
    stale = []
    for entry in tmp_dir.iterdir():
        match = TEMP_RE.match(entry.name)
        if match is not None and not pid_alive(int(match.group(1))):
            stale.append(entry)
    return stale


def remove_temp(tmp_dir: Path, path: Path) -> int:
    """Remove a temporary file or folder of ``tmp_dir`` (never following symlinks); returns the bytes freed."""
    if path.parent != tmp_dir:
        raise StoreError(f"{path} is not in {tmp_dir}")
    freed = tree_bytes(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return freed if not path.exists() and not path.is_symlink() else 0


def temp_usage(tmp_dir: Path) -> tuple[int, int]:
    """(entries, bytes) in ``tmp_dir``: temporary objects and push staging folders."""
    entries = list(tmp_dir.iterdir()) if tmp_dir.is_dir() else []
    return len(entries), sum(tree_bytes(e) for e in entries)
