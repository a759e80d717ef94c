"""Hostile inputs (issue 9, parts 5 and 6), the named cases.

Each case is refused with a one-line deltahub error (the CLI prints ``Error: ...`` on one line and
exits with the code of the error table, no traceback), and the store is left byte for byte as it
was (:func:`conftest.snapshot_store`). The property-based cases are in ``test_hostile_properties.py``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import BASE, assert_store_unchanged, copy_checkpoint, rewrite_safetensors, fine_tune_like, make_model, save_checkpoint, snapshot_store
from fault_report import record
from safetensors.torch import load_file

import deltahub
from deltahub.cli import cli, exit_code_for
from deltahub.errors import (
    CodecError,
    CorruptObjectError,
    DeltaHubError,
    InputError,
    InvalidNameError,
    MalformedSafetensorsError,
)
from deltahub.formats.manifest import parse_manifest
from deltahub.formats.safetensors_io import SafetensorsReader

SECRET = (
    b"-----BEGIN OPENSSH PRIVATE KEY-----\n"
    b"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    b"-----END OPENSSH PRIVATE KEY-----\n"
)
DEEP = 5000  # far past Python's recursion limit (~1000): json.loads would raise RecursionError


def deep_json(depth: int = DEEP) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


# ---------------------------------------------------------------------------------------- fixtures
#: Hostile inputs given to deltahub by this module (API and CLI calls), and how many were refused.
TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures():
    yield
    record("hostile/named-cases", **TALLY)





def _cli_refuses(home: Path, args: list[str], error: type[DeltaHubError], *words: str) -> str:
    """Run the CLI; it must print one ``Error:`` line and exit with ``error``'s code."""
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    TALLY["cli_tried"] += 1
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == exit_code_for(error("x")), (args, result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    TALLY["cli_refused_one_line"] += 1
    return lines[0]



def _st_file(path: Path, header: bytes, data: bytes = b"", declared: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)
    return path


def _both_refuse(store, src: Path, error: type[DeltaHubError], *words: str) -> None:
    for call in (lambda: store.add(src, name="x"), lambda: store.compress(src, base=BASE, name="x")):
        TALLY["api_tried"] += 1
        with pytest.raises(error) as info:
            call()
        for w in words:
            assert w in str(info.value), (w, str(info.value))
        TALLY["api_refused"] += 1


# ---------------------------------------------------------------------------------------- symlinks
@pytest.mark.parametrize("target", ["tokenizer.json", "merges.txt", "config.json", "model.safetensors"])
def test_symlink_leaving_the_folder_is_refused(based, model_dirs, tmp_path, target):
    """A file linked out of the checkpoint folder (e.g. to ~/.ssh/id_rsa) is never stored or pushed."""
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    elsewhere = tmp_path / "user-home" / ".ssh"
    elsewhere.mkdir(parents=True)
    if target in ("tokenizer.json", "merges.txt"):
        outside = elsewhere / "id_rsa"
        outside.write_bytes(SECRET)
    else:  # the real file, moved out: still refused (a link out may point anywhere)
        outside = elsewhere / target
        shutil.move(src / target, outside)
    (src / target).unlink(missing_ok=True)
    os.symlink(outside, src / target)
    _both_refuse(store, src, InputError, target, "symbolic link", "copy")
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["compress", str(src), "--base", BASE, "--name", "x"], InputError, target)
    assert_store_unchanged(home, snap)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
@pytest.mark.parametrize("target", ["tokenizer.json", "config.json", "model.safetensors"])
def test_looping_or_dangling_symlink_is_a_one_line_error(based, model_dirs, tmp_path, target, kind):
    """`ln -s tokenizer.json tokenizer.json` made resolve() raise RuntimeError: a traceback."""
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    (src / target).unlink()
    os.symlink(target if kind == "loop" else "gone", src / target)
    _both_refuse(store, src, InputError, target, "cannot be read")
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(src), "--name", "x"], InputError, target)
    assert_store_unchanged(home, snap)


