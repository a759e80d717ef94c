"""Names and relative paths that can never escape the store or an output directory (invariant 8)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from deltahub.errors import InvalidNameError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ +-]{0,254}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidNameError`.

    A name is 1–128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
    digit; it holds no ``/`` and is never ``..``.
    """
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {name!r}",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "with no '/' or '..'",
        )
    return name


def safe_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path (from a manifest or index file).

    Refuses absolute paths, ``..`` and ``.`` components, backslashes, empty components and
    hidden names; each component is letters, digits and ``._ +-``.
    """
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise InvalidNameError(f"unsafe file name {path!r} in manifest or checkpoint index")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(
        part in {"", ".", ".."} or not _FILE_PART_RE.match(part) for part in path.split("/")
    ):
        raise InvalidNameError(f"unsafe file name {path!r} in manifest or checkpoint index")
    return path


def join_inside(root: Path, relpath: str) -> Path:
    """``root / relpath`` after checking that it stays inside ``root`` (no symlinks followed out)."""
    safe_relpath(relpath)
    target = root / relpath
    root_resolved = root.resolve()
    parent = target.parent.resolve()
    if parent != root_resolved and root_resolved not in parent.parents:
        raise InvalidNameError(f"file name {relpath!r} would leave {root}")
    if target.is_symlink():
        raise InvalidNameError(f"{target} is a symbolic link; refusing to follow it")
    return target
