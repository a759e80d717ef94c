"""Content-addressed, write-once object storage.

An object is immutable bytes addressed by the sha256 of its *uncompressed* content. On disk an
object lives at ``objects/<id[:2]>/<id>`` and is a 16-byte header followed by the payload:

    offset 0   6 bytes  magic  b"DHOBJ\\0"
    offset 6   1 byte   object file format version (1)
    offset 7   1 byte   encoding: 0 = raw, 1 = zstd (one zstd frame of the content),
                        2 = reference (the content lives outside the store, see below)
    offset 8   8 bytes  uncompressed content length, little-endian uint64
    offset 16           payload

A *reference* object (encoding 2) keeps no copy of the bytes: its payload is a small JSON object
``{"root": KEY, "path": REL, "offset": O, "length": L}`` naming a byte range of a file under one of
the read-only roots the store was opened with (``external_roots``; deltahub uses it for blobs of the
Hugging Face cache, ``KEY = "hf_hub_cache"``). ``REL`` is resolved with the same rules as every other
path (relative, no ``..``, no symlink out of the root). The content is the ``L`` bytes at ``O`` and
MUST still hash to the object id: every verified read re-hashes it, so a changed or deleted target is
a :class:`CorruptObjectError`, never a silently wrong tensor.

Raw payloads start at a 16-byte aligned offset, so base tensors stay memory-mappable. The encoding
is read from the header, never inferred from the file name.

Writes (invariant 1): a per-process temporary file under ``tmp/`` in the store, hashed while being
written, fsynced, then renamed into place (the directory is fsynced too). Readers never see a partial
object. Writing an object that already exists is a no-op (the temporary file is dropped).

Inside :meth:`ObjectStore.batch` the same steps run for many objects at once: every temporary file
is written, then ONE ``syncfs`` makes them all durable, then they are renamed into place, then one
more ``syncfs`` makes the renames durable (:meth:`ObjectStore.flush`). An object is still never
visible before its bytes are durable; what changes is one flush per batch instead of two fsyncs per
object (which dominated pulls and adds of many small objects). A failed batch removes its
temporary files and publishes nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zstandard

from deltahub.errors import CorruptObjectError, StoreError, UnsupportedFormatError
from deltahub.formats import safe_json
from deltahub.fileio import FullWriter, disk_full_as, disk_full_error, is_disk_full, pwrite_all, write_all

logger = logging.getLogger(__name__)

MAGIC = b"DHOBJ\x00"
OBJECT_FORMAT_VERSION = 1
HEADER = struct.Struct("<6sBBQ")
HEADER_SIZE = HEADER.size  # 16
CHUNK = 8 << 20
_ID_RE = re.compile(r"^[0-9a-f]{64}$")

#: zstd is kept only when it saves at least this share of the bytes.
ZSTD_MIN_SAVING = 0.05
ZSTD_LEVEL = 3


class Encoding(enum.IntEnum):
    """How an object's payload is stored (header byte 7)."""

    RAW = 0
    ZSTD = 1
    REF = 2


class Compression(str, enum.Enum):
    """What a writer asks for; ``AUTO`` tries zstd and keeps it only where it pays."""

    NONE = "none"
    AUTO = "auto"


@dataclass(frozen=True)
class ObjectInfo:
    """What a write produced: the id, the content size and the bytes it takes on disk."""

    sha256: str
    size: int
    stored_size: int
    encoding: Encoding
    #: True when this write created the object, False when it already existed.
    created: bool = True


def check_object_id(object_id: str) -> str:
    """Return ``object_id`` if it is 64 lowercase hex digits; raise otherwise.

    Object ids come from manifests and the index; checking them keeps every path inside the store.
    """
    if not isinstance(object_id, str) or not _ID_RE.match(object_id):
        raise CorruptObjectError(
            f"invalid object id {object_id!r}",
            "the manifest or index is damaged; run `deltahub verify`",
        )
    return object_id


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


