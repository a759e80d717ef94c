"""Writes that either put every byte on disk or fail, and the one message for a full disk.

Every file deltahub writes (store objects, references, materialized checkpoints, push staging) goes
through :func:`write_all` (or :func:`write_file`), which loops until ``os.write`` has taken every
byte: a short write (a file size limit, a full disk, a signal) is either completed or turned into an
error, never ignored. Files filled through a memory map are :func:`reserve`-d first, so that a full
disk is an error here and not a ``SIGBUS`` later.

:func:`disk_full_error` turns ``ENOSPC``/``EDQUOT``/``EFBIG`` into a :class:`DiskFullError` that
names the folder, the bytes needed and the bytes free. This module imports nothing of deltahub but
its errors, so every layer may use it.
"""

from __future__ import annotations

import errno
import fractions
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltahub.errors import DiskFullError, InvalidSizeError

#: errno values that mean "no room": a full disk, a quota, a file size limit (``ulimit -f``).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: The one syscall every deltahub file write goes through (tests inject failures here).
os_write = os.write
#: The one call that reserves a file's blocks (tests inject failures here).
os_fallocate = os.posix_fallocate

BytesLike = bytes | bytearray | memoryview


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def write_all(fd: int, data: BytesLike) -> int:
    """Write every byte of ``data`` to file descriptor ``fd`` at its current offset.

    Loops over short writes; a write that takes nothing raises ``OSError(ENOSPC)``. Returns the
    number of bytes written (``len(data)``).
    """
    view = memoryview(data).cast("B")
    total = len(view)
    done = 0
    while done < total:
        n = os_write(fd, view[done:])
        if n is None or n <= 0:  # None: a non-blocking fd; 0: the device takes nothing more
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return total


def pwrite_all(fd: int, data: BytesLike, offset: int) -> int:
    """:func:`write_all` at ``offset`` (the file offset is restored afterwards)."""
    here = os.lseek(fd, 0, os.SEEK_CUR)
    os.lseek(fd, offset, os.SEEK_SET)
    try:
        return write_all(fd, data)
    finally:
        os.lseek(fd, here, os.SEEK_SET)


