"""The store's MUST invariants: verified reads, write-once objects via tmp/, versioned formats,
paths that never escape, and crash safety (only unreferenced objects, which gc removes)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import snapshot_store

import deltahub
from deltahub.cli import cli
from deltahub.errors import CorruptObjectError, InvalidNameError, UnsupportedFormatError
from deltahub.formats.manifest import Manifest, ModelKind, parse_manifest
from deltahub.formats.paths import join_inside
from deltahub.ops.context import StoreContext
from deltahub.store import HEADER_SIZE, Encoding, ObjectStore
from deltahub.store.objects import MAGIC, OBJECT_FORMAT_VERSION

BASE, DELTA = "base", "ft"


@pytest.fixture(scope="module")
def template(tmp_path_factory, model_dirs) -> Path:
    """A store with the llama base and its fine-tune compressed, built once per module."""
    path = tmp_path_factory.mktemp("template") / "store"
    with deltahub.Store(path) as s:
        s.add(model_dirs["llama"]["base"], name=BASE)
        s.compress(model_dirs["llama"]["ft"], base=BASE, name=DELTA)
    return path


@pytest.fixture
def filled(home, template):
    """(store, ctx, home): a fresh copy of the template store."""
    shutil.copytree(template, home)
    store = deltahub.Store(home)
    yield store, store._ctx, home
    store.close()


def _manifest(ctx: StoreContext, name: str) -> Manifest:
    return ctx.resolve(name).manifest


def _object_of(ctx: StoreContext, name: str, codec: str) -> tuple[str, str]:
    """(tensor name, object id) of the first tensor of ``name`` stored with ``codec``."""
    for tname, rec in sorted(_manifest(ctx, name).tensors.items()):
        if rec.codec == codec:
            return tname, rec.object
    raise AssertionError(f"{name} has no {codec} tensor")


def _flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp output left"


# --------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("codec", ["sign1", "dense"])
def test_flipped_byte_is_detected(filled, tmp_path, codec):
    store, ctx, home = filled
    tname, oid = _object_of(ctx, DELTA, codec)
    path = ctx.objects.path_of(oid)
    if codec == "sign1":
        assert ctx.objects.encoding_of(oid) is Encoding.RAW
    _flip_byte(path, (HEADER_SIZE + path.stat().st_size) // 2)  # the middle of the payload

    report = store.verify()
    assert not report.ok
    assert {"corrupt-object"} == {p["kind"] for p in report.problems}
    assert [p["subject"] for p in report.problems] == [oid]

    result = CliRunner().invoke(cli, ["--home", str(home), "verify"])
    assert result.exit_code == 1
    assert f"corrupt-object: {oid}" in result.output

    out = tmp_path / "out"
    with pytest.raises(CorruptObjectError) as info:
        store.materialize(DELTA, out)
    assert oid in str(info.value)
    _no_leftovers(out)
    with pytest.raises(CorruptObjectError):
        store.load_model(DELTA)
    with pytest.raises(CorruptObjectError):
        ctx.objects.read(oid)


@pytest.mark.parametrize("where", ["middle", "last-byte", "appended"])
def test_damaged_zstd_object_is_detected(filled, where):
    store, ctx, home = filled
    oid = _manifest(ctx, DELTA).files["config.json"]
    assert ctx.objects.encoding_of(oid) is Encoding.ZSTD
    path = ctx.objects.path_of(oid)
    size = path.stat().st_size
    if where == "appended":
        os.chmod(path, 0o644)
        with open(path, "ab") as fh:
            fh.write(b"trailing junk")
    else:
        _flip_byte(path, (HEADER_SIZE + size) // 2 if where == "middle" else size - 1)
    report = store.verify()
    assert [(p["kind"], p["subject"]) for p in report.problems] == [("corrupt-object", oid)]
    with pytest.raises(CorruptObjectError):
        ctx.objects.read(oid)


def test_zstd_object_is_one_frame(filled):
    """Header byte 7 = 1 means one zstd frame of the content, nothing after it."""
    import zstandard

    _store, ctx, _home = filled
    oid = _manifest(ctx, DELTA).files["config.json"]
    payload = ctx.objects.path_of(oid).read_bytes()[HEADER_SIZE:]
    dobj = zstandard.ZstdDecompressor().decompressobj()
    content = dobj.decompress(payload)
    assert dobj.unused_data == b""
    assert payload.count(b"\x28\xb5\x2f\xfd") == 1
    assert content == bytes(ctx.objects.read(oid))


def test_deleted_object_is_reported_missing(filled, tmp_path):
    store, ctx, home = filled
    _tname, oid = _object_of(ctx, DELTA, "sign1")
    ctx.objects.path_of(oid).unlink()
    report = store.verify()
    assert not report.ok
    kinds = {(p["kind"], p["subject"]) for p in report.problems}
    assert ("missing-object", oid) in kinds
    assert {k for k, _ in kinds} == {"missing-object"}
    result = CliRunner().invoke(cli, ["--home", str(home), "verify", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
    out = tmp_path / "out"
    with pytest.raises(CorruptObjectError) as info:
        store.materialize(DELTA, out)
    assert "missing" in str(info.value)
    _no_leftovers(out)


def test_clean_store_verifies(filled):
    store, _ctx, home = filled
    assert store.verify().ok
    result = CliRunner().invoke(cli, ["--home", str(home), "verify"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- write protocol
def test_objects_written_via_tmp_and_no_temp_left(store, home, model_dirs, monkeypatch):
    import deltahub.store.writer as writer_mod

    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst, *a, **k):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(writer_mod.os, "replace", spy)
    store.add(model_dirs["llama"]["base"], name=BASE)
    store.compress(model_dirs["llama"]["ft"], base=BASE, name=DELTA)
    assert renames, "no object was published by rename"
    objects = home / "objects"
    for src, dst in renames:
        assert src.parent == home / "tmp", src
        assert dst.parent.parent == objects and dst.name.startswith(dst.parent.name), dst
    assert not list((home / "tmp").iterdir())
    # every file under objects/ is read-only, and the published ones are all there
    on_disk = set(ObjectStore(home).iter_ids())
    assert {dst.name for _, dst in renames} <= on_disk
    for oid in on_disk:
        assert not os.stat(ObjectStore(home).path_of(oid)).st_mode & 0o222, oid


def test_object_header_layout(filled):
    _store, ctx, _home = filled
    for oid in ctx.objects.iter_ids():
        raw = ctx.objects.path_of(oid).read_bytes()
        magic, version, encoding, size = struct.unpack("<6sBBQ", raw[:16])
        assert magic == MAGIC == b"DHOBJ\0"
        assert version == OBJECT_FORMAT_VERSION == 1
        assert encoding in (0, 1)
        content = ctx.objects.read(oid)
        assert len(content) == size
        if encoding == 0:
            assert raw[16:] == content


def test_unknown_object_version_refused(filled, tmp_path):
    store, ctx, _home = filled
    _tname, oid = _object_of(ctx, DELTA, "sign1")
    path = ctx.objects.path_of(oid)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[6] = 7
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormatError) as info:
        ctx.objects.read(oid)
    assert "version 7" in str(info.value) and "upgrade" in str(info.value)
    with pytest.raises(UnsupportedFormatError):
        store.materialize(DELTA, tmp_path / "out")
    _no_leftovers(tmp_path / "out")
    data[6] = 1
    data[7] = 9  # unknown encoding
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormatError) as info:
        ctx.objects.read(oid)
    assert "encoding 9" in str(info.value)
    data[7] = 0
    data[:6] = b"NOTOBJ"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError):
        ctx.objects.read(oid)


def test_future_manifest_version_refused(filled, tmp_path):
    store, ctx, _home = filled
    manifest = _manifest(ctx, DELTA)
    manifest.format_version = 99
    info = ctx.put(manifest.to_bytes())
    ctx.register(manifest, info, {}, [], "future", force=False)
    for call in (
        lambda: store.show("future"),
        lambda: store.materialize("future", tmp_path / "out"),
        lambda: store.load_model("future"),
    ):
        with pytest.raises(UnsupportedFormatError) as err:
            call()
        assert "version 99" in str(err.value) and "upgrade deltahub" in str(err.value)
    _no_leftovers(tmp_path / "out")
    # the original still works, and verify reports (not repairs) the unreadable manifest
    assert store.show(DELTA)["kind"] == "delta"
    report = store.verify()
    assert [(p["kind"], p["subject"]) for p in report.problems] == [("bad-manifest", info.sha256)]
    assert "99" in report.problems[0]["detail"]


def test_manifest_with_unknown_codec_refused():
    m = Manifest(kind=ModelKind.BASE, model_type="llama", architectures=[], dtype="float32")
    obj = m.to_json()
    obj["tensors"] = {"w": {"codec": "sign7", "codec_version": 1, "dtype": "float32", "shape": [2]}}
    with pytest.raises(UnsupportedFormatError) as info:
        parse_manifest(json.dumps(obj).encode())
    assert "sign7" in str(info.value)


# ---------------------------------------------------------------------------------- escaping
@pytest.mark.parametrize(
    "bad",
    ["../../etc/passwd", "..", "", "/etc/passwd", "g" * 64, "A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61],
)
def test_path_of_refuses_bad_ids(tmp_path, bad):
    objects = ObjectStore(tmp_path / "s")
    with pytest.raises(CorruptObjectError) as info:
        objects.path_of(bad)
    assert "invalid object id" in str(info.value)


def test_path_of_stays_inside(tmp_path):
    objects = ObjectStore(tmp_path / "s")
    oid = "ab" + "0" * 62
    path = objects.path_of(oid)
    assert path == tmp_path / "s" / "objects" / "ab" / oid


def test_join_inside(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    assert join_inside(root, "tokenizer.json") == root / "tokenizer.json"
    assert join_inside(root, "sub/file.txt") == root / "sub" / "file.txt"
    for bad in ["../evil", "a/../../evil", "/etc/passwd", "", ".", "a//b", "a\\b", ".hidden"]:
        with pytest.raises(InvalidNameError):
            join_inside(root, bad)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidNameError) as info:
        join_inside(root, "link/evil.txt")
    assert "leave" in str(info.value)
    (outside / "target.json").write_text("{}")
    (root / "config.json").symlink_to(outside / "target.json")
    with pytest.raises(InvalidNameError) as info:
        join_inside(root, "config.json")
    assert "symbolic link" in str(info.value)
    assert (outside / "target.json").read_text() == "{}"
    assert sorted(p.name for p in outside.iterdir()) == ["target.json"]


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "a/../../evil", "..", ".git/config"])
def test_manifest_with_escaping_file_name_rejected(bad):
    m = Manifest(kind=ModelKind.BASE, model_type="llama", architectures=[], dtype="float32")
    obj = m.to_json()
    obj["files"] = {bad: "a" * 64}
    with pytest.raises((InvalidNameError, CorruptObjectError)) as info:
        parse_manifest(json.dumps(obj).encode())
    assert repr(bad) in str(info.value)


def test_manifest_with_bad_object_id_rejected():
    m = Manifest(kind=ModelKind.BASE, model_type="llama", architectures=[], dtype="float32")
    obj = m.to_json()
    obj["files"] = {"config.json": "../../etc/passwd"}
    with pytest.raises(CorruptObjectError):
        parse_manifest(json.dumps(obj).encode())


def test_materialize_refuses_manifest_file_escaping(filled, tmp_path):
    """A (hand-crafted) manifest naming ../evil can never be stored or materialized."""
    store, ctx, _home = filled
    manifest = _manifest(ctx, DELTA)
    manifest.files["../evil"] = manifest.files["config.json"]
    info = ctx.put(manifest.to_bytes())
    with pytest.raises(InvalidNameError):
        ctx.load_manifest(info.sha256)
    assert not (tmp_path / "evil").exists()


# ------------------------------------------------------------------------- encodings and mmap
def test_encodings(filled):
    _store, ctx, _home = filled
    base = _manifest(ctx, BASE)
    delta = _manifest(ctx, DELTA)
    for man in (base, delta):
        for rel in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert ctx.objects.encoding_of(man.files[rel]) is Encoding.ZSTD, rel
    sign1 = [rec.object for rec in delta.tensors.values() if rec.codec == "sign1"]
    assert sign1
    for oid in sign1:
        assert ctx.objects.encoding_of(oid) is Encoding.RAW
    for rec in base.tensors.values():
        assert ctx.objects.encoding_of(rec.object) is Encoding.RAW
    # manifests compress
    assert ctx.objects.encoding_of(ctx.resolve(DELTA).manifest_id) is Encoding.ZSTD
    # index rows agree with the headers
    import sqlite3

    con = sqlite3.connect(ctx.home / "index.sqlite")
    try:
        rows = dict(con.execute("select sha256, encoding from objects"))
    finally:
        con.close()
    for oid, enc in rows.items():
        assert enc == ("zstd" if ctx.objects.encoding_of(oid) is Encoding.ZSTD else "raw"), oid


def test_mmap_raw_base_tensor(filled):
    _store, ctx, _home = filled
    rec = _manifest(ctx, BASE).tensors["model.layers.0.self_attn.q_proj.weight"]
    mm, offset = ctx.objects.mmap_raw(rec.object)
    try:
        assert offset == HEADER_SIZE and offset % 16 == 0
        nbytes = 4 * rec.numel
        assert len(mm) == offset + nbytes
        mapped = torch.frombuffer(bytearray(mm[offset : offset + nbytes]), dtype=torch.float32).reshape(rec.shape)
    finally:
        mm.close()
    assert torch.equal(mapped, ctx.read_tensor(rec.object, rec.dtype, rec.shape))
    # a zstd object cannot be mapped
    from deltahub.errors import StoreError

    with pytest.raises(StoreError):
        ctx.objects.mmap_raw(_manifest(ctx, BASE).files["config.json"])


# ------------------------------------------------------------------------------ crash safety
CRASH_SCRIPT = """
import os, sys
import deltahub
from deltahub.ops.context import StoreContext