SAMPLE_BYTES = 256 << 10


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


#: Reference payloads are tiny; anything larger is damage.
MAX_REF_PAYLOAD = 4096


@dataclass(frozen=True)
class ExternalRef:
    """Where a reference object's content is: ``length`` bytes at ``offset`` of ``path``."""

    root: str
    relpath: str
    path: Path
    offset: int
    length: int


class ObjectStore:
    """The ``objects/`` and ``tmp/`` folders of a store. Knows nothing of manifests or the index.

    ``external_roots`` returns, when called, the folders reference objects may point into (key ->
    folder); it is called at use time so that it follows settings such as ``HF_HUB_CACHE``.
    """

    def __init__(self, root: Path, external_roots: Callable[[], Mapping[str, Path]] | None = None) -> None:
        self.root = Path(root)
        self._external_roots = external_roots or (lambda: {})
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.RLock()
        #: objects written in the current batch and not yet published: id -> (temp file, info)
        self._pending: dict[str, tuple[Path, ObjectInfo]] | None = None

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
        if not final.exists():
            return None
        existing = self.encoding_of(obj.sha256)
        if existing is Encoding.REF and obj.encoding is not Encoding.REF:
            return None
        return ObjectInfo(obj.sha256, obj.size, final.stat().st_size, existing, created=False)

    def _flush_pending(self, object_id: str) -> None:
        if self._pending and object_id in self._pending:
            self.flush()

    # ------------------------------------------------------------------ paths
    def path_of(self, object_id: str) -> Path:
        check_object_id(object_id)
        return self.objects_dir / object_id[:2] / object_id

    def exists(self, object_id: str) -> bool:
        return self.path_of(object_id).is_file() or bool(self._pending and object_id in self._pending)

    def iter_ids(self) -> Iterator[str]:
        """Every object id present on disk (files with a valid id as name)."""
        if not self.objects_dir.is_dir():
            return
        for sub in sorted(self.objects_dir.iterdir()):
            if not sub.is_dir() or sub.is_symlink():
                continue
            for entry in sorted(sub.iterdir()):
                if _ID_RE.match(entry.name) and entry.name[:2] == sub.name and entry.is_file():
                    yield entry.name

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
        info = self._write(data, compression)
        if (
            info is not None
            and compression is Compression.AUTO
            and reusable
            and info[1].encoding is Encoding.ZSTD
            and info[1].stored_size - HEADER_SIZE > (1 - ZSTD_MIN_SAVING) * info[1].size
        ):
            os.unlink(info[0])
            info = self._write(data, Compression.NONE)
        assert info is not None
        tmp_path, obj = info
        return self._finish(tmp_path, obj)

    def _write(
        self, data: bytes | bytearray | memoryview | Iterable, compression: Compression
    ) -> tuple[Path, ObjectInfo]:
        """Write ``data`` to a new temporary file: every byte (short writes are completed or fail),
        hashed as it goes; the file holds exactly the header and what was hashed, or is removed."""
        encoding = Encoding.ZSTD if compression is Compression.AUTO else Encoding.RAW
        expected = len(memoryview(data).cast("B")) if isinstance(data, (bytes, bytearray, memoryview)) else None
        with disk_full_as(self.root, "writing an object", expected):
            fd, tmp_name = tempfile.mkstemp(prefix=f"obj-{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        tmp_path = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                write_all(fd, b"\0" * HEADER_SIZE)
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
                pwrite_all(fd, HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(encoding), size), 0)
                if os.fstat(fd).st_size != stored or (encoding is Encoding.RAW and stored != HEADER_SIZE + size):
                    raise OSError(errno.EIO, f"{tmp_path.name} does not hold what was written")
                if self._pending is None:  # a batch syncs all its files at once in flush()
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            tmp_path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(exc, self.root, "writing an object", expected) from None
            raise
        return tmp_path, ObjectInfo(digest.hexdigest(), size, stored, encoding)

    def _publish(self, tmp_path: Path, obj: ObjectInfo, sync: bool = True) -> ObjectInfo:
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

    def put_ref(self, root: str, relpath: str, offset: int, length: int) -> ObjectInfo:
        """Store a reference to ``length`` bytes at ``offset`` of ``relpath`` under external root
        ``root`` (no copy of the bytes). The range is hashed here, so the id is its sha256.

        When the object already exists (as a copy or a reference) nothing is written.
        """
        target = self._external_path(root, relpath, "<new>")
        with open(target, "rb") as fh:
            if offset < 0 or length < 0 or os.fstat(fh.fileno()).st_size < offset + length:
                raise StoreError(f"{relpath} is shorter than the referenced range {offset}+{length}")
            if length == 0:
                object_id = hashlib.sha256(b"").hexdigest()
            else:  # hashed through a memory map: no copy of the bytes into fresh pages
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    with memoryview(mm) as view:
                        object_id = hashlib.sha256(view[offset : offset + length]).hexdigest()
                finally:
                    mm.close()
        final = self.path_of(object_id)
        if final.exists() or (self._pending and object_id in self._pending):
            self._flush_pending(object_id)
            return ObjectInfo(object_id, length, final.stat().st_size, self.encoding_of(object_id), created=False)
        payload = json.dumps(
            {"root": root, "path": relpath, "offset": offset, "length": length}, sort_keys=True
        ).encode()
        fd, tmp_name = tempfile.mkstemp(prefix=f"obj-{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        tmp_path = Path(tmp_name)
        try:
            try:
                write_all(fd, HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(Encoding.REF), length) + payload)
                if self._pending is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            tmp_path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(exc, self.root, "writing a reference object") from None
            raise
        return self._finish(tmp_path, ObjectInfo(object_id, length, HEADER_SIZE + len(payload), Encoding.REF))

    def _external_path(self, root: str, relpath: str, object_id: str) -> Path:
        """The file a reference names, checked to stay inside its root (no ``..``, no symlink out)."""
        roots = self._external_roots()
        if root not in roots:
            raise CorruptObjectError(
                f"object {object_id} refers to unknown root {root!r}", "run `deltahub verify`"
            )
        base = Path(roots[root]).resolve()
        rel = Path(relpath)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            raise CorruptObjectError(f"object {object_id} has an unsafe reference {relpath!r}", "run `deltahub verify`")
        target = (base / rel).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            raise CorruptObjectError(
                f"object {object_id} refers to {relpath} in {root} ({base}), which is missing",
                "the Hugging Face cache entry was deleted or HF_HUB_CACHE changed; run `deltahub add "
                "REPO_ID@REVISION` again for that base (or add it with --copy)",
            )
        return target

    def external_ref(self, object_id: str) -> ExternalRef | None:
        """Where a reference object's content lives, or None for objects stored in the store."""
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            if encoding is not Encoding.REF:
                return None
            return self._ref(fh, object_id, size)

    def _ref(self, fh, object_id: str, size: int) -> ExternalRef:
        raw = fh.read(MAX_REF_PAYLOAD + 1)
        try:
            doc = safe_json.loads(raw, "reference", allow_nan=False, unique_keys=True) if len(raw) <= MAX_REF_PAYLOAD else None
        except ValueError:  # safe_json.JSONInputError (depth-limited: never a RecursionError)
            doc = None
        ok = (
            isinstance(doc, dict)
            and isinstance(doc.get("root"), str)
            and isinstance(doc.get("path"), str)
            and all(type(doc.get(k)) is int and doc[k] >= 0 for k in ("offset", "length"))
            and doc["length"] == size
        )
        if not ok:
            raise CorruptObjectError(f"object {object_id} has a damaged reference", "run `deltahub verify`")
        path = self._external_path(doc["root"], doc["path"], object_id)
        if path.stat().st_size < doc["offset"] + size:
            raise CorruptObjectError(
                f"object {object_id} refers to {doc['path']}, which is now shorter than the referenced range",
                "the referenced file changed; run `deltahub add REPO_ID@REVISION` again (or add it with --copy)",
            )
        return ExternalRef(doc["root"], doc["path"], path, doc["offset"], size)

    # ------------------------------------------------------------------ reads
    def _header(self, fh, object_id: str) -> tuple[Encoding, int]:
        raw = fh.read(HEADER_SIZE)
        if len(raw) != HEADER_SIZE:
            raise CorruptObjectError(
                f"object {object_id} is truncated (no header)", "run `deltahub verify`"
            )
        magic, version, encoding, size = HEADER.unpack(raw)
        if magic != MAGIC:
            raise CorruptObjectError(
                f"object {object_id} has a bad header", "run `deltahub verify`"
            )
        if version != OBJECT_FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"object {object_id} uses object format version {version}, this deltahub reads "
                f"version {OBJECT_FORMAT_VERSION}",
                "upgrade deltahub",
            )
        try:
            return Encoding(encoding), size
        except ValueError:
            raise UnsupportedFormatError(
                f"object {object_id} uses unknown encoding {encoding}", "upgrade deltahub"
            ) from None

    def _open(self, object_id: str):
        path = self.path_of(object_id)
        self._flush_pending(object_id)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise CorruptObjectError(
                f"object {object_id} is missing from the store",
                "run `deltahub verify`; re-add or re-pull the model that needs it",
            ) from None

    def encoding_of(self, object_id: str) -> Encoding:
        with self._open(object_id) as fh:
            return self._header(fh, object_id)[0]

    def info(self, object_id: str) -> ObjectInfo:
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            stored = os.fstat(fh.fileno()).st_size
        return ObjectInfo(object_id, size, stored, encoding)

    def read(self, object_id: str, verify: bool = True) -> bytearray:
        """The object's content as a fresh, writable ``bytearray`` (one object in memory)."""
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            wrong_length = CorruptObjectError(f"object {object_id} has the wrong length", "run `deltahub verify`")
            if encoding is Encoding.REF:
                ref = self._ref(fh, object_id, size)
                out = bytearray(size)
                with open(ref.path, "rb") as target:
                    target.seek(ref.offset)
                    if target.readinto(out) != size:
                        raise wrong_length
            elif encoding is Encoding.RAW:
                # Check the header's length against the file before allocating anything.
                if os.fstat(fh.fileno()).st_size != HEADER_SIZE + size:
                    raise wrong_length
                out = bytearray(size)
                if fh.readinto(out) != size:
                    raise wrong_length
            else:
                # Never trust the header's length for an allocation: grow with the real content.
                chunks: list[bytes] = []
                pos = 0
                try:
                    with zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as reader:
                        while pos <= size:
                            chunk = reader.read(min(CHUNK, size + 1 - pos))
                            if not chunk:
                                break
                            chunks.append(chunk)
                            pos += len(chunk)
                except zstandard.ZstdError as exc:
                    raise CorruptObjectError(
                        f"object {object_id} does not decompress: {exc}", "run `deltahub verify`"
                    ) from None
                if pos != size:
                    raise wrong_length
                out = bytearray(b"".join(chunks))
        if verify:
            self._check_digest(object_id, out)
        return out

    def read_view(self, object_id: str, verify: bool = True) -> memoryview | bytearray:
        """The object's content without copying it when it is raw: a read-only ``memoryview`` of a
        memory map (released when the last reference goes), else a ``bytearray`` as :meth:`read`.

        Cheaper than :meth:`read` for large tensors: no copy, no fresh anonymous pages.
        """
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            if encoding is Encoding.REF and size:
                ref = self._ref(fh, object_id, size)
                with open(ref.path, "rb") as target:
                    mm = mmap.mmap(target.fileno(), 0, access=mmap.ACCESS_READ)
                view = memoryview(mm)[ref.offset : ref.offset + size]
                if verify:
                    self._check_digest(object_id, view)
                return view
            if encoding is not Encoding.RAW or size == 0:
                return self.read(object_id, verify=verify)
            if os.fstat(fh.fileno()).st_size != HEADER_SIZE + size:
                raise CorruptObjectError(f"object {object_id} has the wrong length", "run `deltahub verify`")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)[HEADER_SIZE:]
        if verify:
            self._check_digest(object_id, view)
        return view

    def mmap_raw(self, object_id: str) -> tuple[mmap.mmap, int]:
        """Map a raw object read-only; return ``(map, payload_offset)``. Not verified."""
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            if encoding is Encoding.REF and size:
                ref = self._ref(fh, object_id, size)
                with open(ref.path, "rb") as target:
                    return mmap.mmap(target.fileno(), 0, access=mmap.ACCESS_READ), ref.offset
            if encoding is not Encoding.RAW:
                raise StoreError(f"object {object_id} is compressed and cannot be memory-mapped")
            if size == 0:
                raise StoreError(f"object {object_id} is empty and cannot be memory-mapped")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return mm, HEADER_SIZE

    def hash_content(self, object_id: str) -> str:
        """Re-hash an object's content, streaming; returns the hex digest."""
        digest = hashlib.sha256()
        with self._open(object_id) as fh:
            encoding, size = self._header(fh, object_id)
            if encoding is Encoding.REF:
                ref = self._ref(fh, object_id, size)
                with open(ref.path, "rb") as target:
                    target.seek(ref.offset)
                    left = size
                    while left and (chunk := target.read(min(CHUNK, left))):
                        digest.update(chunk)
                        left -= len(chunk)
            elif encoding is Encoding.RAW:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
            else:
                try:
                    with zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True) as reader:
                        while chunk := reader.read(CHUNK):
                            digest.update(chunk)
                except zstandard.ZstdError as exc:
                    raise CorruptObjectError(
                        f"object {object_id} does not decompress: {exc}", "run `deltahub verify`"
                    ) from None
        return digest.hexdigest()

    @staticmethod
    def _check_digest(object_id: str, content: bytes | bytearray | memoryview) -> None:
        got = hashlib.sha256(content).hexdigest()
        if got != object_id:
            raise CorruptObjectError(
                f"object {object_id} is corrupt (its content hashes to {got[:12]}…)",
                "run `deltahub verify` to list damaged objects, then re-add or re-pull the model",
            )

    def check_digest(self, object_id: str, content: bytes | bytearray | memoryview) -> None:
        """Raise :class:`CorruptObjectError` unless ``content`` hashes to ``object_id``."""
        self._check_digest(object_id, content)

    # ------------------------------------------------------------------ deletes
    def delete(self, object_id: str) -> int:
        """Remove an object; returns the bytes freed (0 if it was already gone)."""
        path = self.path_of(object_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def stale_temp_files(self) -> list[Path]:
        """Temporary files and folders (``push-<pid>-*`` staging) in ``tmp/`` left by processes that
        no longer run (``<kind>-<pid>-…``; ``push_<pid>_…`` from older versions)."""
        stale = []
        for entry in self.tmp_dir.iterdir():
            match = _TEMP_RE.match(entry.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if not pid_alive(pid):
                stale.append(entry)
        return stale

    def remove_temp(self, path: Path) -> int:
        """Remove a temporary file or folder of ``tmp/`` (never following symlinks); returns the bytes freed."""
        if path.parent != self.tmp_dir:
            raise StoreError(f"{path} is not in {self.tmp_dir}")
        freed = tree_bytes(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return freed if not path.exists() and not path.is_symlink() else 0

    def temp_usage(self) -> tuple[int, int]:
        """(entries, bytes) in ``tmp/``: temporary objects and push staging folders."""
        entries = list(self.tmp_dir.iterdir()) if self.tmp_dir.is_dir() else []
        return len(entries), sum(tree_bytes(e) for e in entries)


_TEMP_RE = re.compile(r"^[a-z]+[-_](\d+)[-_]")


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
