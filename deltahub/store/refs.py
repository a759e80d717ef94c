"""Reference objects (encoding 2): content kept outside the store, in a read-only root.

A reference object keeps no copy of the bytes: its payload is a small JSON object
``{"root": KEY, "path": REL, "offset": O, "length": L}`` naming a byte range of a file under one of
the read-only roots the store was opened with (``external_roots``; deltahub uses it for blobs of the
Hugging Face cache, ``KEY = "hf_hub_cache"``). ``REL`` is resolved with the same rules as every other
path (relative, no ``..``, no symlink out of the root). The content is the ``L`` bytes at ``O`` and
MUST still hash to the object id: every verified read re-hashes it, so a changed or deleted target is
a :class:`CorruptObjectError`, never a silently wrong tensor.

This module holds the payload (build, parse, resolve) and :class:`RefReader`, the payload reader of
encoding 2. Writing a reference object goes through the one temporary-file path of ``writer``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from deltahub.errors import CorruptObjectError, StoreError
from deltahub.formats import safe_json
from deltahub.store.format import CHUNK
from deltahub.store.readers import OpenObject, PayloadReader

#: Returns, when called, the folders reference objects may point into (key -> folder).
ExternalRoots = Callable[[], Mapping[str, Path]]

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


def ref_payload(root: str, relpath: str, offset: int, length: int) -> bytes:
    """The payload of a reference object (canonical JSON: sorted keys)."""
    return json.dumps({"root": root, "path": relpath, "offset": offset, "length": length}, sort_keys=True).encode()


def resolve(roots: Mapping[str, Path], root: str, relpath: str, object_id: str) -> Path:
    """The file a reference names, checked to stay inside its root (no ``..``, no symlink out)."""
    if root not in roots:
        raise CorruptObjectError(f"object {object_id} refers to unknown root {root!r}", "run `deltahub verify`")
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


def hash_range(target: Path, relpath: str, offset: int, length: int) -> str:
    """The sha256 of ``length`` bytes at ``offset`` of ``target`` (the id of a reference to them),
    hashed through a memory map: no copy of the bytes into fresh pages."""
    with open(target, "rb") as fh:
        if offset < 0 or length < 0 or os.fstat(fh.fileno()).st_size < offset + length:
            raise StoreError(f"{relpath} is shorter than the referenced range {offset}+{length}")
        if length == 0:
            return hashlib.sha256(b"").hexdigest()
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            with memoryview(mm) as view:
                return hashlib.sha256(view[offset : offset + length]).hexdigest()
        finally:
            mm.close()


def parse_ref(raw: bytes, object_id: str, size: int) -> dict:
    """Check a reference payload (at most ``MAX_REF_PAYLOAD`` bytes of JSON naming a range of
    ``size`` bytes, the header's length) and return it."""
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
    return doc


class RefReader(PayloadReader):
    """Encoding 2: the payload names the content's range in a file under an external root."""

    def __init__(self, roots: ExternalRoots) -> None:
        self.roots = roots

    def ref(self, obj: OpenObject) -> ExternalRef:
        """Where the content is: the payload parsed, the file resolved and long enough."""
        size = obj.size
        doc = parse_ref(obj.fh.read(MAX_REF_PAYLOAD + 1), obj.object_id, size)
        path = resolve(self.roots(), doc["root"], doc["path"], obj.object_id)
        if path.stat().st_size < doc["offset"] + size:
            raise CorruptObjectError(
                f"object {obj.object_id} refers to {doc['path']}, which is now shorter than the referenced range",
                "the referenced file changed; run `deltahub add REPO_ID@REVISION` again (or add it with --copy)",
            )
        return ExternalRef(doc["root"], doc["path"], path, doc["offset"], size)

    def read(self, obj: OpenObject) -> bytearray:
        ref = self.ref(obj)
        out = bytearray(ref.length)
        with open(ref.path, "rb") as target:
            target.seek(ref.offset)
            if target.readinto(out) != ref.length:
                raise obj.wrong_length()
        return out

    def view(self, obj: OpenObject) -> memoryview | None:
        if obj.size == 0:  # nothing to map
            return None
        ref = self.ref(obj)
        with open(ref.path, "rb") as target:
            mm = mmap.mmap(target.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mm)[ref.offset : ref.offset + ref.length]

    def mmap(self, obj: OpenObject) -> tuple[mmap.mmap, int]:
        if obj.size == 0:
            raise StoreError(f"object {obj.object_id} is empty and cannot be memory-mapped")
        ref = self.ref(obj)
        with open(ref.path, "rb") as target:
            return mmap.mmap(target.fileno(), 0, access=mmap.ACCESS_READ), ref.offset

    def chunks(self, obj: OpenObject) -> Iterator[bytes]:
        ref = self.ref(obj)
        with open(ref.path, "rb") as target:
            target.seek(ref.offset)
            left = ref.length
            while left and (chunk := target.read(min(CHUNK, left))):
                yield chunk
                left -= len(chunk)