def crash(*args, **kwargs):
    os._exit(3)  # a hard crash: no exception handlers, no clean-up

setattr(StoreContext, sys.argv[1], crash)
deltahub.Store(sys.argv[2]).compress(sys.argv[3], base=sys.argv[4], name=sys.argv[5])
"""


def _check_garbage_then_gc(home: Path, before: dict, rows_unchanged: bool) -> None:
    """The store verifies with only unreferenced objects; gc --dry-run lists them, gc removes them."""
    with deltahub.Store(home) as store:
        assert [r["name"] for r in store.list()] == [BASE]
        report = store.verify()
        assert report.ok, report.problems
        leftover = snapshot_store(home)
        new_files = set(leftover["files"]) - set(before["files"])
        assert new_files, "the interrupted compress wrote no objects?"
        if rows_unchanged:
            assert leftover["rows"] == before["rows"]
            assert store.du()["unreferenced_objects"] == len(new_files)

        result = CliRunner().invoke(cli, ["--home", str(home), "gc", "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        listed = json.loads(result.stdout)
        assert listed["dry_run"] is True
        assert {f"objects/{oid[:2]}/{oid}" for oid in listed["objects"]} == new_files
        assert snapshot_store(home)["files"] == leftover["files"]  # the dry run deleted nothing

        assert len(store.gc().objects) == len(new_files)
        after = snapshot_store(home)
        assert after["files"] == before["files"]
        assert after["rows"] == before["rows"]
        assert store.verify().ok
        assert not list((home / "tmp").iterdir())


CRASH_SCRIPT = """
import os, sys
import deltahub
from deltahub.ops.context import StoreContext

