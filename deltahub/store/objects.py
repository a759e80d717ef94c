"""Content-addressed, write-once object storage.

An object is immutable bytes addressed by the sha256 of its *uncompressed* content. On disk an
object lives at ``objects/<id[:2]>/<id>`` and is a 16-byte header followed by the payload:

    offset 0   6 bytes  magic  b"DHOBJ\\0"
    offset 6   1 byte   object file format version (1)
    offset 7   1 byte   encoding: 0 = raw, 1 = zstd (one zstd frame of the content)
    offset 8   8 bytes  uncompressed content length, little-endian uint64
    offset 16           payload

Raw payloads start at a 16-byte aligned offset, so base tensors stay memory-mappable. The encoding
is read from the header, never inferred from the file name.

Writes (invariant 1): a per-process temporary file under ``tmp/`` in the store, hashed while being
written, fsynced, then renamed into place (the directory is fsynced too). Readers never see a partial
object. Writing an object that already exists is a no-op (the temporary file is dropped).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import mmap
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from deltahub.errors import CorruptObjectError, StoreError, UnsupportedFormatError

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


class ObjectStore:
    """The ``objects/`` and ``tmp/`` folders of a store. Knows nothing of manifests or the index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    # ------------------------------------------------------------------ paths
    def path_of(self, object_id: str) -> Path:
        check_object_id(object_id)
        return self.objects_dir / object_id[:2] / object_id

    def exists(self, object_id: str) -> bool:
        return self.path_of(object_id).is_file()

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
        return self._publish(tmp_path, obj)

    def _write(
        self, data: bytes | bytearray | memoryview | Iterable, compression: Compression
    ) -> tuple[Path, ObjectInfo]:
        encoding = Encoding.ZSTD if compression is Compression.AUTO else Encoding.RAW
        fd, tmp_name = tempfile.mkstemp(prefix=f"obj-{os.getpid()}-", suffix=".tmp", dir=self.tmp_dir)
        tmp_path = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                fh.write(b"\0" * HEADER_SIZE)
                if encoding is Encoding.ZSTD:
                    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
                    writer = cctx.stream_writer(fh, closefd=False, write_return_read=True)
                    for view in _as_byte_views(data):
                        digest.update(view)
                        size += len(view)
                        writer.write(view)
                    writer.close()  # ends the one frame (a flush(FLUSH_FRAME) first would add an empty 2nd frame)
                else:
                    for view in _as_byte_views(data):
                        digest.update(view)
                        size += len(view)
                        fh.write(view)
                stored = fh.tell()
                fh.seek(0)
                fh.write(HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(encoding), size))
                os.fsync(fh.fileno())
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return tmp_path, ObjectInfo(digest.hexdigest(), size, stored, encoding)

    def _publish(self, tmp_path: Path, obj: ObjectInfo) -> ObjectInfo:
        final = self.path_of(obj.sha256)
        if final.exists():
            tmp_path.unlink(missing_ok=True)
            return ObjectInfo(
                obj.sha256, obj.size, final.stat().st_size, self.encoding_of(obj.sha256), created=False
            )
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.objects_dir)
        os.chmod(tmp_path, 0o444)
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
        return obj

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
            if encoding is Encoding.RAW:
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
            encoding, _size = self._header(fh, object_id)
            if encoding is Encoding.RAW:
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
        """Temporary files left by processes that no longer run."""
        stale = []
        for entry in self.tmp_dir.iterdir():
            match = re.match(r"^[a-z]+-(\d+)-", entry.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if not _pid_alive(pid):
                stale.append(entry)
        return stale


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
