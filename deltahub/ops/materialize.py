"""``materialize``: write a stored model as an ordinary Hugging Face checkpoint.

The checkpoint is written into a temporary sibling directory of ``out_dir`` and renamed into place
at the end, so ``out_dir`` is never half-written. A non-empty ``out_dir`` is refused unless
``force``. Same store content and options give the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from deltahub import defaults
from deltahub.errors import DeltaHubError, InputError, OutputExistsError
from deltahub.fileio import OUTPUT_HINT, disk_full_as, disk_full_error, free_bytes, write_file
from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES, write_sharded
from deltahub.formats.paths import join_inside
from deltahub.formats.safetensors_io import dtype_name
from deltahub.ops.context import StoreContext
from deltahub.ops.reconstruct import ModelSource
from deltahub.progress import progress_bar
from deltahub.store import fsync_dir
from deltahub.store.temp import pid_alive

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {name: getattr(torch, name) for name in defaults.DTYPE_CHOICES}


@dataclass
class MaterializeResult:
    name: str
    out_dir: Path
    dtype: str
    files: list[str]
    bytes_written: int


def parse_output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise InputError(
            f"unsupported output dtype {dtype!r}", f"use one of {', '.join(OUTPUT_DTYPES)}"
        ) from None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


#: Temporary siblings of an output folder: ``.OUT.deltahub-tmp-<pid>-<random>`` while writing,
#: ``.OUT.deltahub-old-<pid>-<random>`` while ``--force`` swaps an old output out. Older deltahub
#: versions named them without the pid.
_LEFTOVER_RE = re.compile(r"^\.(?P<out>.+)\.deltahub-(?:tmp|old)-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


@contextmanager
def _owned_dir(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on folder ``path`` while it is being filled: a later materialize
    to the same output can then tell a live writer's folder from a dead one's."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. NFS, which emulates flock with fcntl locks: the pid in the name decides
            logger.debug("cannot lock %s (%s); leftovers are then told apart by pid only", path, exc)
        yield
    finally:
        os.close(fd)


def _owner_alive(path: Path, pid: int | None) -> bool:
    """Whether a running materialize still owns temporary folder ``path``: it holds the folder's
    flock, or (between creating and locking it) its pid still runs."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return True  # not a folder we can inspect: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock here (NFS): only a pid says it is dead; a folder without one is kept
        return pid is None or pid_alive(pid)
    finally:
        os.close(fd)
    return pid is not None and pid_alive(pid)


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Remove what killed materializations to ``out_dir`` left beside it (temporary folders of
    processes that no longer run); returns what was removed. Never follows symlinks."""
    removed: list[Path] = []
    parent = out_dir.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER_RE.match(entry.name)
        if match is None or match.group("out") != out_dir.name or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group("pid")) if match.group("pid") else None
        if _owner_alive(entry, pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            logger.info("removed %s, left by an interrupted materialize", entry)
            removed.append(entry)
    return removed


def checkpoint_bytes(source: ModelSource, specs: list) -> int:
    """About the bytes a checkpoint of ``specs`` takes: tensors, shard headers and carried files."""
    files = sum(source.ctx.objects.info(oid).size for oid in source.manifest.files.values())
    headers = 64 * len(specs) + (1 << 16)
    return sum(spec.nbytes for spec in specs) + files + headers


def write_checkpoint(
    source: ModelSource,
    out: Path,
    specs: list,
    desc: str,
    max_shard_bytes: int,
    config: bytes | None = None,
) -> list[str]:
    """Write ``source`` into folder ``out`` as an HF checkpoint: its carried files (``config.json``
    replaced by ``config`` when given, else byte for byte) and ``specs`` in safetensors shards, one
    tensor at a time. Returns the files written."""
    files = []
    for rel in sorted(source.manifest.files):
        target = join_inside(out, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file(target, config if rel == "config.json" and config is not None else source.file_bytes(rel))
        files.append(rel)
    inputs = NamedInputs(source.iter_inputs(specs))
    with progress_bar(sum(spec.nbytes for spec in specs), desc, unit="B", unit_scale=True) as bar:
        files += write_sharded(
            out,
            specs,
            lambda spec, dst: source.fill(spec.name, inputs.take(spec.name), dst),
            max_shard_bytes=max_shard_bytes,
            on_tensor=lambda spec: bar.update(spec.nbytes),
        )
    inputs.finish()
    return files


class NamedInputs:
    """Read inputs (:class:`~deltahub.ops.reconstruct.Inputs`, each carrying the name of the tensor
    it was read for), handed out by name.

    The shard writer asks for the tensor it is about to write, by name, and gets that tensor's
    inputs or an error: never another tensor's. Tensors of equal shape (q/k/v projections) would
    otherwise be swapped silently if the writer's order ever differed from the order read.
    """

    def __init__(self, inputs: Iterable) -> None:
        self._inputs = iter(inputs)

    def take(self, name: str):
        """The inputs read for tensor ``name``, which must be the next one read."""
        inputs = next(self._inputs, None)
        read_name = inputs.name if inputs is not None else None
        if read_name != name:
            raise DeltaHubError(
                f"internal error: writing tensor {name!r} but the next tensor read is {read_name!r}",
                "report this as a bug in deltahub",
            )
        return inputs

    def finish(self) -> None:
        """Raise unless every tensor read was taken."""
        left = next(self._inputs, None)
        if left is not None:
            raise DeltaHubError(
                f"internal error: tensor {left.name!r} was read but never written",
                "report this as a bug in deltahub",
            )


def check_output_dir(ctx: StoreContext, out_dir: Path, force: bool) -> Path:
    """``out_dir`` made absolute, or :class:`OutputExistsError` when writing it would touch the store,
    follow a symbolic link, or replace a file or a non-empty folder without ``force``."""
    out_dir = Path(os.path.abspath(out_dir))
    home = ctx.home.resolve()
    if out_dir == Path(out_dir.anchor) or out_dir.resolve() == home or home in out_dir.resolve().parents or (
        out_dir.resolve() in home.parents
    ):
        raise OutputExistsError(
            f"refusing to write into {out_dir}", "choose an output directory outside the store and not containing it"
        )
    if out_dir.is_symlink() and not force:
        raise OutputExistsError(
            f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}); deltahub writes a real directory and "
            "does not follow links",
            "give the link's target itself, or pass --force to replace the link (its target is left untouched)",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory", "choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(
            f"{out_dir} is not empty", "choose an empty or new directory, or pass --force to replace it"
        )
    return out_dir


def materialize(
    ctx: StoreContext,
    name: str,
    out_dir: Path,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
    bits: int | None = None,
    max_size: int | None = None,
) -> MaterializeResult:
    """Write model ``name`` to ``out_dir`` as safetensors shards + config + tokenizer files.
    ``bits``: rebuild from the first ``bits`` planes of each progressive tensor only (a coarser model
    from the same stored artifact; the other planes are not read). ``max_size``: from the best prefix
    of the stored plane order whose tensor data fits that many bytes (:meth:`Manifest.at_size`)."""
    out_dtype = parse_output_dtype(dtype)
    out_dir = check_output_dir(ctx, out_dir, force)
    with ctx.reading():  # gc waits until every object is read
        return _materialize(ctx, name, out_dir, out_dtype, force, max_shard_bytes, verify, bits, max_size)


def _materialize(
    ctx: StoreContext,
    name: str,
    out_dir: Path,
    out_dtype: torch.dtype | None,
    force: bool,
    max_shard_bytes: int,
    verify: bool,
    bits: int | None = None,
    max_size: int | None = None,
) -> MaterializeResult:
    source = ModelSource.open(ctx, name, verify=verify, bits=bits, max_size=max_size)
    specs = source.specs(out_dtype)  # None: every tensor keeps its stored dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    needed = checkpoint_bytes(source, specs)
    free = free_bytes(out_dir.parent)
    if free is not None and free < needed:
        raise disk_full_error(None, out_dir.parent, f"materializing {name}", needed, OUTPUT_HINT)
    with disk_full_as(out_dir.parent, f"materializing {name}", needed, OUTPUT_HINT):
        return _write_output(source, name, specs, out_dir, out_dtype, force, max_shard_bytes)


def publish_dir(out_dir: Path, force: bool, fill: Callable[[Path], list[str]]) -> list[str]:
    """Call ``fill`` on a new temporary sibling of ``out_dir`` (it returns the files it wrote), fsync
    them and rename the folder into place: ``out_dir`` is never seen half-written. With ``force`` an
    existing ``out_dir`` (or link) is replaced; without it, a folder filled meanwhile is an error.
    The temporary folder is removed on any failure."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.deltahub-tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        with _owned_dir(tmp):
            files = fill(tmp)
            _fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        if force and os.path.lexists(out_dir):  # (a dangling link too)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.deltahub-old-{os.getpid()}-", dir=out_dir.parent))
            os.replace(out_dir, old / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                # Replaces only a missing or empty directory: a directory filled meanwhile by
                # someone else makes this fail instead of being overwritten.
                os.rename(tmp, out_dir)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise OutputExistsError(
                        f"{out_dir} was filled while deltahub was writing it", "choose another directory or pass --force"
                    ) from None
                raise
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _write_output(
    source: ModelSource,
    name: str,
    specs: list,
    out_dir: Path,
    out_dtype: torch.dtype | None,
    force: bool,
    max_shard_bytes: int,
) -> MaterializeResult:
    """Fill a temporary sibling of ``out_dir`` and rename it into place (removed on any failure)."""
    def fill(tmp: Path) -> list[str]:
        config = json.dumps(source.config(out_dtype), indent=2, sort_keys=True) + "\n"
        return write_checkpoint(source, tmp, specs, f"materialize {name}", max_shard_bytes, config.encode())

    files = publish_dir(out_dir, force, fill)
    bytes_written = sum((out_dir / f).stat().st_size for f in files)
    logger.info("materialized %s into %s", name, out_dir)
    shown = dtype_name(out_dtype) if out_dtype is not None else source.manifest.dtype
    return MaterializeResult(name, out_dir, shown, sorted(files), bytes_written)