def crash(self, *args, **kwargs):
    self.objects.flush()  # the batch's objects are durable and in place...
    os._exit(3)  # ...then a hard crash: no exception handlers, no clean-up

StoreContext.register = crash
deltahub.Store(sys.argv[1]).compress(sys.argv[2], base=sys.argv[3], name=sys.argv[4])
"""

CRASH_IN_BATCH_SCRIPT = """
import os, sys
import deltahub
from deltahub.store.objects import ObjectStore

def crash(self):
    if self._pending:
        os._exit(3)  # killed with a batch written to tmp/ but not yet published

ObjectStore.flush = crash
deltahub.Store(sys.argv[1]).compress(sys.argv[2], base=sys.argv[3], name=sys.argv[4])
"""


def test_crash_inside_a_batch_publishes_nothing_and_gc_removes_its_temp_files(tmp_path, model_dirs):
    import subprocess
    import sys

    home = tmp_path / "store"
    with deltahub.Store(home) as s:
        s.add(model_dirs["llama"]["base"], name=BASE)
    before = snapshot_store(home)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_IN_BATCH_SCRIPT, str(home), str(model_dirs["llama"]["ft"]), BASE, DELTA],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert snapshot_store(home) == before  # no object, no row
    assert list((home / "tmp").iterdir())  # only temporary files
    with deltahub.Store(home) as store:
        assert store.verify().ok
        store.gc()
        assert not list((home / "tmp").iterdir())
        assert snapshot_store(home) == before


def test_crash_before_register_leaves_only_garbage(tmp_path, model_dirs):
    """A process killed after writing its objects, before indexing them (a real crash)."""
    import subprocess
    import sys

    home = tmp_path / "store"
    with deltahub.Store(home) as s:
        s.add(model_dirs["llama"]["base"], name=BASE)
    before = snapshot_store(home)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(home), str(model_dirs["llama"]["ft"]), BASE, DELTA],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    _check_garbage_then_gc(home, before, rows_unchanged=True)
    with deltahub.Store(home) as store:  # still usable
        store.compress(model_dirs["llama"]["ft"], base=BASE, name=DELTA)
        assert store.verify().ok


def test_stop_before_name_leaves_only_garbage(store, home, model_dirs, monkeypatch):
    """Objects and index rows written, the name never set (as if killed just before it)."""
    store.add(model_dirs["llama"]["base"], name=BASE)
    before = snapshot_store(home)
    monkeypatch.setattr(StoreContext, "set_name", lambda *a, **k: None)
    store.compress(model_dirs["llama"]["ft"], base=BASE, name=DELTA)
    monkeypatch.undo()
    rows = snapshot_store(home)["rows"]
    assert len(rows["manifests"]) == len(before["rows"]["manifests"]) + 1
    _check_garbage_then_gc(home, before, rows_unchanged=False)


@pytest.mark.parametrize("fail_in", ["register", "set_name"])
def test_failed_publish_leaves_store_unchanged(filled, model_dirs, monkeypatch, fail_in):
    """An exception (not a crash) while publishing: the writer removes what it wrote."""
    store, ctx, home = filled
    store.rm(DELTA)
    store.gc()
    before = snapshot_store(home)

    def fail(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(StoreContext, fail_in, fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        store.compress(model_dirs["llama"]["ft"], base=BASE, name=DELTA)
    monkeypatch.undo()
    after = snapshot_store(home)
    assert set(after["files"]) == set(before["files"])
    assert after == before
    assert store.verify().ok


def test_gc_removes_stale_temp_files_only(filled):
    store, ctx, home = filled
    dead = home / "tmp" / "obj-999999999-abc.tmp"  # pid that cannot exist
    dead.write_bytes(b"partial")
    mine = home / "tmp" / f"obj-{os.getpid()}-abc.tmp"
    mine.write_bytes(b"in progress")
    before = set(ctx.objects.iter_ids())
    report = store.gc()
    assert report.temp_files == [dead.name]
    assert not dead.exists() and mine.exists()
    assert set(ctx.objects.iter_ids()) == before
    mine.unlink()
    assert store.verify().ok
