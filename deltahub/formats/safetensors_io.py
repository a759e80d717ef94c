"""Reading and writing safetensors files tensor by tensor, with bounded memory.

The reader parses and validates the header itself and reads each tensor with ``readinto`` into a
fresh buffer (no mmap), so resident memory stays at a few tensors however large the file is, and a
truncated or malformed file is reported before any tensor is used.

The writer knows every tensor's name, dtype and shape up front, writes the header first and then
streams the tensors in the given order. Output is deterministic: the header's keys are sorted and
nothing time-dependent is written.

Format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple of 8),
then the data; each tensor's ``data_offsets`` are relative to the start of the data.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from deltahub.errors import MalformedSafetensorsError
from deltahub.formats import safe_json
from deltahub.fileio import pwrite_all, reserve, start_writeback, write_all

#: safetensors dtype code ↔ torch dtype.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    ST_TO_TORCH["F8_E4M3"] = torch.float8_e4m3fn
    ST_TO_TORCH["F8_E5M2"] = torch.float8_e5m2
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

#: torch dtype ↔ the name used in manifests and on the command line.
DTYPE_NAMES: dict[torch.dtype, str] = {d: str(d).removeprefix("torch.") for d in ST_TO_TORCH.values()}
NAME_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

#: The safetensors library's limit (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
_U64_MAX = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1


def _is_uint(value: object, limit: int) -> bool:
    """A JSON unsigned integer (not a bool, not a float such as ``1.0`` or ``-0``) up to ``limit``."""
    return type(value) is int and 0 <= value <= limit


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return NAME_TO_DTYPE[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and what they mean."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsReader:
    """A validated safetensors file. ``read(name)`` returns an owned CPU tensor."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self._parse()

    def _bad(self, why: str) -> MalformedSafetensorsError:
        return MalformedSafetensorsError(
            f"{self.path.name} is not a valid safetensors file: {why}",
            "the file is truncated or damaged; re-save or re-download it",
        )

    def _parse(self) -> None:
        """Validate the file as the ``safetensors`` library does (and a little stricter).

        Like the library: header length at most 100,000,000 bytes; UTF-8 JSON (no NaN/Infinity, no
        lone surrogates, no numbers out of range); a JSON object of tensor entries and an optional
        ``__metadata__`` (null or strings to strings); each entry has a known ``dtype``, a ``shape``
        of unsigned integers and two unsigned ``data_offsets`` matching its size (computed without
        overflowing 64 bits); sorted by offsets, the tensors cover the data section exactly, from
        byte 0 to the end of the file, with no gap, overlap or trailing bytes.

        Stricter, on purpose: a key may not appear twice anywhere in the header (the library keeps
        the last one silently), nesting deeper than :data:`~deltahub.formats.safe_json.MAX_DEPTH` is
        refused (the library allows 128 levels, though a valid header needs 3), dimensions must fit
        torch's int64, and only the dtypes of :data:`ST_TO_TORCH` are read.
        """
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise self._bad("shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > file_size:
                    raise self._bad(f"header length {n} does not fit in a {file_size}-byte file")
                raw = fh.read(n)
        except OSError as exc:
            raise MalformedSafetensorsError(
                f"cannot read {self.path}: {exc.strerror}", "check the path and permissions"
            ) from None
        try:
            header = safe_json.loads(raw, "the header", allow_nan=False, unique_keys=True, strict_unicode=True)
        except safe_json.JSONInputError as exc:
            raise self._bad(str(exc)) from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start = 8 + n
        data_size = file_size - data_start
        spans: list[tuple[int, int, str]] = []
        for name, spec in header.items():
            if name == "__metadata__":
                if spec is not None and not (
                    isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values())
                ):
                    raise self._bad("__metadata__ must map strings to strings")
                self.metadata = dict(spec or {})
                continue
            if not isinstance(spec, dict):
                raise self._bad(f"entry {name!r} is not an object")
            st_dtype = spec.get("dtype")
            dtype = ST_TO_TORCH.get(st_dtype) if isinstance(st_dtype, str) else None
            if dtype is None:
                raise self._bad(f"tensor {name!r} has unsupported dtype {st_dtype!r}")
            shape = spec.get("shape")
            offsets = spec.get("data_offsets")
            if not (isinstance(shape, list) and all(_is_uint(d, _U64_MAX) for d in shape)):
                raise self._bad(f"tensor {name!r} has an invalid shape {shape!r}")
            if any(d > _INT64_MAX for d in shape):  # stricter than the library: torch cannot build it
                raise self._bad(f"tensor {name!r} has a dimension past int64 in its shape {shape!r}")
            if not (
                isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_uint(o, _U64_MAX) for o in offsets)
                and offsets[0] <= offsets[1]
            ):
                raise self._bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            numel = 1
            for d in shape:  # in order, refusing a 64-bit overflow, as the library does
                numel *= d
                if numel > _U64_MAX:
                    raise self._bad(f"tensor {name!r} has a shape {shape!r} too large to address")
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if nbytes * 8 > _U64_MAX:  # the library counts bits
                raise self._bad(f"tensor {name!r} has a shape {shape!r} too large to address")
            if offsets[1] - offsets[0] != nbytes:
                raise self._bad(f"tensor {name!r} has {offsets[1] - offsets[0]} bytes, expected {nbytes}")
            if offsets[1] > data_size:
                raise self._bad(
                    f"tensor {name!r} ends at byte {offsets[1]} but the file has only {data_size} "
                    "bytes of data (truncated?)"
                )
            spans.append((offsets[0], offsets[1], name))
            self.entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)
        spans.sort()
        pos = 0
        for start, end, name in spans:
            if start < pos:
                raise self._bad(f"tensor {name!r} overlaps another (tensors overlap)")
            if start > pos:
                raise self._bad(f"bytes {pos}..{start} of the data belong to no tensor (a gap before {name!r})")
            pos = end
        if pos != data_size:
            raise self._bad(f"data section is {data_size} bytes but tensors cover {pos}")

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, copy: bool = True) -> torch.Tensor:
        """One tensor as a CPU tensor of its stored dtype and shape.

        ``copy=True`` reads it into new memory. ``copy=False`` returns a read-only view of a memory
        map of just that tensor's bytes (no copy; the map goes away with the tensor), for callers
        that only read it.
        """
        entry = self.entries[name]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if not copy:
            aligned = entry.start - entry.start % mmap.ALLOCATIONGRANULARITY
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(
                    fh.fileno(), entry.start + entry.nbytes - aligned, offset=aligned, access=mmap.ACCESS_READ
                )
            view = memoryview(mm)[entry.start - aligned :]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                return torch.frombuffer(view, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)
        buf = bytearray(entry.nbytes)
        with open(self.path, "rb") as fh:
            fh.seek(entry.start)
            got = fh.readinto(buf)
        if got != entry.nbytes:
            raise self._bad(f"tensor {name!r} is truncated")
        return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy only if needed)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose header is written first.

    Usage: ``with SafetensorsWriter(path, specs) as w: w.write(name, tensor)`` (or ``w.region(name)``)
    for every spec, in the order of ``specs``.

    Every byte is written or an ``OSError`` is raised (:func:`deltahub.fileio.write_all`), and the
    whole file is reserved on disk (``posix_fallocate``) before any tensor is written, so a full disk
    fails here, at once, and never as a ``SIGBUS`` while a memory-mapped region is filled. On a file
    system that cannot preallocate, :meth:`region` fills a buffer and writes it instead of mapping.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header: dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = dict(sorted(metadata.items()))
        offset = 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": TORCH_TO_ST[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._offsets = {}
        pos = self._data_start
        for spec in self.specs:
            self._offsets[spec.name] = pos
            pos += spec.nbytes
        self._size = pos
        self._next = 0
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        try:
            try:
                reserve(self._fd, self._size)
                self._mappable = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise  # ENOSPC, EFBIG, EDQUOT: the caller reports the folder and the bytes
                self._mappable = False
            write_all(self._fd, struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self._abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._take(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        assert self._fd is not None
        pwrite_all(self._fd, tensor_bytes(tensor), self._offsets[name])

    def _take(self, name: str) -> TensorSpec:
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected {spec.name}, got {name}")
        self._next += 1
        return spec

    @contextmanager
    def region(self, name: str) -> Iterator[torch.Tensor]:
        """A writable tensor (spec dtype and shape) mapped onto tensor ``name``'s bytes in the file.

        Fill it in place (e.g. ``decode_sign1(..., out=t)`` or ``t.copy_(src)``): the data goes
        straight into the page cache, with no intermediate buffer and no ``write()`` copy. Only
        this tensor's pages are mapped, and only until the block ends, so resident memory stays at
        one tensor. Tensors must be filled in spec order (like :meth:`write`). The file's blocks
        were reserved when it was created, so filling the map cannot run out of disk.
        """
        spec = self._take(name)
        if spec.nbytes == 0:
            yield torch.empty(spec.shape, dtype=spec.dtype)
            return
        assert self._fd is not None
        start = self._offsets[name]
        if not self._mappable:  # no preallocation here: a map could SIGBUS on a full disk
            buf = torch.empty(spec.shape, dtype=spec.dtype)
            yield buf
            pwrite_all(self._fd, tensor_bytes(buf), start)
            return
        end = start + spec.nbytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._fd, end - aligned, offset=aligned, access=mmap.ACCESS_WRITE)
        try:
            tensor = torch.frombuffer(mm, dtype=torch.uint8, count=spec.nbytes, offset=start - aligned)
            yield tensor.view(spec.dtype).reshape(spec.shape)
        finally:
            del tensor
            try:
                mm.close()
            except BufferError:  # a caller kept a reference: the map goes with it
                pass
        # The disk writes this tensor while the next ones are filled (close() still fsyncs).
        start_writeback(self._fd, start, spec.nbytes)

    def close(self) -> None:
        """Check every tensor was written, fix the file's length, fsync, close."""
        if self._fd is None:
            return
        try:
            if self._next != len(self.specs):
                raise ValueError(f"{len(self.specs) - self._next} tensors were not written")
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def _abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sorted(reader.entries):
        yield name, reader.read(name)
