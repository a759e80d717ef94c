"""Content-addressed, write-once object storage: :class:`ObjectStore`, the one public class.

It joins the parts of ``deltahub/store/``, each of which holds one job:

* ``format``: the object file format (path ``objects/<id[:2]>/<id>``, the 16-byte header: magic,
  version, encoding, length);
* ``writer``: :class:`~deltahub.store.writer.ObjectWriter`, the one temporary-file path of every
  write, batches, publishing (invariant 1), and which ``ObjectStore`` extends;
* ``readers``: one payload reader per encoding (raw, zstd), each with ``read``/``view``/``mmap``/
  ``chunks``;
* ``refs``: reference objects (encoding 2: content in the Hugging Face cache) — payload, resolution,
  and their payload reader;
* ``temp``: the ``tmp/`` folder (stale entries, removing them, usage).

Every read below opens the object, parses its header and dispatches on the encoding through
``self._readers`` (one table, built here): no read path has its own encoding switch.

The names this module exported before the split (``MAGIC``, ``HEADER``, ``Encoding``, ``tree_bytes``,
``pid_alive``...) are re-exported here, so ``deltahub.store.objects.X`` keeps working.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltahub.errors import CorruptObjectError
from deltahub.store import temp
from deltahub.store.format import (
    CHUNK,
    HEADER,
    HEADER_SIZE,
    ID_RE,
    MAGIC,
    OBJECT_FORMAT_VERSION,
    Encoding,
    ObjectInfo,
    check_object_id,
    read_header,
)
from deltahub.store.readers import OpenObject, PayloadReader, RawReader, ZstdReader, check_digest
from deltahub.store.refs import MAX_REF_PAYLOAD, ExternalRef, ExternalRoots, RefReader, hash_range, ref_payload, resolve
from deltahub.store.temp import pid_alive, tree_bytes
from deltahub.store.writer import (
    SAMPLE_BYTES,
    ZSTD_LEVEL,
    ZSTD_MIN_SAVING,
    Compression,
    ObjectWriter,
    fsync_dir,
    syncfs,
)

__all__ = [
    "CHUNK",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_REF_PAYLOAD",
    "OBJECT_FORMAT_VERSION",
    "SAMPLE_BYTES",
    "ZSTD_LEVEL",
    "ZSTD_MIN_SAVING",
    "Compression",
    "Encoding",
    "ExternalRef",
    "ObjectInfo",
    "ObjectStore",
    "check_object_id",
    "fsync_dir",
    "pid_alive",
    "syncfs",
    "tree_bytes",
]


class ObjectStore(ObjectWriter):
    """The ``objects/`` and ``tmp/`` folders of a store. Knows nothing of manifests or the index.

    Writes (``put``, ``batch``, ``flush``) come from :class:`ObjectWriter`. ``external_roots``
    returns, when called, the folders reference objects may point into (key -> folder); it is called
    at use time so that it follows settings such as ``HF_HUB_CACHE``.
    """

    def __init__(self, root: Path, external_roots: ExternalRoots | None = None) -> None:
        super().__init__(root)
        self._external_roots = external_roots or (lambda: {})
        self._refs = RefReader(self._external_roots)
        #: the payload reader of each encoding: every read path dispatches through this table
        self._readers: dict[Encoding, PayloadReader] = {
            Encoding.RAW: RawReader(),
            Encoding.ZSTD: ZstdReader(),
            Encoding.REF: self._refs,
        }

    # ------------------------------------------------------------------ paths
    def exists(self, object_id: str) -> bool:
        return self.path_of(object_id).is_file() or self.is_pending(object_id)

    def iter_ids(self) -> Iterator[str]:
        """Every object id present on disk (files with a valid id as name)."""
        if not self.objects_dir.is_dir():
            return
        for sub in sorted(self.objects_dir.iterdir()):
            if not sub.is_dir() or sub.is_symlink():
                continue
            for entry in sorted(sub.iterdir()):
                if ID_RE.match(entry.name) and entry.name[:2] == sub.name and entry.is_file():
                    yield entry.name

    # ------------------------------------------------------------------ references
    def put_ref(self, root: str, relpath: str, offset: int, length: int) -> ObjectInfo:
        """Store a reference to ``length`` bytes at ``offset`` of ``relpath`` under external root
        ``root`` (no copy of the bytes). The range is hashed here, so the id is its sha256.

        When the object already exists (as a copy or a reference) nothing is written.
        """
        target = resolve(self._external_roots(), root, relpath, "<new>")
        object_id = hash_range(target, relpath, offset, length)
        if self.exists(object_id):
            self._flush_pending(object_id)
            stored = self.path_of(object_id).stat().st_size
            return ObjectInfo(object_id, length, stored, self.encoding_of(object_id), created=False)
        payload = ref_payload(root, relpath, offset, length)
        return self._put_payload(object_id, Encoding.REF, length, payload, "writing a reference object")

    def external_ref(self, object_id: str) -> ExternalRef | None:
        """Where a reference object's content lives, or None for objects stored in the store."""
        with self._opened(object_id) as obj:
            return self._refs.ref(obj) if obj.header.encoding is Encoding.REF else None

    # ------------------------------------------------------------------ reads
    @contextmanager
    def _opened(self, object_id: str) -> Iterator[OpenObject]:
        """Object ``object_id`` opened (its batch published first) with its header parsed."""
        path = self.path_of(object_id)
        self._flush_pending(object_id)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise CorruptObjectError(
                f"object {object_id} is missing from the store",
                "run `deltahub verify`; re-add or re-pull the model that needs it",
            ) from None
        with fh:
            yield OpenObject(object_id, fh, read_header(fh, object_id))

    def _reader(self, obj: OpenObject) -> PayloadReader:
        return self._readers[obj.header.encoding]

    def encoding_of(self, object_id: str) -> Encoding:
        with self._opened(object_id) as obj:
            return obj.header.encoding

    def info(self, object_id: str) -> ObjectInfo:
        with self._opened(object_id) as obj:
            return ObjectInfo(object_id, obj.size, obj.file_size(), obj.header.encoding)

    def read(self, object_id: str, verify: bool = True) -> bytearray:
        """The object's content as a fresh, writable ``bytearray`` (one object in memory)."""
        with self._opened(object_id) as obj:
            out = self._reader(obj).read(obj)
        if verify:
            check_digest(object_id, out)
        return out

    def read_view(self, object_id: str, verify: bool = True) -> memoryview | bytearray:
        """The object's content without copying it when it is raw or a reference: a read-only
        ``memoryview`` of a memory map (released when the last reference goes), else a ``bytearray``
        as :meth:`read`.

        Cheaper than :meth:`read` for large tensors: no copy, no fresh anonymous pages.
        """
        with self._opened(object_id) as obj:
            reader = self._reader(obj)
            content = reader.view(obj)
            if content is None:
                content = reader.read(obj)
        if verify:
            check_digest(object_id, content)
        return content

    def mmap_raw(self, object_id: str) -> tuple[mmap.mmap, int]:
        """Map a raw (or reference) object read-only; return ``(map, payload_offset)``. Not verified."""
        with self._opened(object_id) as obj:
            return self._reader(obj).mmap(obj)

    def hash_content(self, object_id: str) -> str:
        """Re-hash an object's content, streaming; returns the hex digest."""
        digest = hashlib.sha256()
        with self._opened(object_id) as obj:
            for chunk in self._reader(obj).chunks(obj):
                digest.update(chunk)
        return digest.hexdigest()

    def check_digest(self, object_id: str, content: bytes | bytearray | memoryview) -> None:
        """Raise :class:`CorruptObjectError` unless ``content`` hashes to ``object_id``."""
        check_digest(object_id, content)

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

    # ------------------------------------------------------------------ tmp/
    def stale_temp_files(self) -> list[Path]:
        """Temporary files and folders (``push-<pid>-*`` staging) in ``tmp/`` left by processes that
        no longer run (``<kind>-<pid>-…``; ``push_<pid>_…`` from older versions)."""
        return temp.stale_temp_files(self.tmp_dir)

    def remove_temp(self, path: Path) -> int:
        """Remove a temporary file or folder of ``tmp/`` (never following symlinks); returns the bytes freed."""
        return temp.remove_temp(self.tmp_dir, path)

    def temp_usage(self) -> tuple[int, int]:
        """(entries, bytes) in ``tmp/``: temporary objects and push staging folders."""
        return temp.temp_usage(self.tmp_dir)
