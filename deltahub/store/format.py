"""The object file format (version 1): where an object lives and its 16-byte header.

An object is immutable bytes addressed by the sha256 of its *uncompressed* content. On disk it lives
at ``objects/<id[:2]>/<id>`` and is a 16-byte header followed by the payload:

    offset 0   6 bytes  magic  b"DHOBJ\\0"
    offset 6   1 byte   object file format version (1)
    offset 7   1 byte   encoding: 0 = raw, 1 = zstd (one zstd frame of the content),
                        2 = reference (the content lives outside the store, see ``refs``)
    offset 8   8 bytes  uncompressed content length, little-endian uint64
    offset 16           payload

Raw payloads start at a 16-byte aligned offset, so base tensors stay memory-mappable. The encoding
is read from the header, never inferred from the file name. How each encoding's payload is read is
in ``readers`` (raw, zstd) and ``refs`` (reference); this module knows only the header.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from deltahub.errors import CorruptObjectError, UnsupportedFormatError

MAGIC = b"DHOBJ\x00"
OBJECT_FORMAT_VERSION = 1
HEADER = struct.Struct("<6sBBQ")
HEADER_SIZE = HEADER.size  # 16
#: The size of the pieces objects are written, hashed and streamed in.
CHUNK = 8 << 20
ID_RE = re.compile(r"^[0-9a-f]{64}$")


class Encoding(enum.IntEnum):
    """How an object's payload is stored (header byte 7)."""

    RAW = 0
    ZSTD = 1
    REF = 2


@dataclass(frozen=True)
class Header:
    """A parsed, checked header: the payload's encoding and the content's length."""

    encoding: Encoding
    size: int


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
    if not isinstance(object_id, str) or not ID_RE.match(object_id):
        raise CorruptObjectError(
            f"invalid object id {object_id!r}",
            "the manifest or index is damaged; run `deltahub verify`",
        )
    return object_id


def object_path(objects_dir: Path, object_id: str) -> Path:
    """Where object ``object_id`` lives under ``objects_dir`` (the id is checked first)."""
    check_object_id(object_id)
    return objects_dir / object_id[:2] / object_id


def build_header(encoding: Encoding, size: int) -> bytes:
    """The 16 header bytes of an object of ``size`` content bytes stored with ``encoding``."""
    return HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(encoding), size)


def parse_header(raw: bytes, object_id: str) -> Header:
    """Check and parse the first bytes of object ``object_id``'s file.

    A short or foreign header is a :class:`CorruptObjectError`; an unknown version or encoding is an
    :class:`UnsupportedFormatError` naming it.
    """
    if len(raw) != HEADER_SIZE:
        raise CorruptObjectError(f"object {object_id} is truncated (no header)", "run `deltahub verify`")
    magic, version, encoding, size = HEADER.unpack(raw)
    if magic != MAGIC:
        raise CorruptObjectError(f"object {object_id} has a bad header", "run `deltahub verify`")
    if version != OBJECT_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"object {object_id} uses object format version {version}, this deltahub reads "
            f"version {OBJECT_FORMAT_VERSION}",
            "upgrade deltahub",
        )
    try:
        return Header(Encoding(encoding), size)
    except ValueError:
        raise UnsupportedFormatError(f"object {object_id} uses unknown encoding {encoding}", "upgrade deltahub") from None


def read_header(fh: BinaryIO, object_id: str) -> Header:
    """Read and parse the header of an object file opened at its start; ``fh`` is left at the payload."""
    return parse_header(fh.read(HEADER_SIZE), object_id)
