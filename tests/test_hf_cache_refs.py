"""Bases whose weights are in the Hugging Face cache are stored as references, not copies."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

import deltahub  # noqa: E402
from deltahub.cli import cli  # noqa: E402
from deltahub.errors import CorruptObjectError  # noqa: E402
from deltahub.store.objects import HEADER, MAGIC, OBJECT_FORMAT_VERSION, Encoding, ObjectStore  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

BASE = f"{FAKE_USER}/tiny-base"


def _upload(folder: Path) -> str:
    api = HfApi()
    api.create_repo(BASE, exist_ok=True)
    return api.upload_folder(repo_id=BASE, folder_path=str(folder), commit_message="base").oid


def _encodings(store: deltahub.Store, name: str) -> dict[str, Encoding]:
    ctx = store._ctx
    manifest = ctx.load_manifest(ctx.resolve(name).manifest_id)
    return {t: ctx.objects.encoding_of(r.object) for t, r in manifest.tensors.items() if r.object}


def _disk(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "objects").rglob("*") if p.is_file())


def _blobs() -> list[Path]:
    return [p for p in Path(hf_constants.HF_HUB_CACHE).rglob("blobs/*") if p.is_file()]


def _same_tree(x: Path, y: Path) -> None:
    xs = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
    assert xs == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file()) and xs
    for rel in xs:
        assert filecmp.cmp(x / rel, y / rel, shallow=False), rel


def test_add_from_hub_references_the_cache_and_copy_copies(tmp_path, model_dirs, hub_server):
    dirs = model_dirs["llama"]
    commit = _upload(dirs["base"])
    weights = (dirs["base"] / "model.safetensors").stat().st_size
    with deltahub.Store(tmp_path / "ref") as ref, deltahub.Store(tmp_path / "copy") as cp:
        r = ref.add(f"{BASE}@{commit}", name="base")
        c = cp.add(f"{BASE}@{commit}", name="base", copy=True)
        assert r.manifest_id == c.manifest_id  # the same base, however its bytes are kept
        assert set(_encodings(ref, "base").values()) == {Encoding.REF}
        assert set(_encodings(cp, "base").values()) == {Encoding.RAW}
        assert r.referenced_bytes > 0.95 * weights and c.referenced_bytes == 0
        assert _disk(tmp_path / "ref") < 0.1 * _disk(tmp_path / "copy")  # measured: docs/design.md
        du = ref.du()
        ctx = ref._ctx
        manifest = ctx.load_manifest(ctx.resolve("base").manifest_id)
        assert du["hf_cache_references"] == len({r.object for r in manifest.tensors.values()})
        assert du["hf_cache_referenced_bytes"] == r.referenced_bytes and cp.du()["hf_cache_references"] == 0
        for store in (ref, cp):
            store.compress(dirs["ft"], base="base", name="ft")
            store.materialize("ft", tmp_path / f"out-{store.home.name}")
            assert store.verify().ok
        _same_tree(tmp_path / "out-ref", tmp_path / "out-copy")
        # rm + gc drop the references and never touch the HF cache
        blobs = {p: p.read_bytes() for p in _blobs()}
        ref.rm("ft")
        ref.rm("base")
        ref.gc()
        assert not any((tmp_path / "ref" / "objects").rglob("*/*"))
        assert {p: p.read_bytes() for p in _blobs()} == blobs


def test_local_folder_in_the_cache_is_referenced_elsewhere_copied(tmp_path, model_dirs, hub_server):
    commit = _upload(model_dirs["gpt2"]["base"])
    snapshot = Path(huggingface_hub.snapshot_download(BASE, revision=commit))
    with deltahub.Store(tmp_path / "s") as s:
        s.add(snapshot, name="cached")
        s.add(model_dirs["gpt2"]["base"], name="plain")  # same content: references upgraded to copies
        assert set(_encodings(s, "cached").values()) == {Encoding.RAW}
    with deltahub.Store(tmp_path / "t") as t:
        t.add(snapshot, name="cached")
        assert set(_encodings(t, "cached").values()) == {Encoding.REF}
        t.add(model_dirs["gpt2"]["base"], name="other-folder", copy=False)
        assert set(_encodings(t, "other-folder").values()) == {Encoding.RAW}


def test_changed_or_deleted_cache_blob_is_detected_and_readd_repairs(tmp_path, model_dirs, hub_server):
    dirs = model_dirs["llama"]
    commit = _upload(dirs["base"])
    with deltahub.Store(tmp_path / "s") as s:
        s.add(f"{BASE}@{commit}", name="base")
        s.compress(dirs["ft"], base="base", name="ft")
        (blob,) = [p for p in _blobs() if p.stat().st_size > 10_000]
        good = blob.read_bytes()
        # a changed byte in the HF cache: a clear error, never a silently wrong model
        os.chmod(blob, 0o644)
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        blob.write_bytes(bytes(bad))
        with pytest.raises(CorruptObjectError, match="corrupt"):
            s.materialize("ft", tmp_path / "out1")
        assert not (tmp_path / "out1").exists()
        report = s.verify()
        assert not report.ok and {p["kind"] for p in report.problems} == {"corrupt-object"}
        # deleted: the error says what happened and how to get it back
        blob.unlink()
        with pytest.raises(CorruptObjectError, match="missing") as err:
            s.materialize("ft", tmp_path / "out2")
        assert "deltahub add" in err.value.hint
        # re-adding from the Hub downloads the blob again and the base works
        s.add(f"{BASE}@{commit}", name="base", force=True)
        s.materialize("ft", tmp_path / "out3")
        assert s.verify().ok


def test_cli_add_copy_and_json(tmp_path, model_dirs, hub_server):
    _upload(model_dirs["gpt2"]["base"])
    runner = CliRunner()
    res = runner.invoke(cli, ["--home", str(tmp_path / "s"), "add", BASE, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["referenced_bytes"] > 0
    res = runner.invoke(cli, ["--home", str(tmp_path / "s2"), "add", BASE, "--copy"], catch_exceptions=False)
    assert res.exit_code == 0 and "left in the HF cache" not in res.stdout


def _ref_object(store: ObjectStore, payload: dict, size: int) -> str:
    oid = "ab" * 32
    path = store.path_of(oid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(Encoding.REF), size) + json.dumps(payload).encode())
    return oid


@pytest.mark.parametrize(
    "payload",
    [
        {"root": "cache", "path": "../outside", "offset": 0, "length": 4},
        {"root": "cache", "path": "/etc/passwd", "offset": 0, "length": 4},
        {"root": "cache", "path": "link", "offset": 0, "length": 4},  # a symlink out of the root
        {"root": "elsewhere", "path": "blob", "offset": 0, "length": 4},
        {"root": "cache", "path": "blob", "offset": 0, "length": 5},  # length differs from the header
        {"root": "cache", "path": "blob", "offset": 10, "length": 4},  # past the end of the file
        {"root": "cache", "path": "blob", "offset": -1, "length": 4},
    ],
)
def test_damaged_or_unsafe_references_are_refused(tmp_path, payload):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "blob").write_bytes(b"abcdefgh")
    (tmp_path / "outside").write_bytes(b"secret!!")
    (root / "link").symlink_to(tmp_path / "outside")
    store = ObjectStore(tmp_path / "store", external_roots=lambda: {"cache": root})
    oid = _ref_object(store, payload, 4)
    for read in (store.read, store.read_view, store.hash_content, store.mmap_raw):
        with pytest.raises(CorruptObjectError):
            read(oid)


def test_reference_round_trip_and_verification(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "blob").write_bytes(b"0123456789abcdef")
    store = ObjectStore(tmp_path / "store", external_roots=lambda: {"cache": root})
    info = store.put_ref("cache", "blob", 4, 8)
    assert info.created and info.encoding is Encoding.REF and info.size == 8
    assert bytes(store.read(info.sha256)) == b"456789ab" == bytes(store.read_view(info.sha256))
    assert store.hash_content(info.sha256) == info.sha256
    assert store.external_ref(info.sha256).offset == 4
    assert store.put_ref("cache", "blob", 4, 8).created is False
    # a copy of the same content replaces the reference, and is not reported as created
    copy = store.put(b"456789ab")
    assert copy.sha256 == info.sha256 and not copy.created
    assert store.encoding_of(info.sha256) is Encoding.RAW and store.external_ref(info.sha256) is None
    # a reference never replaces a copy
    assert store.put_ref("cache", "blob", 4, 8).encoding is Encoding.RAW