def test_symlinked_shard_index_and_directory_are_refused(based, tmp_path):
    store, home, snap = based
    model = make_model("llama")
    fine_tune_like(model)
    sharded = save_checkpoint(model, tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    cases = 0
    for what in ("shard", "index", "directory"):
        src = copy_checkpoint(sharded, tmp_path / what)
        away = tmp_path / f"away-{what}"
        away.mkdir()
        if what == "shard":
            name = shards[-1]
            shutil.move(src / name, away / name)
            os.symlink(away / name, src / name)
        elif what == "index":
            name = "model.safetensors.index.json"
            shutil.move(src / name, away / name)
            os.symlink(away / name, src / name)
        else:  # a linked sub-folder, and a relative link through it
            name = "tokenizer.json"
            shutil.move(src / name, away / name)
            os.symlink(away, src / "shared")
            os.symlink("shared/tokenizer.json", src / name)
        _both_refuse(store, src, InputError, name, "copy")
        cases += 1
    assert_store_unchanged(home, snap)
    assert cases == 3


def test_links_inside_the_folder_and_a_linked_folder_are_fine(store, model_dirs, tmp_path):
    src = copy_checkpoint(model_dirs["llama"]["base"], tmp_path / "real")
    (src / "sub").mkdir()
    shutil.move(src / "tokenizer.json", src / "sub" / "tokenizer.json")
    os.symlink("sub/tokenizer.json", src / "tokenizer.json")
    os.symlink(src, tmp_path / "link-to-folder")
    a = store.add(tmp_path / "link-to-folder", name="a")
    b = store.add(model_dirs["llama"]["base"], name="b")
    assert a.manifest_id == b.manifest_id


def _fake_hf_cache(monkeypatch, root: Path) -> Path:
    from huggingface_hub import constants

    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _snapshot(cache: Path, repo: str, src: Path) -> Path:
    """``src`` laid out as the HF cache does: files in blobs/, snapshot links ../../blobs/<hash>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("a" * 40)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def test_hf_cache_snapshot_links_keep_working(store, model_dirs, tmp_path, monkeypatch):
    cache = _fake_hf_cache(monkeypatch, tmp_path)
    snap = _snapshot(cache, "org/base", model_dirs["llama"]["base"])
    result = store.add(snap, name=BASE)
    assert result.referenced_bytes > 0  # weights left in the cache, referenced
    store.compress(_snapshot(cache, "org/ft", model_dirs["llama"]["ft"]), base=BASE, name="ft")
    assert store.verify().ok

    # ... but a snapshot file linking into ANOTHER cache repo, or out of the cache, is refused
    before = snapshot_store(store.home)
    evil_blob = cache / "models--evil--keys" / "blobs" / "0123"
    evil_blob.parent.mkdir(parents=True)
    evil_blob.write_bytes(SECRET)
    for i, target in enumerate([evil_blob, tmp_path / "id_rsa"]):
        (tmp_path / "id_rsa").write_bytes(SECRET)
        snap2 = _snapshot(cache, f"org/ft{i}", model_dirs["llama"]["ft"])
        (snap2 / "tokenizer.json").unlink()
        os.symlink(target, snap2 / "tokenizer.json")
        with pytest.raises(InputError, match="tokenizer.json"):
            store.compress(snap2, base=BASE, name="ft2")
    assert snapshot_store(store.home) == before


# ---------------------------------------------------------------------------------- carried files
CARRIED_BAD = {
    "tokenizer.json": (SECRET, "not JSON"),
    "tokenizer_config.json": (b"[1, 2, 3]", "JSON object"),
    "special_tokens_map.json": (deep_json(), "levels deep"),
    "generation_config.json": (b'{"max_length": 20,', "not JSON"),
    "merges.txt": (b"#version: 0.2\n\xff\xfe\x00 binary", "UTF-8"),
    "chat_template.jinja": (b"{{ bos_token }}\x80\x81", "UTF-8"),
    "tokenizer.model": (SECRET, "tokenizer model"),
    "vocab.json": (b"", "empty"),
}


@pytest.mark.parametrize("fname", sorted(CARRIED_BAD))
def test_carried_files_are_checked_for_their_kind(based, model_dirs, tmp_path, fname):
    store, home, snap = based
    data, words = CARRIED_BAD[fname]
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    (src / fname).write_bytes(data)
    _both_refuse(store, src, InputError, fname, words)
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(src), "--name", "x"], InputError, fname)


def test_carried_file_size_is_capped(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    with open(src / "tokenizer.json", "r+b") as fh:  # sparse: costs no disk
        fh.truncate(3 << 30)
    _both_refuse(store, src, InputError, "tokenizer.json", "too large")
    assert_store_unchanged(home, snap)


def test_a_real_sentencepiece_model_is_carried(based, model_dirs, tmp_path):
    """tokenizer.model files are protobufs (or tiktoken rank files): both kinds are accepted."""
    store, home, _snap = based
    # A minimal ModelProto: two pieces (field 1, each {piece: str, score: float}) and a trainer spec.
    def piece(text: bytes) -> bytes:
        body = b"\x0a" + bytes([len(text)]) + text + b"\x15" + struct.pack("<f", -1.0)
        return b"\x0a" + bytes([len(body)]) + body

    spm = piece(b"<unk>") + piece(b"\xe2\x96\x81the") + b"\x12\x02\x08\x01"
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "spm")
    (src / "tokenizer.model").write_bytes(spm)
    store.compress(src, base=BASE, name="spm")
    tik = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "tik")
    (tik / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nIw== 2\n")
    store.compress(tik, base=BASE, name="tik")
    out = store.materialize("spm", tmp_path / "out")
    assert (out.out_dir / "tokenizer.model").read_bytes() == spm


# ------------------------------------------------------------------------------------ JSON depth
def test_deep_config_json(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    cfg = (src / "config.json").read_bytes().rstrip()
    (src / "config.json").write_bytes(cfg[:-1] + b', "x": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    _both_refuse(store, src, InputError, "config.json", "levels deep")
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(src), "--name", "x"], InputError, "config.json")


@pytest.mark.parametrize("field,value", [("model_type", 5), ("architectures", [1, 2]), ("architectures", "Llama")])
def test_config_fields_that_go_into_the_manifest_are_checked(based, model_dirs, tmp_path, field, value):
    """Else the store would hold a manifest that its own reader refuses."""
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _both_refuse(store, src, InputError, "config.json", field)
    assert_store_unchanged(home, snap)


def test_deep_safetensors_header(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"[" * DEEP + b"]" * DEEP + b"}}"
    _st_file(src / "model.safetensors", header, b"\0" * 4)
    _both_refuse(store, src, MalformedSafetensorsError, "model.safetensors", "levels deep")
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(src), "--name", "x"], MalformedSafetensorsError, "model.safetensors")


def test_deep_safetensors_index(based, tmp_path):
    store, home, snap = based
    model = make_model("llama")
    src = save_checkpoint(model, tmp_path / "sharded", max_shard_size="100KB")
    (src / "model.safetensors.index.json").write_bytes(deep_json())
    _both_refuse(store, src, InputError, "model.safetensors.index.json")
    assert_store_unchanged(home, snap)


def test_deep_calibration_jsonl(tmp_path):
    from deltahub.calibrate.data import read_documents

    path = tmp_path / "calib.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + deep_json() + b"\n")
    with pytest.raises(InputError, match="line 2"):
        read_documents(path, tokenizer=None)


def test_deep_manifest_object_and_reference_payload(based):
    from deltahub.store.objects import HEADER, MAGIC, OBJECT_FORMAT_VERSION, Encoding

    store, home, snap = based
    with pytest.raises(CorruptObjectError):
        parse_manifest(deep_json())
    # a reference object whose (small) JSON payload nests 2,000 levels
    payload = b"[" * 2000 + b"]" * 2000
    oid = "f" * 64
    path = store._ctx.objects.path_of(oid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HEADER.pack(MAGIC, OBJECT_FORMAT_VERSION, int(Encoding.REF), 10) + payload)
    try:
        with pytest.raises(CorruptObjectError, match="reference"):
            store._ctx.objects.external_ref(oid)
        with pytest.raises(CorruptObjectError):
            store._ctx.objects.read(oid)
    finally:
        path.unlink()
    assert_store_unchanged(home, snap)


def test_nan_and_duplicates_in_a_manifest_object(based):
    store, _home, _snap = based
    ctx = store._ctx
    raw = bytes(ctx.objects.read(ctx.resolve(BASE).manifest_id))
    assert parse_manifest(raw).kind.value == "base"
    for bad in (
        raw.replace(b'"format_version":1', b'"format_version":1,"format_version":1'),
        raw.replace(b'"kind":"base"', b'"kind":"base","x":NaN'),
        raw.replace(b'"kind":"base"', b'"kind":"base","x":1e999'),
    ):
        assert bad != raw
        with pytest.raises(CorruptObjectError):
            parse_manifest(bad)


# ----------------------------------------------------------------------- safetensors reader parity
T4 = b'"dtype":"F32","shape":[1]'


def _header(*entries: bytes, extra: bytes = b"") -> bytes:
    return b"{" + b",".join(entries) + extra + b"}"


PARITY = {
    # name: (header, data) -- every one is refused by the safetensors library (checked below)
    "duplicate-key": (_header(b'"a":{' + T4 + b',"data_offsets":[0,4]}', b'"b":{' + T4 + b',"data_offsets":[4,8]}',
                              b'"a":{' + T4 + b',"data_offsets":[8,12]}'), b"\0" * 12),
    "gap": (_header(b'"a":{' + T4 + b',"data_offsets":[0,4]}', b'"b":{' + T4 + b',"data_offsets":[8,12]}'), b"\0" * 12),
    "trailing-bytes-no-tensors": (b'{"__metadata__":{"format":"pt"}}', b"\0" * 8),
    "bool-in-shape": (b'{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4),
    "negative-zero-offset": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', b"\0" * 4),
    "nan-literal": (b'{"a":{' + T4 + b',"data_offsets":[0,4],"x":NaN}}', b"\0" * 4),
    "float-overflow": (b'{"a":{' + T4 + b',"data_offsets":[0,4],"x":1e999}}', b"\0" * 4),
    "lone-surrogate": (b'{"\\ud800":{' + T4 + b',"data_offsets":[0,4]}}', b"\0" * 4),
    "dtype-not-a-string": (b'{"a":{"dtype":[],"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "shape-overflows-u64": (b'{"a":{"dtype":"F32","shape":[9223372036854775808,4,0],"data_offsets":[0,0]}}', b""),
    "dim-past-int64": (b'{"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}', b""),
}


def _library_refuses(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    assert path.is_file()
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            for k in keys:
                try:
                    f.get_tensor(k)
                except (TypeError, ValueError, RuntimeError, OverflowError):
                    return True  # a header it parsed, with a shape torch cannot hold (dim past int64)
    except SafetensorError:  # the library's own refusal, not an unrelated failure
        return True
    return False


@pytest.mark.parametrize("case", sorted(PARITY))
def test_reader_refuses_what_the_safetensors_library_refuses(tmp_path, case):
    header, data = PARITY[case]
    path = _st_file(tmp_path / "model.safetensors", header, data)
    assert _library_refuses(path), case
    with pytest.raises(MalformedSafetensorsError) as info:
        SafetensorsReader(path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_header_size_limit_matches_the_library(tmp_path):
    path = _st_file(tmp_path / "big.safetensors", b"{}" + b" " * (100_000_001 - 2))
    assert _library_refuses(path)
    with pytest.raises(MalformedSafetensorsError, match="header length"):
        SafetensorsReader(path)


def test_gap_and_duplicate_refused_by_add_and_compress(based, model_dirs, tmp_path):
    store, home, snap = based
    for case in ("gap", "duplicate-key"):
        src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / case)
        header, data = PARITY[case]
        _st_file(src / "model.safetensors", header, data)
        _both_refuse(store, src, MalformedSafetensorsError, "model.safetensors")
    assert_store_unchanged(home, snap)


# --------------------------------------------------------------------------------- tensor names
def _with_extra_tensor(path: Path, name: str) -> None:
    """Append a 4-byte tensor called ``name`` to the safetensors file at ``path``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    size = len(raw) - 8 - n
    header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [size, size + 4]}
    _st_file(path, json.dumps(header).encode(), raw[8 + n :] + b"\0" * 4)