class FullWriter:
    """A minimal binary file-like object over an fd whose ``write`` writes every byte or raises.

    For libraries that write into a file object and ignore ``write``'s return value (zstandard's
    ``stream_writer`` does): the file object of ``open(..., buffering=0)`` may write short.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: BytesLike) -> int:
        return write_all(self.fd, data)

    def flush(self) -> None:  # nothing buffered here
        return None


def write_file(path: Path, data: BytesLike | Iterable[BytesLike], mode: int = 0o644, fsync: bool = False) -> int:
    """Create (or truncate) ``path`` and write ``data`` (bytes or chunks) to it, every byte or an error.

    Never follows a symlink at ``path`` (``O_NOFOLLOW``). A failed write removes the partial file.
    Returns the bytes written.
    """
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, mode)
    total = 0
    try:
        for chunk in chunks:
            total += write_all(fd, chunk)
        if os.fstat(fd).st_size != total:  # what reached the file is what was asked
            raise OSError(errno.EIO, f"{path} has {os.fstat(fd).st_size} bytes after writing {total}")
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    os.close(fd)
    return total


def write_atomic(path: Path, data: BytesLike) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary sibling written in full (or removed),
    then renamed over ``path``, so a reader sees the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reserve(fd: int, length: int) -> None:
    """Allocate the blocks of the first ``length`` bytes of an open file (``posix_fallocate``).

    After this, filling those bytes through a memory map cannot hit a full disk (which would be a
    ``SIGBUS``). Raises ``OSError`` (``ENOSPC``, ``EFBIG``...) when the space is not there. File
    systems that cannot preallocate at all (``EOPNOTSUPP``) make this raise too: callers then
    write without a map.
    """
    if length <= 0:
        return
    os_fallocate(fd, 0, length)


_SYNC_FILE_RANGE = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` of an open file to disk, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere). Durability is still the
    caller's ``fsync``: this only lets the disk work while the rest of the file is produced, so
    that the final ``fsync`` has less left to wait for. Errors are ignored (the ``fsync`` reports
    write-back errors)."""
    global _SYNC_FILE_RANGE
    if length <= 0:
        return
    if _SYNC_FILE_RANGE is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _SYNC_FILE_RANGE = fn
        except (OSError, AttributeError):  # not Linux / not glibc
            _SYNC_FILE_RANGE = False
    if _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing
    ancestor), or None when that cannot be told."""
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            if candidate.exists():
                usage = shutil.disk_usage(candidate)
                return usage.free if usage.total > 0 else None  # /proc and friends report no size
        except OSError:
            return None
    return None


def human_bytes(n: float | None, unknown: str = "an unknown amount") -> str:
    """``4190000`` -> ``"4.19 MB"`` (decimal units, as ``du`` and every message print them)."""
    if n is None:
        return unknown
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ints pass through; the inverse of
    :func:`human_bytes`. At least 1 byte, else :class:`~deltahub.errors.InvalidSizeError`."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise InvalidSizeError(f"cannot parse size {text!r}", "examples: 5GB, 500MB, 2GiB")
        unit = (match.group(2) or "B").lower()
        whole, _dot, frac = match.group(1).partition(".")
        if len(whole.lstrip("0")) > 20:  # beyond 2**62 bytes in any unit (and int() refuses 4300+ digits)
            raise InvalidSizeError(f"size {text[:50]!r} is too large", "examples: 5GB, 500MB, 2GiB")
        if len(frac) > 40:
            raise InvalidSizeError(f"size {text[:50]!r}... has too many digits", "examples: 5GB, 500MB, 2GiB")
        number = fractions.Fraction(match.group(1)) * _UNITS[unit]  # exact: 1.1GB is 1_100_000_000
        if number >= 2**62:
            raise InvalidSizeError(f"size {text!r} is too large", "examples: 5GB, 500MB, 2GiB")
        if number.denominator != 1:
            raise InvalidSizeError(f"size {text!r} is not a whole number of bytes ({float(number):g} B)",
                                   "give whole bytes, e.g. 2B, or a larger unit: 1.5kB")
        value = int(number)
    if value < 1:
        raise InvalidSizeError(f"size {text!r} is not positive", "examples: 5GB, 500MB, 2GiB")
    return value


STORE_HINT = (
    "free some space (`deltahub gc` removes unreferenced objects; `deltahub rm NAME` then `deltahub gc` "
    "frees a model) or use another folder, then run the command again; nothing half-written was kept"
)
OUTPUT_HINT = "free some space or choose an output folder on another disk; nothing half-written was kept"


def disk_full_error(
    exc: OSError | None, folder: Path, what: str, needed: int | None = None, hint: str = STORE_HINT
) -> DiskFullError:
    """The one-line error for ``exc`` (ENOSPC, EDQUOT or EFBIG) hit in ``folder`` while ``what``
    (e.g. "writing an object"); ``needed`` is the bytes the operation needed there, when known."""
    need = f"{human_bytes(needed)} needed, " if needed is not None else ""
    if exc is not None and exc.errno == errno.EFBIG:
        return DiskFullError(
            f"the file size limit (ulimit -f) was reached in {folder} while {what}"
            + (f" ({human_bytes(needed)})" if needed is not None else ""),
            "raise the limit (`ulimit -f unlimited`) and run the command again; nothing half-written was kept",
        )
    reason = "the disk quota is exhausted" if exc is not None and exc.errno == errno.EDQUOT else "the disk is full"
    return DiskFullError(
        f"{reason} in {folder} while {what} ({need}{human_bytes(free_bytes(folder))} free)",
        hint,
    )


@contextmanager
def disk_full_as(folder: Path, what: str, needed: int | None = None, hint: str = STORE_HINT) -> Iterator[None]:
    """Turn ``ENOSPC``/``EDQUOT``/``EFBIG`` raised in the block into :func:`disk_full_error`
    (``folder``, ``what``, ``needed``, ``hint``); other errors pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, folder, what, needed, hint) from None
        raise


__all__ = [
    "OUTPUT_HINT",
    "STORE_HINT",
    "disk_full_as",
    "DISK_FULL_ERRNOS",
    "FullWriter",
    "disk_full_error",
    "free_bytes",
    "human_bytes",
    "is_disk_full",
    "parse_size",
    "pwrite_all",
    "reserve",
    "write_all",
    "write_atomic",
    "write_file",
]
