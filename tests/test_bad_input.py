"""Bad inputs are refused with the right error class and a message naming the problem, and a refused
operation leaves the store exactly as it was (object files and index rows)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import BASE, assert_store_unchanged, copy_checkpoint, rewrite_safetensors, fine_tune_like, make_model, save_checkpoint
from safetensors.torch import load_file

from deltahub.cli import cli
from deltahub.errors import (
    CodecError,
    IncompatibleBaseError,
    InputError,
    InvalidNameError,
    MalformedSafetensorsError,
    PickleCheckpointError,
)

BAD_NAMES = ["..", "a/b", "../evil", "/abs/path", "", ".hidden", "a..b"]






# ---------------------------------------------------------------------------------------- pickles
def _pickle_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    torch.save({"w": torch.zeros(2)}, dst / "pytorch_model.bin")
    return dst


def test_pickle_dir_refused_with_conversion_hint(based, model_dirs, tmp_path):
    store, home, snap = based
    src = _pickle_dir(model_dirs["llama"]["ft"], tmp_path / "pickled")
    for call in (lambda: store.add(src, name="p"), lambda: store.compress(src, base=BASE, name="p")):
        with pytest.raises(PickleCheckpointError) as info:
            call()
        msg = str(info.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg
        assert "safe_serialization=True" in msg and "save_pretrained" in msg  # says how to convert
    assert_store_unchanged(home, snap)


def test_pickle_file_path_refused(based, tmp_path):
    store, home, snap = based
    for suffix in (".pt", ".bin", ".pth"):
        path = tmp_path / f"model{suffix}"
        torch.save({"w": torch.zeros(2)}, path)
        for call in (lambda: store.add(path, name="p"), lambda: store.compress(path, base=BASE, name="p")):
            with pytest.raises(PickleCheckpointError) as info:
                call()
            msg = str(info.value)
            assert path.name in msg and "pickle" in msg and "safe_serialization" in msg
    assert_store_unchanged(home, snap)


def test_pickle_is_never_unpickled(based, tmp_path, monkeypatch):
    store, home, snap = based
    import pickle

    def boom(*a, **k):  # pragma: no cover - called only on failure
        raise AssertionError("deltahub unpickled something")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    d = tmp_path / "pk"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PickleCheckpointError):
        store.add(d, name="p")
    assert_store_unchanged(home, snap)


# ----------------------------------------------------------------------------- bad safetensors
def test_truncated_safetensors(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "trunc")
    st = src / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_len = len(raw) - 8 - n
    st.write_bytes(raw[: 8 + n + data_len // 2])  # cut in the middle of the data
    for call in (lambda: store.compress(src, base=BASE, name="t"), lambda: store.add(src, name="t")):
        with pytest.raises(MalformedSafetensorsError) as info:
            call()
        msg = str(info.value)
        assert "model.safetensors" in msg and "truncated" in msg
    assert_store_unchanged(home, snap)


def _write_header(path: Path, header: bytes, declared: int | None = None, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)


MALFORMED = {
    "garbage-json": ["not JSON"],
    "header-too-long": ["header length 10000000", "does not fit"],
    "not-an-object": ["not a JSON object"],
    "bad-offsets": ["data_offsets"],
    "short": ["header length"],
}


def test_malformed_safetensors_header(based, model_dirs, tmp_path):
    store, home, snap = based
    for kind, words in MALFORMED.items():
        src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / kind)
        st = src / "model.safetensors"
        if kind == "garbage-json":
            _write_header(st, b"{this is : not json!!", data=b"\0" * 64)
        elif kind == "header-too-long":
            _write_header(st, b'{"a": 1}', declared=10_000_000)
        elif kind == "not-an-object":
            _write_header(st, b"[1, 2, 3]")
        elif kind == "bad-offsets":
            hdr = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode()
            _write_header(st, hdr, data=b"\0" * 8)
        else:
            st.write_bytes(b"\x01\x02")
        with pytest.raises(MalformedSafetensorsError) as info:
            store.compress(src, base=BASE, name="m")
        for w in words:
            assert w in str(info.value), kind
        assert "model.safetensors" in str(info.value)
        with pytest.raises(MalformedSafetensorsError):
            store.add(src, name="m")
    assert_store_unchanged(home, snap)


# ------------------------------------------------------------------------ incompatible fine-tunes
def test_mismatched_shapes_names_the_tensor(based, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    store, home, snap = based
    base_model = make_model("llama")
    cfg = LlamaConfig.from_dict(base_model.config.to_dict())
    cfg.intermediate_size = 96  # same model_type, other MLP width
    torch.manual_seed(3)
    other = save_checkpoint(LlamaForCausalLM(cfg), tmp_path / "wide")
    with pytest.raises(IncompatibleBaseError) as info:
        store.compress(other, base=BASE, name="wide")
    msg = str(info.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg
    assert "[64, 96]" in msg and "[64, 88]" in msg
    assert_store_unchanged(home, snap)


def test_foreign_model_refused(based, model_dirs):
    store, home, snap = based
    with pytest.raises(IncompatibleBaseError) as info:
        store.compress(model_dirs["gpt2"]["ft"], base=BASE, name="foreign")
    msg = str(info.value)
    assert "gpt2" in msg and "llama" in msg
    assert_store_unchanged(home, snap)


def test_foreign_model_without_model_type_refused(based, model_dirs, tmp_path):
    """Even when config.json does not say what it is, gpt2 tensors do not fit a llama base."""
    store, home, snap = based
    src = copy_checkpoint(model_dirs["gpt2"]["ft"], tmp_path / "anon")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("model_type", None)
    cfg.pop("architectures", None)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleBaseError) as info:
        store.compress(src, base=BASE, name="foreign")
    assert "lacks" in str(info.value)
    assert_store_unchanged(home, snap)


def test_missing_tensor_refused(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "missing")
    gone = "model.layers.1.self_attn.v_proj.weight"
    rewrite_safetensors(src / "model.safetensors", lambda sd: sd.pop(gone))
    with pytest.raises(IncompatibleBaseError) as info:
        store.compress(src, base=BASE, name="missing")
    assert gone in str(info.value) and "lacks" in str(info.value)
    assert_store_unchanged(home, snap)


def test_missing_config_refused(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "noconfig")
    (src / "config.json").unlink()
    for call in (lambda: store.add(src, name="nc"), lambda: store.compress(src, base=BASE, name="nc")):
        with pytest.raises(InputError) as info:
            call()
        assert "config.json" in str(info.value) and "noconfig" in str(info.value)
        assert not isinstance(info.value, (PickleCheckpointError, MalformedSafetensorsError))
    assert_store_unchanged(home, snap)


def test_missing_directory_refused(based, tmp_path):
    store, home, snap = based
    with pytest.raises(InputError) as info:
        store.add(tmp_path / "does-not-exist", name="x")
    assert "does-not-exist" in str(info.value)
    assert_store_unchanged(home, snap)


def test_nan_in_finetune_is_codec_error(based, model_dirs, tmp_path):
    store, home, snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "nan")
    bad = "model.layers.1.self_attn.q_proj.weight"

    def poison(sd):
        sd[bad][3, 5] = float("nan")

    rewrite_safetensors(src / "model.safetensors", poison)
    with pytest.raises(CodecError) as info:
        store.compress(src, base=BASE, name="nan")
    msg = str(info.value)
    assert bad in msg and "NaN" in msg
    assert_store_unchanged(home, snap)
    assert store.verify().ok
    # an Inf in a weight is refused the same way
    src2 = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "inf")

    def poison_inf(sd):
        sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")

    rewrite_safetensors(src2 / "model.safetensors", poison_inf)
    with pytest.raises(CodecError) as info:
        store.compress(src2, base=BASE, name="inf")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)
    assert_store_unchanged(home, snap)


# --------------------------------------------------------------------------------------- names
def test_invalid_names_api(based, model_dirs, tmp_path):
    store, home, snap = based
    ft = model_dirs["llama"]["ft"]
    out = tmp_path / "out"
    for bad in BAD_NAMES:
        calls = {
            "add": lambda: store.add(model_dirs["llama"]["base"], name=bad),
            "compress-name": lambda: store.compress(ft, base=BASE, name=bad),
            "compress-base": lambda: store.compress(ft, base=bad, name="ok"),
            "materialize": lambda: store.materialize(bad, out),
            "show": lambda: store.show(bad),
            "rm": lambda: store.rm(bad),
        }
        for op, call in calls.items():
            # add with name="" is refused too: only name=None derives the name from the folder
            with pytest.raises(InvalidNameError) as info:
                call()
            assert "invalid model name" in str(info.value), (op, bad)
            assert repr(bad) in str(info.value), (op, bad)
    assert not out.exists()
    assert_store_unchanged(home, snap)


def test_invalid_names_cli(based, model_dirs, tmp_path):
    store, home, snap = based
    runner = CliRunner()
    ft = str(model_dirs["llama"]["ft"])
    out = tmp_path / "out"
    for bad in ["..", "a/b", "/etc/passwd", "", ".hidden"]:
        commands = [
            ["compress", ft, "--base", BASE, "--name", bad],
            ["compress", ft, "--base", bad, "--name", "ok"],
            ["materialize", bad, str(out)],
            ["show", bad],
            ["rm", bad],
            ["add", str(model_dirs["llama"]["base"]), "--name", bad],
        ]
        for args in commands:
            result = runner.invoke(cli, ["--home", str(home), *args])
            assert result.exit_code == 2, (args, result.output, result.exception)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith("Error: invalid model name"), lines[0]
            assert "Traceback" not in result.output
    assert not out.exists()
    assert_store_unchanged(home, snap)


# ------------------------------------------------------------------ accepted but unusual inputs
def _codecs(store, name: str) -> dict[str, str]:
    return {t["name"]: t["codec"] for t in store.show(name, tensors=True)["tensors"]}


def test_resized_vocabulary_stored_dense(store, model_dirs, tmp_path, arch):
    store.add(model_dirs[arch]["base"], name=BASE)
    model = make_model(arch)
    fine_tune_like(model)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 8)
    src = save_checkpoint(model, tmp_path / "resized")
    result = store.compress(src, base=BASE, name="resized")
    codecs = _codecs(store, "resized")
    ft_sd = load_file(src / "model.safetensors")
    grown = [n for n, t in ft_sd.items() if t.ndim == 2 and t.shape[0] == old + 8]
    assert grown, "the fixture did not resize anything"
    for n in grown:
        assert codecs[n] == "dense", n
    assert "sign1" in codecs.values()  # the rest is still binarized
    assert result.codecs["dense"] >= len(grown)
    out = store.materialize("resized", tmp_path / "out")
    got = load_file(out.out_dir / "model.safetensors")
    for n in grown:
        assert torch.equal(got[n], ft_sd[n]), n
    model2 = store.load_model("resized")
    assert model2.get_input_embeddings().weight.shape[0] == old + 8
    assert torch.equal(model2.get_input_embeddings().weight.detach(), model.get_input_embeddings().weight.detach())
    with torch.no_grad():
        logits = model2(torch.tensor([[1, 5, old + 3]])).logits
    assert logits.shape[-1] == old + 8 and torch.isfinite(logits).all()
    assert store.verify().ok


def test_extra_tensor_stored_dense(based, model_dirs, tmp_path):
    store, home, _snap = based
    src = copy_checkpoint(model_dirs["llama"]["ft"], tmp_path / "extra")
    extra = torch.arange(12, dtype=torch.float32).reshape(3, 4)

    def add(sd):
        sd["extra_head.weight"] = extra

    rewrite_safetensors(src / "model.safetensors", add)
    store.compress(src, base=BASE, name="extra")
    assert _codecs(store, "extra")["extra_head.weight"] == "dense"
    out = store.materialize("extra", tmp_path / "out")
    got = load_file(out.out_dir / "model.safetensors")
    assert torch.equal(got["extra_head.weight"], extra)
    assert store.verify().ok