@pytest.mark.parametrize("bad", ["../../evil", "", "a" * 600, "model.layers.0.\nweight", "__metadata__", "a..b", "/abs"])
def test_checkpoint_tensor_names_are_checked(based, model_dirs, tmp_path, bad):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    _with_extra_tensor(src / "model.safetensors", bad)
    for call in (lambda: store.add(src, name="x"), lambda: store.compress(src, base=BASE, name="x")):
        with pytest.raises(InputError) as info:  # MalformedSafetensorsError for __metadata__
            call()
        assert "tensor name" in str(info.value) or "__metadata__" in str(info.value)
    assert_store_unchanged(home, snap)


@pytest.mark.parametrize("bad", ["../../evil", "", "x" * 600, "a\x00b", "a b", "__metadata__"])
def test_manifest_tensor_names_are_checked(based, bad):
    """Pulled manifests (strict_names) follow today's rule for new input."""
    store, _home, _snap = based
    ctx = store._ctx
    obj = json.loads(bytes(ctx.objects.read(ctx.resolve(BASE).manifest_id)))
    name, spec = next(iter(obj["tensors"].items()))
    obj["tensors"][bad] = obj["tensors"].pop(name)
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(CorruptObjectError, match="tensor name"):
        parse_manifest(raw, strict_names=True)


