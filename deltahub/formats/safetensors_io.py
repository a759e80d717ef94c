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

MAX_HEADER_BYTES = 100 << 20


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
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start = 8 + n
        data_size = file_size - data_start
        spans: list[tuple[int, int]] = []
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
            dtype = ST_TO_TORCH.get(spec.get("dtype"))  # type: ignore[arg-type]
            if dtype is None:
                raise self._bad(f"tensor {name!r} has unsupported dtype {spec.get('dtype')!r}")
            shape = spec.get("shape")
            offsets = spec.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise self._bad(f"tensor {name!r} has an invalid shape {shape!r}")
            if not (
                isinstance(offsets, list)
                and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]
            ):
                raise self._bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if offsets[1] - offsets[0] != nbytes:
                raise self._bad(f"tensor {name!r} has {offsets[1] - offsets[0]} bytes, expected {nbytes}")
            if offsets[1] > data_size:
                raise self._bad(
                    f"tensor {name!r} ends at byte {offsets[1]} but the file has only {data_size} "
                    "bytes of data (truncated?)"
                )
            spans.append((offsets[0], offsets[1]))
            self.entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)
        spans.sort()
        pos = 0
        for start, end in spans:
            if start < pos:
                raise self._bad("tensors overlap")
            pos = end
        if pos != data_size and spans:
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

    Usage: ``with SafetensorsWriter(path, specs) as w: w.write(name, tensor)`` for every spec, in the
    order of ``specs``.
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
        self._fh = open(self.path, "w+b")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._fh.flush()
        self._data_start = 8 + len(raw)
        self._offsets = {}
        pos = self._data_start
        for spec in self.specs:
            self._offsets[spec.name] = pos
            pos += spec.nbytes
        self._size = pos
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        self._fh.seek(self._offsets[name])
        self._fh.write(tensor_bytes(tensor))
        self._next += 1

    @contextmanager
    def region(self, name: str) -> Iterator[torch.Tensor]:
        """A writable tensor (spec dtype and shape) mapped onto tensor ``name``'s bytes in the file.

        Fill it in place (e.g. ``decode_sign1(..., out=t)`` or ``t.copy_(src)``): the data goes
        straight into the page cache, with no intermediate buffer and no ``write()`` copy. Only
        this tensor's pages are mapped, and only until the block ends, so resident memory stays at
        one tensor. Tensors must be filled in spec order (like :meth:`write`).
        """
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"expected {spec.name}, got {name}")
        self._next += 1
        if spec.nbytes == 0:
            yield torch.empty(spec.shape, dtype=spec.dtype)
            return
        start = self._offsets[name]
        end = start + spec.nbytes
        if os.fstat(self._fh.fileno()).st_size < end:
            os.ftruncate(self._fh.fileno(), end)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self._fh.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_WRITE)
        try:
            tensor = torch.frombuffer(mm, dtype=torch.uint8, count=spec.nbytes, offset=start - aligned)
            yield tensor.view(spec.dtype).reshape(spec.shape)
        finally:
            del tensor
            try:
                mm.close()
            except BufferError:  # a caller kept a reference: the map goes with it
                pass

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            if self._next != len(self.specs):
                raise ValueError(f"{len(self.specs) - self._next} tensors were not written")
            self._fh.flush()
            if os.fstat(self._fh.fileno()).st_size != self._size:
                os.ftruncate(self._fh.fileno(), self._size)
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def iter_tensors(reader: SafetensorsReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sorted(reader.entries):
        yield name, reader.read(name)
