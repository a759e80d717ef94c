"""Payload readers: one per encoding, each with the four ways an object is read.

:class:`~deltahub.store.objects.ObjectStore` opens an object, parses its header (``format``) and
hands the open file to the reader of the header's encoding (a table built once per store: raw and
zstd here, reference in ``refs``). Every read path goes through that table:

* ``read``: the content as a fresh ``bytearray``, its length checked (never allocating what a
  damaged header claims before the file is known to hold it);
* ``view``: the content without a copy (a memory map) where the encoding allows it, else ``None``
  (the caller then uses ``read``);
* ``mmap``: ``(map, offset)`` of the content, or :class:`StoreError` where it cannot be mapped;
* ``chunks``: the content streamed in pieces (hashing, ``verify``).

Verification (the sha256 of the content against the id) is the caller's: :func:`check_digest`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from deltahub.errors import CorruptObjectError, StoreError
from deltahub.store.format import CHUNK, HEADER_SIZE, Header


@dataclass(frozen=True)
class OpenObject:
    """An object file opened and its header parsed; ``fh`` is positioned at the payload."""

    object_id: str
    fh: BinaryIO
    header: Header

    @property
    def size(self) -> int:
        """The content's length, from the header."""
        return self.header.size

    def file_size(self) -> int:
        return os.fstat(self.fh.fileno()).st_size

    def wrong_length(self) -> CorruptObjectError:
        return CorruptObjectError(f"object {self.object_id} has the wrong length", "run `deltahub verify`")


class PayloadReader:
    """How the payload of one encoding is read. Subclasses implement all four."""

    def read(self, obj: OpenObject) -> bytearray:
        raise NotImplementedError

    def view(self, obj: OpenObject) -> memoryview | None:
        """A zero-copy read-only view of the content, or None when there is none to give."""
        return None

    def mmap(self, obj: OpenObject) -> tuple[mmap.mmap, int]:
        raise NotImplementedError

    def chunks(self, obj: OpenObject) -> Iterator[bytes]:
        raise NotImplementedError


class RawReader(PayloadReader):
    """Encoding 0: the payload is the content."""

    def read(self, obj: OpenObject) -> bytearray:
        # Check the header's length against the file before allocating anything.
        if obj.file_size() != HEADER_SIZE + obj.size:
            raise obj.wrong_length()
        out = bytearray(obj.size)
        if obj.fh.readinto(out) != obj.size:
            raise obj.wrong_length()
        return out

    def view(self, obj: OpenObject) -> memoryview | None:
        if obj.size == 0:  # an empty file region cannot be mapped
            return None
        if obj.file_size() != HEADER_SIZE + obj.size:
            raise obj.wrong_length()
        mm = mmap.mmap(obj.fh.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mm)[HEADER_SIZE:]

    def mmap(self, obj: OpenObject) -> tuple[mmap.mmap, int]:
        if obj.size == 0:
            raise StoreError(f"object {obj.object_id} is empty and cannot be memory-mapped")
        return mmap.mmap(obj.fh.fileno(), 0, access=mmap.ACCESS_READ), HEADER_SIZE

    def chunks(self, obj: OpenObject) -> Iterator[bytes]:
        while chunk := obj.fh.read(CHUNK):
            yield chunk


class ZstdReader(PayloadReader):
    """Encoding 1: the payload is one zstd frame of the content."""

    def read(self, obj: OpenObject) -> bytearray:
        # Never trust the header's length for an allocation: grow with the real content.
        size = obj.size
        chunks: list[bytes] = []
        pos = 0
        with (
            _decompress_errors(obj.object_id),
            zstandard.ZstdDecompressor().stream_reader(obj.fh, read_across_frames=True) as reader,
        ):
            while pos <= size:
                chunk = reader.read(min(CHUNK, size + 1 - pos))
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
        if pos != size:
            raise obj.wrong_length()
        return bytearray(b"".join(chunks))

    def mmap(self, obj: OpenObject) -> tuple[mmap.mmap, int]:
        raise StoreError(f"object {obj.object_id} is compressed and cannot be memory-mapped")

    def chunks(self, obj: OpenObject) -> Iterator[bytes]:
        with (
            _decompress_errors(obj.object_id),
            zstandard.ZstdDecompressor().stream_reader(obj.fh, read_across_frames=True) as reader,
        ):
            while chunk := reader.read(CHUNK):
                yield chunk


@contextmanager
def _decompress_errors(object_id: str) -> Iterator[None]:
    """Turn a ``ZstdError`` (a damaged payload) into a :class:`CorruptObjectError`."""
    try:
        yield
    except zstandard.ZstdError as exc:
        raise CorruptObjectError(f"object {object_id} does not decompress: {exc}", "run `deltahub verify`") from None


def check_digest(object_id: str, content: bytes | bytearray | memoryview) -> None:
    """Raise :class:`CorruptObjectError` unless ``content`` hashes to ``object_id``."""
    got = hashlib.sha256(content).hexdigest()
    if got != object_id:
        raise CorruptObjectError(
            f"object {object_id} is corrupt (its content hashes to {got[:12]}…)",
            "run `deltahub verify` to list damaged objects, then re-add or re-pull the model",
        )
