"""Regressions for problems found in review: races, dtypes, output directories, hostile manifests
and object headers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_model, save_checkpoint, snapshot_store
from safetensors.torch import load_file, save_file

import deltahub
from deltahub.errors import CorruptObjectError, OutputExistsError
from deltahub.formats.manifest import Manifest, ModelKind, parse_manifest
from deltahub.ops import materialize as materialize_mod
from deltahub.ops.context import StoreContext
from deltahub.store import HEADER_SIZE, Compression, ObjectStore
from deltahub.store.objects import HEADER, MAGIC, OBJECT_FORMAT_VERSION


@pytest.fixture(scope="module")
def template(tmp_path_factory, model_dirs) -> Path:
    path = tmp_path_factory.mktemp("review") / "store"
    with deltahub.Store(path) as s:
        s.add(model_dirs["llama"]["base"], name="base")
        s.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    return path


@pytest.fixture
def filled(tmp_path, template):
    home = tmp_path / "store"
    shutil.copytree(template, home)
    with deltahub.Store(home) as store:
        yield store, store._ctx, home


def test_rm_does_not_prune_a_writer_that_has_not_published_its_name(filled, model_dirs, monkeypatch):
    """Between indexing and naming, a writer's rows must survive another process's rm."""
    store, ctx, home = filled
    seen = {}
    real_set_name = StoreContext.set_name

    def rm_in_between(self, name, manifest_id, force):
        seen["rm"] = store.rm("ft")  # another user removes another model meanwhile
        return real_set_name(self, name, manifest_id, force)

    monkeypatch.setattr(StoreContext, "set_name", rm_in_between)
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft2", embeddings="dense")
    monkeypatch.undo()
    assert seen["rm"]["removed"] is True
    assert {m["name"] for m in store.list()} == {"base", "ft2"}
    assert store.verify().ok
    out = store.materialize("ft2", home.parent / "out")
    assert (out.out_dir / "model.safetensors").is_file()


def test_default_materialize_keeps_each_tensors_dtype(tmp_path):
    """A bf16 model with one fp32 tensor comes back with that tensor still fp32, bit for bit."""
    model = make_model("llama")
    src = save_checkpoint(model, tmp_path / "m", dtype=torch.bfloat16)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = torch.randn(tensors["model.norm.weight"].shape, dtype=torch.float32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with deltahub.Store(tmp_path / "store") as store:
        store.add(src, name="mixed")
        store.materialize("mixed", tmp_path / "out")
        out = load_file(tmp_path / "out" / "model.safetensors")
        assert out["model.norm.weight"].dtype == torch.float32
        assert torch.equal(out["model.norm.weight"], tensors["model.norm.weight"])
        assert out["model.embed_tokens.weight"].dtype == torch.bfloat16
        store.materialize("mixed", tmp_path / "out16", dtype="float16")
        assert load_file(tmp_path / "out16" / "model.safetensors")["model.norm.weight"].dtype == torch.float16


def test_materialize_never_overwrites_a_directory_filled_meanwhile(filled, tmp_path, monkeypatch):
    store, _ctx, _home = filled
    out = tmp_path / "out"
    real = materialize_mod.write_sharded

    def fill_then_write(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("someone else's work")
        return real(*args, **kwargs)

    monkeypatch.setattr(materialize_mod, "write_sharded", fill_then_write)
    with pytest.raises(OutputExistsError):
        store.materialize("ft", out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir() if "deltahub-tmp" in p.name] == []


@pytest.mark.parametrize("bad", ["store", "parent"])
def test_materialize_refuses_the_store_or_a_folder_containing_it(filled, bad):
    store, _ctx, home = filled
    target = home if bad == "store" else home.parent
    before = snapshot_store(home)
    with pytest.raises(OutputExistsError, match="outside the store"):
        store.materialize("ft", target, force=True)
    assert snapshot_store(home) == before


@pytest.mark.parametrize("planted", ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"])
def test_manifest_cannot_plant_weight_files(planted):
    m = Manifest(kind=ModelKind.BASE, model_type="llama", architectures=[], dtype="float32")
    obj = m.to_json()
    obj["files"] = {"config.json": "a" * 64, planted: "b" * 64}
    with pytest.raises(CorruptObjectError, match="not one deltahub carries"):
        parse_manifest(json.dumps(obj).encode())


def test_delta_manifest_must_pin_every_base_tensor(filled):
    _store, ctx, _home = filled
    manifest = ctx.resolve("ft").manifest
    obj = manifest.to_json()
    pinned = next(n for n, r in obj["tensors"].items() if r["codec"] == "sign1")
    del obj["base"]["tensors"][pinned]
    with pytest.raises(CorruptObjectError, match="not pinned"):
        parse_manifest(json.dumps(obj).encode())


@pytest.mark.parametrize("shape", [[-1, 4], [True, 4], ["4", 4], 4])
def test_manifest_shapes_are_validated(filled, shape):
    _store, ctx, _home = filled
    obj = ctx.resolve("ft").manifest.to_json()
    obj["tensors"][next(iter(obj["tensors"]))]["shape"] = shape
    with pytest.raises(CorruptObjectError, match="invalid shape"):
        parse_manifest(json.dumps(obj).encode())


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.AUTO])
def test_absurd_length_in_object_header_is_corruption_not_memory_error(tmp_path, compression):
    objects = ObjectStore(tmp_path)
    info = objects.put(b'{"hello": "world"}' * 100, compression)
    path = objects.path_of(info.sha256)
    data = bytearray(path.read_bytes())
    _magic, _version, encoding, _size = HEADER.unpack(bytes(data[:HEADER_SIZE]))
    data[:HEADER_SIZE] = HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, encoding, 1 << 62)
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match="wrong length"):
        objects.read(info.sha256)


def test_rm_works_when_the_manifest_object_is_gone(filled):
    store, ctx, _home = filled
    manifest_id = ctx.resolve("ft").manifest_id
    path = ctx.objects.path_of(manifest_id)
    path.chmod(0o644)
    path.unlink()
    assert store.rm("ft")["manifest_id"] == manifest_id
    assert [m["name"] for m in store.list()] == ["base"]
    store.gc()
    assert store.verify().ok
