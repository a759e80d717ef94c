"""The store's parts after the split of ``objects.py`` (format, writer, readers, refs, temp), and
regressions for what was found while reading it: stale push folders and ``du``, materialize's
inputs keyed by tensor name, and calibration's scales-only check surviving ``python -O``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import BASE
from safetensors.torch import load_file

from deltahub.errors import CorruptObjectError, DeltaHubError, DiskFullError, StoreError, UnsupportedFormatError
from deltahub.store import HEADER_SIZE, Compression, Encoding, ObjectStore
from deltahub.store import format as fmt
from deltahub.store import objects as objects_mod
from deltahub.store.refs import ExternalRef
from deltahub.store.writer import ObjectWriter

DELTA = "ft"
HF = "hf_hub_cache"


def _header(encoding: int, size: int) -> bytes:
    """The version-1 header, built by hand from the documented layout (not by the code under test)."""
    return b"DHOBJ\0" + bytes([1, encoding]) + struct.pack("<Q", size)


@pytest.fixture
def ext(tmp_path) -> Path:
    root = tmp_path / "hf"
    root.mkdir()
    (root / "blob").write_bytes(bytes(range(256)) * 40)
    return root


@pytest.fixture
def objs(tmp_path, ext) -> ObjectStore:
    return ObjectStore(tmp_path / "store", lambda: {HF: ext})


def _place(store: ObjectStore, object_id: str, data: bytes) -> None:
    path = store.path_of(object_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------------------ format: no change
def test_objects_written_by_hand_read_back_through_every_path(objs, ext):
    """Object files laid out by hand per the version-1 format (raw, zstd, reference) read the same
    through read, read_view, hash_content and mmap_raw: existing stores read as before."""
    content = b"deltahub " * 500
    oid = hashlib.sha256(content).hexdigest()
    ref_content = (ext / "blob").read_bytes()[100:1100]
    ref_id = hashlib.sha256(ref_content).hexdigest()
    ref_payload = json.dumps({"length": 1000, "offset": 100, "path": "blob", "root": HF}).encode()
    cases = {
        "raw": (oid, _header(0, len(content)) + content, content),
        "ref": (ref_id, _header(2, 1000) + ref_payload, ref_content),
    }
    for name, (object_id, data, expected) in cases.items():
        _place(objs, object_id, data)
        assert bytes(objs.read(object_id)) == expected, name
        assert bytes(objs.read_view(object_id)) == expected, name
        assert objs.hash_content(object_id) == object_id, name
        mm, offset = objs.mmap_raw(object_id)
        assert mm[offset : offset + len(expected)] == expected, name
        assert objs.info(object_id).stored_size == len(data)
    assert objs.encoding_of(ref_id) is Encoding.REF
    assert objs.external_ref(ref_id) == ExternalRef(HF, "blob", (ext / "blob").resolve(), 100, 1000)
    assert objs.external_ref(oid) is None
    # zstd: one frame after the header
    objs.delete(oid)
    _place(objs, oid, _header(1, len(content)) + zstandard.ZstdCompressor(level=3).compress(content))
    assert objs.encoding_of(oid) is Encoding.ZSTD
    assert bytes(objs.read(oid)) == bytes(objs.read_view(oid)) == content
    assert objs.hash_content(oid) == oid
    with pytest.raises(StoreError, match="compressed and cannot be memory-mapped"):
        objs.mmap_raw(oid)


def test_writes_are_byte_for_byte_the_version_1_format(objs, ext):
    content = os.urandom(5000)  # incompressible: AUTO keeps it raw
    info = objs.put(content, Compression.AUTO)
    assert info.encoding is Encoding.RAW and info.sha256 == hashlib.sha256(content).hexdigest()
    assert objs.path_of(info.sha256).read_bytes() == _header(0, 5000) + content
    text = b'{"hello": "world"}\n' * 200
    info = objs.put(text, Compression.AUTO)
    raw = objs.path_of(info.sha256).read_bytes()
    assert info.encoding is Encoding.ZSTD and raw[:16] == _header(1, len(text))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(raw[16:]) == text  # one streamed frame
    ref = objs.put_ref(HF, "blob", 7, 300)
    expected_payload = b'{"length": 300, "offset": 7, "path": "blob", "root": "hf_hub_cache"}'
    assert objs.path_of(ref.sha256).read_bytes() == _header(2, 300) + expected_payload
    assert ref.stored_size == HEADER_SIZE + len(expected_payload)
    for oid in objs.iter_ids():
        assert not os.stat(objs.path_of(oid)).st_mode & 0o222  # read-only, as before


def test_header_parse_refuses_what_it_does_not_know():
    assert fmt.parse_header(_header(2, 9), "x") == fmt.Header(Encoding.REF, 9)
    assert fmt.build_header(Encoding.ZSTD, 12345) == _header(1, 12345)
    with pytest.raises(CorruptObjectError, match="truncated"):
        fmt.parse_header(b"DHOBJ", "x")
    with pytest.raises(CorruptObjectError, match="bad header"):
        fmt.parse_header(b"XXXXXX" + _header(0, 0)[6:], "x")
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        fmt.parse_header(b"DHOBJ\0\x02\x00" + bytes(8), "x")
    with pytest.raises(UnsupportedFormatError, match="unknown encoding 3"):
        fmt.parse_header(_header(3, 0), "x")


def test_one_payload_reader_per_encoding(objs):
    assert set(objs._readers) == set(Encoding)
    assert len({id(r) for r in objs._readers.values()}) == len(Encoding)


def test_old_import_paths_keep_working():
    for name in ("MAGIC", "HEADER", "HEADER_SIZE", "OBJECT_FORMAT_VERSION", "Encoding", "Compression",
                 "ObjectInfo", "ObjectStore", "check_object_id", "fsync_dir", "tree_bytes", "pid_alive"):
        assert hasattr(objects_mod, name), name
    assert objects_mod.HEADER.size == HEADER_SIZE == 16


# ------------------------------------------------------------------------------ writer
def test_put_and_put_ref_share_one_temp_file_path(objs, monkeypatch):
    calls: list[str] = []
    real = ObjectWriter._write_temp

    def spy(self, what, expected, fill):
        calls.append(what)
        return real(self, what, expected, fill)

    monkeypatch.setattr(ObjectWriter, "_write_temp", spy)
    objs.put(b"abc")
    objs.put(iter([b"stream", b"ed"]), Compression.AUTO)
    objs.put_ref(HF, "blob", 0, 64)
    with objs.batch():
        objs.put(b"in a batch")
        objs.put_ref(HF, "blob", 64, 64)
    assert calls == ["writing an object"] * 2 + ["writing a reference object", "writing an object", "writing a reference object"]
    assert not list(objs.tmp_dir.iterdir())


@pytest.mark.parametrize("kind", ["content", "reference"])
def test_a_short_or_lying_write_publishes_nothing(objs, monkeypatch, kind):
    """Every write, references included, fails whole: a write taking nothing is a full disk, a
    write claiming more than it wrote fails the length check; no temp file, no object is left."""
    from deltahub import fileio

    def put():
        return objs.put(b"x" * 1000) if kind == "content" else objs.put_ref(HF, "blob", 0, 1000)

    monkeypatch.setattr(fileio, "os_write", lambda fd, data: 0)
    with pytest.raises(DiskFullError):
        put()
    monkeypatch.setattr(fileio, "os_write", lambda fd, data: os.write(fd, bytes(data)[:-1]) + 1)
    with pytest.raises(OSError) as info:
        put()
    assert info.value.errno == errno.EIO and "does not hold what was written" in str(info.value)
    assert not list(objs.tmp_dir.iterdir()) and not list(objs.iter_ids())
    monkeypatch.undo()
    assert objs.read(put().sha256)


# ------------------------------------------------------------------------------ tmp/, gc and du
def test_gc_removes_stale_push_folders_old_and_new_style_and_du_counts_tmp(store, home, tmp_path):
    """Push staging folders of a killed push (``push_<pid>_…`` of older versions, ``push-<pid>-…``
    now) are stale and gc removes them recursively (not ``unlink``), never following a symbolic
    link out; a live process's folder stays; ``du`` counts every ``tmp/`` entry in its total."""
    store.list()  # opens the store: tmp/ exists
    tmp = home / "tmp"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the store's")
    old = tmp / "push_999999999_ab12"  # a pid above pid_max: never alive
    (old / "sub").mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"1" * 1000)
    (old / "sub" / "config.json").write_bytes(b"2" * 200)
    (old / "link").symlink_to(outside)
    new = tmp / "push-999999999-cd34"
    (new / "a" / "b").mkdir(parents=True)
    (new / "a" / "b" / "delta.safetensors").write_bytes(b"3" * 3000)
    live = tmp / f"push-{os.getpid()}-ef56"
    live.mkdir()
    (live / "x").write_bytes(b"4" * 40)
    obj = tmp / "obj-999999999-zz.tmp"
    obj.write_bytes(b"5" * 7)

    du = store.du()
    assert du["tmp_entries"] == 4
    assert du["tmp_bytes"] == 1000 + 200 + 3000 + 40 + 7
    assert du["stale_tmp_entries"] == 3 and du["stale_tmp_bytes"] == 1000 + 200 + 3000 + 7
    assert du["total_bytes"] == du["object_bytes"] + du["index_bytes"] + du["tmp_bytes"] + du["reserve_bytes"]

    report = store.gc()
    assert sorted(report.temp_files) == sorted([old.name, new.name, obj.name])
    assert report.temp_bytes == 1000 + 200 + 3000 + 7
    assert not old.exists() and not new.exists() and not obj.exists()
    assert (live / "x").read_bytes() == b"4" * 40
    assert outside.read_bytes() == b"not the store's"
    du = store.du()
    assert du["tmp_entries"] == 1 and du["tmp_bytes"] == 40 and du["stale_tmp_entries"] == 0