@pytest.mark.parametrize("odd", ["../../evil", "x" * 600, "a b", "encoder/layer:0.kernel", "ü.weight"])
def test_stored_manifests_with_names_older_versions_accepted_keep_reading(based, odd):
    """Earlier versions stored any safetensors key: such manifests stay readable (old stores keep
    reading); only what no safetensors file can hold is refused."""
    store, _home, _snap = based
    ctx = store._ctx
    obj = json.loads(bytes(ctx.objects.read(ctx.resolve(BASE).manifest_id)))
    name, spec = next(iter(obj["tensors"].items()))
    obj["tensors"][odd] = obj["tensors"].pop(name)
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert odd in parse_manifest(raw).tensors
    key = odd
    for harmful in ("", "a\x00b", "__metadata__"):
        obj["tensors"][harmful] = obj["tensors"].pop(key)
        key = harmful
        raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(CorruptObjectError, match="tensor name"):
            parse_manifest(raw)


# ------------------------------------------------------------------------------- names and --name
@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_name_is_refused_not_replaced(based, model_dirs, bad):
    store, home, snap = based
    with pytest.raises(InvalidNameError, match="invalid model name"):
        store.add(model_dirs["llama"]["base"], name=bad)
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(model_dirs["llama"]["base"]), "--name", bad], InvalidNameError, "invalid model name")
    assert_store_unchanged(home, snap)
    assert [m["name"] for m in store.list()] == [BASE]


