"""Codec ``lossless``: the exact fine-tune as a delta (XOR with the base, byte planes, zstd)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import fine_tune_like, make_model, save_checkpoint
from safetensors.torch import load_file

import deltahub
from deltahub.cli import cli
from deltahub.errors import CodecError as DeltaCodecError
from deltahub.formats.manifest import parse_manifest
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401

INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _pair(root, dtype, special: bool):
    model = make_model("llama")
    base = save_checkpoint(model, root / "base", dtype=dtype)
    fine_tune_like(model)
    ft = save_checkpoint(model, root / "ft", dtype=dtype)
    if special:  # NaN payloads, infinities and negative zero in a matrix and in a 1-D tensor
        tensors = load_file(ft / "model.safetensors")
        for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
            t = tensors[name].clone()
            flat = t.view(-1)
            flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), float("-inf"), -0.0
            bits = flat.view(INT[dtype])
            bits[4] = bits[0] ^ 1  # another NaN payload
            bits[5] = bits[0] | (1 << (bits.element_size() * 8 - 1))  # a negative NaN
            tensors[name] = t
        from safetensors.torch import save_file

        save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    return base, ft


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("special", [False, True])
def test_lossless_is_bit_exact(store, tmp_path, dtype, special):
    base, ft = _pair(tmp_path, dtype, special)
    store.add(base, name="base")
    store.compress(ft, base="base", name="exact", codec="lossless", allow_nonfinite=special)
    man = parse_manifest(store._ctx.objects.read(store.show("exact")["manifest_id"]))
    assert man.version() == 2 and {"lossless"} <= {r.codec for r in man.tensors.values()} <= {"lossless", "same", "dense"}
    store.materialize("exact", tmp_path / "out")
    want = load_file(ft / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    if not special:  # the stored delta is smaller than the fine-tune's own weights
        shown = store.show("exact")
        assert shown["stored_bytes"] < sum(t.numel() * t.element_size() for t in want.values())


def test_lossless_keeps_the_nan_rule(store, tmp_path):
    base, ft = _pair(tmp_path, torch.float16, special=True)
    store.add(base, name="base")
    with pytest.raises(DeltaCodecError, match="NaN"):
        store.compress(ft, base="base", name="exact", codec="lossless")
    assert [m["name"] for m in store.list()] == ["base"]
    assert store.gc(dry_run=True).objects == []


def test_lossless_round_trips_the_hub_and_loads(store, tmp_path, hub_server):
    base, ft = _pair(tmp_path, torch.bfloat16, special=False)
    store.add(base, name="base")
    store.compress(ft, base="base", name="exact", codec="lossless")
    plant_repo(hub_server, "someone/tiny-base", "d" * 40)
    store.push("exact", f"{FAKE_USER}/exact", base_repo="someone/tiny-base@" + "d" * 40)
    b = deltahub.Store(tmp_path / "b")
    try:
        b.add(base, name="base")
        assert b.pull(f"{FAKE_USER}/exact", name="exact").manifest_id == store.show("exact")["manifest_id"]
        b.materialize("exact", tmp_path / "b_out")
        assert (tmp_path / "b_out" / "model.safetensors").read_bytes() == load_file_bytes(tmp_path, store)
        ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(ft)
        with torch.no_grad():
            want = ref(ids).logits
            for mode in ("materialize", "delta"):
                assert torch.equal(b.load_model("exact", mode=mode)(ids).logits, want), mode
    finally:
        b.close()


def load_file_bytes(tmp_path, store) -> bytes:
    store.materialize("exact", tmp_path / "a_out")
    return (tmp_path / "a_out" / "model.safetensors").read_bytes()


def test_cli_lossless_flag(store, tmp_path):
    base, ft = _pair(tmp_path, torch.float16, special=False)
    store.add(base, name="base")
    home = str(store._ctx.home)
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(ft), "--base", "base", "--name", "x", "--lossless"])
    assert r.exit_code == 0, r.output
    assert "lossless" in r.output
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(ft), "--base", "base", "--name", "y", "--lossless", "--bits", "2"])
    assert r.exit_code == 2 and "takes no --codec" in r.output