def test_remove_temp_stays_in_tmp(objs, tmp_path):
    elsewhere = tmp_path / "push-999999999-x"
    elsewhere.mkdir()
    with pytest.raises(StoreError):
        objs.remove_temp(elsewhere)
    assert elsewhere.is_dir()


# ------------------------------------------------------------------------------ materialize by name
def _same_shape_groups(names_shapes: dict[str, tuple]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, shape in names_shapes.items():
        if name.startswith("model.layers.0.self_attn."):
            groups.setdefault(tuple(shape), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def test_materialize_keeps_equal_shape_tensors_apart(store, model_dirs, tmp_path):
    """q/o and k/v of the llama fixture have equal shapes: each comes back as itself."""
    llama = model_dirs["llama"]
    store.add(llama["base"], name=BASE)
    store.compress(llama["ft"], base=BASE, name=DELTA)
    base_in, ft_in = load_file(llama["base"] / "model.safetensors"), load_file(llama["ft"] / "model.safetensors")
    groups = _same_shape_groups({k: v.shape for k, v in base_in.items()})
    assert len(groups) == 2  # (q, o) and (k, v)

    store.materialize(BASE, tmp_path / "base")
    base_out = load_file(tmp_path / "base" / "model.safetensors")
    for group in groups:
        for name in group:
            assert torch.equal(base_out[name], base_in[name]), name  # a base round-trips exactly

    store.materialize(DELTA, tmp_path / "ft")
    ft_out = load_file(tmp_path / "ft" / "model.safetensors")
    for group in groups:
        for name in group:
            own = (ft_out[name] - ft_in[name]).norm()
            for other in group:
                if other != name:  # closer to its own fine-tuned tensor than to its twin's
                    assert own < 0.5 * (ft_out[name] - ft_in[other]).norm(), (name, other)


def test_materialize_refuses_a_writer_that_changes_the_order(store, model_dirs, tmp_path, monkeypatch):
    """Were the shard writer ever to write tensors in another order than they were read, the filler
    gets a name it was not given inputs for: an error, not a swapped tensor."""
    from deltahub.ops import materialize as materialize_mod

    llama = model_dirs["llama"]
    store.add(llama["base"], name=BASE)
    store.compress(llama["ft"], base=BASE, name=DELTA)
    real = materialize_mod.write_sharded

    def swapping(out, specs, fill, **kw):
        specs = list(specs)
        k = next(i for i, s in enumerate(specs) if s.name.endswith("layers.0.self_attn.k_proj.weight"))
        v = next(i for i, s in enumerate(specs) if s.name.endswith("layers.0.self_attn.v_proj.weight"))
        assert specs[k].shape == specs[v].shape
        specs[k], specs[v] = specs[v], specs[k]
        return real(out, specs, fill, **kw)

    monkeypatch.setattr(materialize_mod, "write_sharded", swapping)
    out = tmp_path / "out"
    with pytest.raises(DeltaHubError, match="internal error: writing tensor .*v_proj.* next tensor read is .*k_proj"):
        store.materialize(DELTA, out)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_named_inputs_checks_every_name_and_the_end():
    from deltahub.ops.materialize import NamedInputs
    from deltahub.ops.reconstruct import Inputs

    def read(*names):
        return iter([Inputs(n, {}, None) for n in names])

    inputs = NamedInputs(read("a", "b"))
    assert inputs.take("a").name == "a"
    with pytest.raises(DeltaHubError, match="writing tensor 'c' but the next tensor read is 'b'"):
        inputs.take("c")
    short = NamedInputs(read("a"))
    assert short.take("a").name == "a"
    with pytest.raises(DeltaHubError, match="next tensor read is None"):
        short.take("b")
    left = NamedInputs(read("a", "b"))
    left.take("a")
    with pytest.raises(DeltaHubError, match="'b' was read but never written"):
        left.finish()


# ------------------------------------------------------------------------------ calibrate: scales only
SCALES_ONLY_SCRIPT = """
import torch
from torch import nn
from deltahub.calibrate.distill import DistillConfig, calibrate_scales
from deltahub.errors import DeltaHubError

student = nn.Linear(4, 4)
foreign = nn.Parameter(torch.tensor(1.0))  # not a parameter of the student
try:
    calibrate_scales(student, {"x": foreign}, torch.zeros(1, 4, dtype=torch.long), None, DistillConfig())
except DeltaHubError as exc:
    print("refused:", exc)
    raise SystemExit(0)
raise SystemExit(1)
"""


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "python-O"])
def test_calibration_refuses_to_train_anything_but_the_scales(optimize):
    """The scales-only guard is a real check (a DeltaHubError), not an ``assert`` that ``-O`` drops."""
    cmd = [sys.executable, *(["-O"] if optimize else []), "-c", SCALES_ONLY_SCRIPT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused: calibration would train 0 parameters of the model, which are not exactly its 1 delta scales" in proc.stdout


def test_every_read_path_reports_a_damaged_payload(objs):
    """Each encoding's reader turns damage into CorruptObjectError on every path that reads it."""
    content = b"abc" * 1000
    oid = hashlib.sha256(content).hexdigest()
    _place(objs, oid, _header(1, len(content)) + b"\x28\xb5\x2f\xfd garbage")
    for read in (objs.read, objs.read_view, objs.hash_content):
        with pytest.raises(CorruptObjectError, match="does not decompress"):
            read(oid)
    objs.delete(oid)
    _place(objs, oid, _header(0, len(content) + 1) + content)  # raw, shorter than its header says
    for read in (objs.read, objs.read_view):
        with pytest.raises(CorruptObjectError, match="wrong length"):
            read(oid)
    with pytest.raises(CorruptObjectError, match="corrupt"):
        objs.check_digest(oid, bytes(objs.mmap_raw(oid)[0])[16:] + b"x")
    objs.delete(oid)
    _place(objs, oid, _header(2, len(content)) + b'{"root": "hf_hub_cache", "path": "../x", "offset": 0, "length": 3000}')
    for read in (objs.read, objs.read_view, objs.hash_content, objs.mmap_raw, objs.external_ref):
        with pytest.raises(CorruptObjectError, match="unsafe reference"):
            read(oid)