# ----------------------------------------------------------------------------------- non-finite
def _poison(src: Path, tensor: str, value: float, index=(0,)) -> None:
    def mutate(sd):
        sd[tensor][index] = value

    rewrite_safetensors(src / "model.safetensors", mutate)


NONFINITE = [
    ("model.layers.0.input_layernorm.weight", float("nan"), (3,)),  # 1-D, dense
    ("model.norm.weight", float("inf"), (0,)),  # 1-D, the last tensor: refused after others were written
    ("model.layers.1.self_attn.q_proj.weight", float("-inf"), (2, 3)),  # 2-D, sign1
    ("model.embed_tokens.weight", float("nan"), (5, 1)),  # embeddings
]


@pytest.mark.parametrize("tensor,value,index", NONFINITE)
def test_nonfinite_fine_tune_is_refused_with_one_rule(based, model_dirs, tmp_path, tensor, value, index):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    _poison(src, tensor, value, index)
    for embeddings in ("sign1", "dense"):
        with pytest.raises(CodecError) as info:
            store.compress(src, base=BASE, name="x", embeddings=embeddings)
        assert tensor in str(info.value) and "--allow-nonfinite" in str(info.value)
        assert_store_unchanged(home, snap)
    _cli_refuses(home, ["compress", str(src), "--base", BASE, "--name", "x"], CodecError, tensor)
    assert_store_unchanged(home, snap)


