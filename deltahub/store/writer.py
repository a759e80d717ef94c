"""Writing objects durably (invariant 1), alone or in batches.

Every object — content (raw or zstd) and reference alike — is written by ONE path,
:meth:`ObjectWriter._write_temp`: a per-process temporary file ``tmp/obj-<pid>-<random>.tmp``, every
byte written or an error (``deltahub.fileio``, short writes completed), the file checked to hold
exactly what was written, fsynced (outside a batch), then made read-only and renamed into
``objects/`` and the directory fsynced (:meth:`ObjectWriter._publish`). Readers never see a partial
object. Writing an object that already exists is a no-op (the temporary file is dropped), except
that a copy of content replaces a reference to the same content.

Inside :meth:`ObjectWriter.batch` the same steps run for many objects at once: every temporary file
is written, then ONE ``syncfs`` makes them all durable, then they are renamed into place, then one
more ``syncfs`` makes the renames durable (:meth:`ObjectWriter.flush`). An object is still never
visible before its bytes are durable; what changes is one flush per batch instead of two fsyncs per
object (which dominated pulls and adds of many small objects). A failed batch removes its
temporary files and publishes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

from deltahub.fileio import FullWriter, disk_full_as, disk_full_error, is_disk_full, pwrite_all, write_all
from deltahub.store.format import CHUNK, HEADER_SIZE, Encoding, ObjectInfo, build_header, object_path, read_header

#: zstd is kept only when it saves at least this share of the bytes.
ZSTD_MIN_SAVING = 0.05
ZSTD_LEVEL = 3
SAMPLE_BYTES = 256 << 10


class Compression(str, enum.Enum):
    """What a writer asks for; ``AUTO`` tries zstd and keeps it only where it pays."""

    NONE = "none"
    AUTO = "auto"


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that renames and new entries in it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNCFS = None


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding ``path`` (Linux ``syncfs``;
    elsewhere ``os.sync``)."""
    global _SYNCFS
    if _SYNCFS is None:
        try:
            import ctypes

            _SYNCFS = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            _SYNCFS = False
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _SYNCFS:
            os.sync()
        elif _SYNCFS(fd) != 0:  # a write-back error (EIO, ENOSPC...): the batch is not durable
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def _as_byte_views(data: bytes | bytearray | memoryview | Iterable) -> Iterator[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            yield view[start : start + CHUNK]
        if len(view) == 0:
            yield view
        return
    for chunk in data:
        yield memoryview(chunk).cast("B")


def _worth_compressing(view: memoryview) -> bool:
    """Guess from four samples whether zstd saves ``ZSTD_MIN_SAVING`` on a large payload.

    Small payloads are simply tried; for large ones this avoids compressing hundreds of megabytes of
    incompressible floats just to throw the result away.
    """
    if len(view) <= 8 * SAMPLE_BYTES:
        return True
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    step = (len(view) - SAMPLE_BYTES) // 3
    raw = packed = 0
    for i in range(4):
        sample = view[i * step : i * step + SAMPLE_BYTES]
        raw += len(sample)
        packed += len(cctx.compress(sample))
    return packed <= (1 - ZSTD_MIN_SAVING) * raw


class ObjectWriter:
    """The write half of a store: temporary files in ``tmp/``, batches, publishing into ``objects/``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        #: objects written in the current batch and not yet published: id -> (temp file, info)
        self._pending: dict[str, tuple[Path, ObjectInfo]] | None = None

    def path_of(self, object_id: str) -> Path:
        return object_path(self.objects_dir, object_id)

    def is_pending(self, object_id: str) -> bool:
        """Whether ``object_id`` is written in the current batch but not yet published."""
        return bool(self._pending and object_id in self._pending)

    # ------------------------------------------------------------------ batches
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Defer publishing the objects written in this block to :meth:`flush` (called at the end,
        and by readers of a pending object). Nested blocks join the outer one."""
        with self._lock:
            if self._pending is not None:
                outer = True
            else:
                outer = False
                self._pending = {}
        if outer:
            yield
            return
        try:
            yield
            self.flush()
        finally:
            with self._lock:
                left, self._pending = self._pending or {}, None
            for tmp_path, _obj in left.values():  # only after a failure
                tmp_path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Make the batch's objects durable and visible: one syncfs, the renames, one syncfs."""
        with self._lock:
            if not self._pending:
                return
            try:
                syncfs(self.tmp_dir)
                while self._pending:  # popped first: _publish reads headers, which must not flush again
                    _object_id, (tmp_path, obj) = self._pending.popitem()
                    try:
                        self._publish(tmp_path, obj, sync=False)
                    except BaseException:
                        tmp_path.unlink(missing_ok=True)
                        raise
                syncfs(self.objects_dir)
            except OSError as exc:
                if is_disk_full(exc):
                    raise disk_full_error(exc, self.root, "publishing the written objects") from None
                raise

    def _flush_pending(self, object_id: str) -> None:
        """Publish the current batch if ``object_id`` is in it (a reader wants it)."""
        if self.is_pending(object_id):
            self.flush()

    # ------------------------------------------------------------------ writes
    def put(
        self,
        data: bytes | bytearray | memoryview | Iterable,
        compression: Compression = Compression.NONE,
        size_hint: int | None = None,
    ) -> ObjectInfo:
        """Store ``data`` (bytes or an iterable of byte chunks) and return its :class:`ObjectInfo`.

        With ``Compression.AUTO`` the payload is zstd-compressed while it streams; if that saves less
        than ``ZSTD_MIN_SAVING`` of the bytes and ``data`` is re-readable (bytes-like), it is
        rewritten raw so that raw stays the default for incompressible content.
        """
        reusable = isinstance(data, (bytes, bytearray, memoryview))
        if compression is Compression.AUTO and reusable and not _worth_compressing(memoryview(data).cast("B")):
            compression = Compression.NONE
        tmp_path, obj = self._write_content(data, compression)
        if (
            compression is Compression.AUTO
            and reusable
            and obj.encoding is Encoding.ZSTD
            and obj.stored_size - HEADER_SIZE > (1 - ZSTD_MIN_SAVING) * obj.size
        ):
            os.unlink(tmp_path)
            tmp_path, obj = self._write_content(data, Compression.NONE)
        return self._finish(tmp_path, obj)

    def _put_payload(self, object_id: str, encoding: Encoding, size: int, payload: bytes, what: str) -> ObjectInfo:
        """Store an object whose payload is given whole and whose id is known (a reference)."""

        def fill(fd: int) -> ObjectInfo:
            write_all(fd, build_header(encoding, size) + payload)
            return ObjectInfo(object_id, size, HEADER_SIZE + len(payload), encoding)

        return self._finish(*self._write_temp(what, None, fill))

    def _write_content(
        self, data: bytes | bytearray | memoryview | Iterable, compression: Compression
    ) -> tuple[Path, ObjectInfo]:
        """Write content ``data`` to a new temporary file, hashed as it goes (the id is its sha256)."""
        encoding = Encoding.ZSTD if compression is Compression.AUTO else Encoding.RAW
        expected = len(memoryview(data).cast("B")) if isinstance(data, (bytes, bytearray, memoryview)) else None

        def fill(fd: int) -> ObjectInfo:
            digest = hashlib.sha256()
            size = 0
            write_all(fd, b"\0" * HEADER_SIZE)  # the header, once the length is known
            if encoding is Encoding.ZSTD:
                cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
                # zstandard ignores what write() returns: FullWriter never writes short.
                writer = cctx.stream_writer(FullWriter(fd), closefd=False, write_return_read=True)
                for view in _as_byte_views(data):
                    digest.update(view)
                    size += len(view)
                    writer.write(view)
                writer.close()  # ends the one frame (a flush(FLUSH_FRAME) first would add an empty 2nd frame)
            else:
                for view in _as_byte_views(data):
                    digest.update(view)
                    size += len(view)
                    write_all(fd, view)
            stored = os.lseek(fd, 0, os.SEEK_CUR)
            pwrite_all(fd, build_header(encoding, size), 0)
            return ObjectInfo(digest.hexdigest(), size, stored, encoding)

        return self._write_temp("writing an object", expected, fill)

    def _write_temp(
        self, what: str, expected: int | None, fill: Callable[[int], ObjectInfo]
    ) -> tuple[Path, ObjectInfo]:
        """The one temporary-file path of every object write.

        Creates ``tmp/obj-<pid>-<random>.tmp``, lets ``fill(fd)`` write the header and payload (every
        byte or an error) and describe them, checks that the file holds exactly that (and, for raw,
        exactly the header and the content), fsyncs it unless a batch will ``syncfs`` it, and closes
        it. On any failure the file is removed; a full disk is a :class:`DiskFullError` about ``what``.
        """
        with disk_full_as(self.root, what, expected):
            fd, tmp_name = tempfile.mkstemp(prefix=f"obj-{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        tmp_path = Path(tmp_name)
        try:
            try:
                obj = fill(fd)
                if os.fstat(fd).st_size != obj.stored_size or (
                    obj.encoding is Encoding.RAW and obj.stored_size != HEADER_SIZE + obj.size
                ):
                    raise OSError(errno.EIO, f"{tmp_path.name} does not hold what was written")
                if self._pending is None:  # a batch syncs all its files at once in flush()
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            tmp_path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(exc, self.root, what, expected) from None
            raise
        return tmp_path, obj

    # ------------------------------------------------------------------ publishing
    def _finish(self, tmp_path: Path, obj: ObjectInfo) -> ObjectInfo:
        """Publish a written temporary file now, or add it to the current batch."""
        with self._lock:
            if self._pending is None:
                try:
                    return self._publish(tmp_path, obj)
                except BaseException as exc:
                    tmp_path.unlink(missing_ok=True)
                    if is_disk_full(exc):
                        raise disk_full_error(exc, self.root, "publishing an object") from None
                    raise
            if obj.sha256 in self._pending:
                tmp_path.unlink(missing_ok=True)
                return dataclasses.replace(self._pending[obj.sha256][1], created=False)
            stored = self._already_stored(obj)
            if stored is not None:
                tmp_path.unlink(missing_ok=True)
                return stored
            self._pending[obj.sha256] = (tmp_path, obj)
            # replacing a reference by a copy: not "created", a rollback must not delete it
            return dataclasses.replace(obj, created=not self.path_of(obj.sha256).exists())

    def _already_stored(self, obj: ObjectInfo) -> ObjectInfo | None:
        """The stored object when ``obj`` need not be published: it exists, and is not a reference
        that ``obj`` (a copy of the same content) should replace."""
        final = self.path_of(obj.sha256)
        try:
            with open(final, "rb") as fh:
                existing = read_header(fh, obj.sha256).encoding
                stored_size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            return None
        if existing is Encoding.REF and obj.encoding is not Encoding.REF:
            return None
        return ObjectInfo(obj.sha256, obj.size, stored_size, existing, created=False)

    def _publish(self, tmp_path: Path, obj: ObjectInfo, sync: bool = True) -> ObjectInfo:
        """Make a written temporary file object ``obj``: read-only, renamed into ``objects/``, and
        (with ``sync``) the rename made durable."""
        stored = self._already_stored(obj)
        if stored is not None:
            tmp_path.unlink(missing_ok=True)
            return stored
        final = self.path_of(obj.sha256)
        # A copy of content that was only referenced replaces the reference (same content, atomic
        # rename). Not "created": a rollback must not delete what others use.
        replacing = final.exists()
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            if sync:
                fsync_dir(self.objects_dir)
        os.chmod(tmp_path, 0o444)
        os.replace(tmp_path, final)
        if sync:
            fsync_dir(final.parent)
        return dataclasses.replace(obj, created=False) if replacing else obj
