"""Names and relative paths that can never escape the store or an output directory (invariant 8)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from deltahub.errors import InvalidNameError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._ +-]{0,254}$")
_TENSOR_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
MAX_TENSOR_NAME = 512
#: What :func:`is_tensor_name` accepts, for messages.
TENSOR_NAME_RULE = (
    f"a tensor name is 1-{MAX_TENSOR_NAME} characters: dot-separated non-empty parts of ASCII letters, "
    "digits, '_' and '-' (a PyTorch parameter path such as model.layers.0.mlp.up_proj.weight), "
    "never __metadata__"
)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidNameError`.

    A name is 1–128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
    digit; it holds no ``/`` and is never ``..``.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {name!r}",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "with no '/' or '..'",
        )
    return name


def is_tensor_name(name: object) -> bool:
    """Whether ``name`` may name a tensor in a checkpoint or a manifest (:data:`TENSOR_NAME_RULE`).

    Tensor names are not paths, but they become safetensors keys and ``state_dict`` keys of the
    materialized model: the rule keeps them to what PyTorch module paths look like, so a manifest can
    never smuggle in a key such as ``../../evil``, an empty key, control characters or the
    safetensors-reserved ``__metadata__``.
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_TENSOR_NAME
        and name != "__metadata__"
        and _TENSOR_NAME_RE.fullmatch(name) is not None
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_stored_tensor_name(name: object) -> bool:
    """The lenient rule for names already in a stored manifest: earlier versions accepted any
    safetensors key, so old manifests keep reading; only what no safetensors file or state dict can
    hold is refused (empty, control characters, the reserved ``__metadata__``). New input (a
    checkpoint, a pulled ``deltahub.json``) must pass :func:`is_tensor_name`."""
    return isinstance(name, str) and bool(name) and name != "__metadata__" and not _CONTROL.search(name)


def safe_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path (from a manifest or index file).

    Refuses absolute paths, ``..`` and ``.`` components, backslashes, empty components and
    hidden names; each component is letters, digits and ``._ +-``.
    """
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise InvalidNameError(f"unsafe file name {path!r} in manifest or checkpoint index")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(
        part in {"", ".", ".."} or not _FILE_PART_RE.fullmatch(part) for part in path.split("/")
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