def test_nonfinite_base_is_refused(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["base"], tmp_path / "b")
    _poison(src, "model.norm.weight", float("nan"))
    with pytest.raises(CodecError, match="model.norm.weight"):
        store.add(src, name="nanbase")
    assert_store_unchanged(home, snap)
    _cli_refuses(home, ["add", str(src), "--name", "nanbase"], CodecError, "model.norm.weight", "--allow-nonfinite")
    assert_store_unchanged(home, snap)


def test_allow_nonfinite_keeps_the_values(based, model_dirs, tmp_path):
    store, home, _snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    for tensor, value, index in NONFINITE:
        _poison(src, tensor, value, index)
    result = store.compress(src, base=BASE, name="nf", allow_nonfinite=True)
    codecs = {t["name"]: t["codec"] for t in store.show("nf", tensors=True)["tensors"]}
    # the sign1 matrix with -Inf is stored dense (a sign of a non-finite delta means nothing)
    assert codecs["model.layers.1.self_attn.q_proj.weight"] == "dense"
    assert codecs["model.layers.0.self_attn.q_proj.weight"] == "sign1"
    assert result.codecs["sign1"] > 0
    out = store.materialize("nf", tmp_path / "out")
    got = load_file(out.out_dir / "model.safetensors")
    ft = load_file(src / "model.safetensors")
    for tensor, _value, _index in NONFINITE:
        assert torch.equal(got[tensor].view(torch.int32), ft[tensor].view(torch.int32)), tensor
    assert store.verify().ok
    # the CLI flag, on add and compress
    res = CliRunner().invoke(cli, ["--home", str(home), "add", str(src), "--name", "nfbase", "--allow-nonfinite"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        cli, ["--home", str(home), "compress", str(src), "--base", BASE, "--name", "nf2", "--allow-nonfinite"]
    )
    assert res.exit_code == 0, res.output
    assert store.show("nf2")["manifest_id"] == store.show("nf")["manifest_id"]


def test_nonfinite_delta_against_a_nonfinite_base(based, model_dirs, tmp_path):
    """A finite fine-tune of a base added with NaN: the delta is non-finite, refused unless allowed."""
    store, home, _snap = based
    b = copy_checkpoint(model_dirs["llama"]["base"], tmp_path / "b")
    _poison(b, "model.layers.0.mlp.up_proj.weight", float("nan"), (0, 0))
    store.add(b, name="nanbase", allow_nonfinite=True)
    snap = snapshot_store(home)
    with pytest.raises(CodecError, match="model.layers.0.mlp.up_proj.weight.*--allow-nonfinite"):
        store.compress(model_dirs["llama"]["ft"], base="nanbase", name="x")
    assert_store_unchanged(home, snap)
    store.compress(model_dirs["llama"]["ft"], base="nanbase", name="x", allow_nonfinite=True)
    codecs = {t["name"]: t["codec"] for t in store.show("x", tensors=True)["tensors"]}
    assert codecs["model.layers.0.mlp.up_proj.weight"] == "dense"


# ------------------------------------------------------------------------------------- the Hub
huggingface_hub = pytest.importorskip("huggingface_hub")
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: E402,F401

REPO = f"{FAKE_USER}/tiny-delta"
BASE_REPO = "someone/tiny-base"
BASE_REV = "b" * 40
RENAMED = "model.layers.0.input_layernorm.weight"  # a dense tensor: not pinned to a base hash


@pytest.fixture
def pushed(tmp_path, model_dirs, hub_server):
    a = deltahub.Store(tmp_path / "store_a")
    a.add(model_dirs["llama"]["base"], name="base")
    a.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    plant_repo(hub_server, BASE_REPO, BASE_REV)  # push checks that --base-repo exists
    a.push("ft", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")
    b = deltahub.Store(tmp_path / "store_b")
    b.add(model_dirs["llama"]["base"], name="base")
    yield a, b
    a.close()
    b.close()


def _hub_json() -> dict:
    return json.loads(Path(huggingface_hub.hf_hub_download(REPO, "deltahub.json")).read_bytes())


def _commit(files: dict[str, bytes]) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = [CommitOperationAdd(p, d) for p, d in files.items()]
    HfApi().create_commit(REPO, ops, commit_message="tamper")


def rehash(hub: dict) -> dict:
    """Recompute ``manifest`` as an attacker would, so that the tampered file is self-consistent
    (an independent copy of the rebuild rule of deltahub/hub/layout.py)."""
    tensors = {}
    for name, spec in hub["tensors"].items():
        spec = dict(spec)
        if "sha256" in spec:
            for k in ("file", "key", "stored_dtype", "stored_shape"):
                spec.pop(k)
            spec["object"] = spec.pop("sha256")
        tensors[name] = spec
    store_obj = {
        "format": "deltahub.manifest", "format_version": 1, "kind": "delta", "model": hub["model"],
        "files": {k: v["sha256"] for k, v in hub["files"].items()}, "tensors": tensors,
        "base": hub["base"], "packing": hub["packing"],
    }
    canonical = json.dumps(store_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    hub["manifest"] = hashlib.sha256(canonical.encode()).hexdigest()
    return hub


def _pull_refused(store, home: Path, error=CorruptObjectError, *words: str) -> None:
    before = snapshot_store(home)
    TALLY["pulls_tried"] += 1
    with pytest.raises(error) as info:
        store.pull(REPO, name="pulled")
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert snapshot_store(home) == before
    TALLY["pulls_refused_store_unchanged"] += 1
    _cli_refuses(home, ["pull", REPO, "--name", "pulled"], error)
    assert snapshot_store(home) == before


@pytest.mark.parametrize("new_name", ["../../evil", "model.layers.0.evil.weight"])
def test_tampered_self_consistent_rename_is_refused(pushed, tmp_path, new_name):
    _a, b = pushed
    hub = _hub_json()
    hub["tensors"][new_name] = hub["tensors"].pop(RENAMED)
    _commit({"deltahub.json": json.dumps(rehash(hub), sort_keys=True, indent=2).encode()})
    _pull_refused(b, tmp_path / "store_b", CorruptObjectError, new_name if new_name.startswith("..") else RENAMED)


@pytest.mark.parametrize("scale", [b"NaN", b"Infinity", b"1e999"])
def test_nonfinite_scale_in_a_pulled_manifest(pushed, tmp_path, scale):
    _a, b = pushed
    hub = _hub_json()
    name = next(n for n, s in sorted(hub["tensors"].items()) if s["codec"] == "sign1")
    hub["tensors"][name]["scale"] = 12345.5
    raw = json.dumps(hub, sort_keys=True, indent=2).encode().replace(b"12345.5", scale)
    _commit({"deltahub.json": raw})
    _pull_refused(b, tmp_path / "store_b", CorruptObjectError, "deltahub.json")


def test_deep_deltahub_json_and_pulled_config(pushed, tmp_path):
    _a, b = pushed
    hub = _hub_json()
    _commit({"deltahub.json": deep_json()})
    _pull_refused(b, tmp_path / "store_b", CorruptObjectError, "deltahub.json")
    # a deep config.json whose hash the attacker wrote into a self-consistent deltahub.json
    config = deep_json()
    hub["files"]["config.json"]["sha256"] = hashlib.sha256(config).hexdigest()
    _commit({"deltahub.json": json.dumps(rehash(hub), sort_keys=True, indent=2).encode(), "config.json": config})
    _pull_refused(b, tmp_path / "store_b", CorruptObjectError, "config.json")


def test_pushed_delta_given_to_add_points_to_pull(pushed, tmp_path, hub_server):
    _a, b = pushed
    home = tmp_path / "store_b"
    before = snapshot_store(home)
    for call in (lambda: b.add(REPO, name="x"), lambda: b.compress(REPO, base="base", name="x")):
        with pytest.raises(InputError, match="deltahub pull") as info:
            call()
        assert "deltahub delta" in str(info.value)
    assert hub_server.count("GET", r"/resolve/.*\.safetensors$") == 0  # refused before any download
    folder = Path(huggingface_hub.snapshot_download(REPO))
    assert (folder / "deltahub.json").is_file()
    for call in (lambda: b.add(folder, name="x"), lambda: b.compress(folder, base="base", name="x")):
        with pytest.raises(InputError, match="deltahub pull"):
            call()
    assert snapshot_store(home) == before
    _cli_refuses(home, ["add", str(folder)], InputError, "deltahub pull")
    _cli_refuses(home, ["add", REPO], InputError, "deltahub pull")
    assert snapshot_store(home) == before


def test_empty_name_for_a_hub_add(pushed, tmp_path, model_dirs, hub_server):
    _a, b = pushed
    from huggingface_hub import HfApi

    HfApi().create_repo(f"{FAKE_USER}/plain-base", exist_ok=True)
    HfApi().upload_folder(repo_id=f"{FAKE_USER}/plain-base", folder_path=str(model_dirs["llama"]["base"]))
    before = snapshot_store(tmp_path / "store_b")
    with pytest.raises(InvalidNameError):
        b.add(f"{FAKE_USER}/plain-base", name="")
    assert snapshot_store(tmp_path / "store_b") == before


def test_a_store_path_with_query_characters_keeps_its_index_inside(tmp_path, model_dirs):
    """`--home 'st?x#1'` used to open the SQLite URL `sqlite:///…/st?x#1/index.sqlite`, whose `?`
    starts a query string: the index silently went to another file (`…/st`)."""
    home = tmp_path / "st?x#1%2"
    with deltahub.Store(home) as store:
        store.add(model_dirs["llama"]["base"], name="b")
        assert store.verify().ok
    assert (home / "index.sqlite").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [home.name]
    with deltahub.Store(home) as store:
        assert [m["name"] for m in store.list()] == ["b"]


def test_a_weight_file_that_is_a_folder_names_itself(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "ft")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").mkdir()
    _both_refuse(store, src, InputError, "model.safetensors", "Is a directory")
    assert_store_unchanged(home, snap)


@pytest.mark.parametrize("home_arg", ["", "   "])
def test_an_empty_home_is_refused_not_the_current_folder(tmp_path, monkeypatch, home_arg):
    """`--home ""` used to make the current folder a store (index, objects, a reserve)."""
    from deltahub.errors import StoreError

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--home", home_arg, "du"])
    assert result.exit_code == 2 and "--home" in result.stderr and "empty" in result.stderr
    with pytest.raises(StoreError, match="empty"):
        deltahub.Store(home_arg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["0", "0.0001B", "５GB", "-1", "abc", "5 XB"])
def test_shard_sizes_that_make_no_sense_are_refused(based, tmp_path, bad):
    store, home, snap = based
    result = CliRunner().invoke(cli, ["--home", str(home), "materialize", BASE, str(tmp_path / "out"), "--max-shard-size", bad])
    assert result.exit_code == 2 and "--max-shard-size" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_shard_sizes_in_terabytes_are_understood():
    from deltahub.formats.hf_writer import parse_size

    assert parse_size("5TB") == 5 * 10**12 and parse_size("2TiB") == 2 * 2**40 and parse_size("1") == 1
