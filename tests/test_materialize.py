"""materialize: an ordinary Hugging Face checkpoint that transformers loads, written atomically.

Covers loading without key problems, logits, config dtype, tokenizer files, bases, sharded output and
input, determinism, refusing a non-empty output folder (and ``force``), and cleaning up temp folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, read_json, save_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

import deltahub
from deltahub.errors import CorruptObjectError, NameNotFoundError, OutputExistsError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------- helpers
def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            out.update(load_file(path / shard))
        return out
    return load_file(path / "model.safetensors")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def hf_load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mstore(tmp_path_factory, model_dirs):
    home = tmp_path_factory.mktemp("mat-store")
    with deltahub.Store(home) as store:
        for arch, dirs in model_dirs.items():
            store.add(dirs["base"], name=f"{arch}-base")
            store.compress(dirs["ft"], base=f"{arch}-base", name=f"{arch}-ft")
        yield store


@pytest.fixture(scope="module")
def fp32_outputs(tmp_path_factory, mstore):
    """Each fine-tune materialized once in float32 (shared by the read-only tests)."""
    root = tmp_path_factory.mktemp("mat-out")
    return {arch: mstore.materialize(f"{arch}-ft", root / arch, dtype="float32").out_dir for arch in ("llama", "gpt2")}


# ---------------------------------------------------------------------------------------- loading
def test_loads_with_transformers_without_key_problems(fp32_outputs, arch):
    model, info = hf_load(fp32_outputs[arch], output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert model.dtype == torch.float32


def test_logits_are_finite_equal_load_model_and_approximate_the_fine_tune(
    fp32_outputs, mstore, model_dirs, arch
):
    got = logits_of(hf_load(fp32_outputs[arch]))
    assert torch.isfinite(got).all()
    direct = logits_of(mstore.load_model(f"{arch}-ft", dtype="float32"))
    assert torch.equal(got, direct)
    ft = logits_of(hf_load(model_dirs[arch]["ft"]))
    base = logits_of(hf_load(model_dirs[arch]["base"]))
    # The 1-bit delta moves the base towards the fine-tune (well approximated for these fixtures).
    assert (got - ft).abs().mean() < (base - ft).abs().mean()
    assert not torch.equal(got, base)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_config_records_the_output_dtype(mstore, model_dirs, arch, dtype, tmp_path):
    result = mstore.materialize(f"{arch}-ft", tmp_path / "out", dtype=dtype)
    assert result.dtype == dtype
    config = read_json(tmp_path / "out" / "config.json")
    assert config["torch_dtype"] == dtype
    if "dtype" in config:
        assert config["dtype"] == dtype
    original = read_json(model_dirs[arch]["ft"] / "config.json")
    strip = lambda c: {k: v for k, v in c.items() if k not in ("torch_dtype", "dtype", "transformers_version")}  # noqa: E731
    assert strip(config) == strip(original)
    tensors = load_checkpoint(tmp_path / "out")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {getattr(torch, dtype)}
    model = hf_load(tmp_path / "out")  # transformers honours the recorded dtype
    assert model.dtype == getattr(torch, dtype)


def test_result_lists_the_files_written(fp32_outputs, mstore, arch, tmp_path):
    result = mstore.materialize(f"{arch}-ft", tmp_path / "out")
    on_disk = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert result.files == on_disk
    assert result.bytes_written == sum((tmp_path / "out" / f).stat().st_size for f in on_disk)
    assert "model.safetensors" in on_disk and "config.json" in on_disk
    assert result.out_dir == tmp_path / "out"
    assert result.name == f"{arch}-ft"


def test_tokenizer_files_are_carried_byte_for_byte(fp32_outputs, model_dirs, arch):
    from transformers import AutoTokenizer

    src, out = model_dirs[arch]["ft"], fp32_outputs[arch]
    carried = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    assert "tokenizer.json" in carried
    for f in carried + ["generation_config.json"]:
        if (src / f).is_file():
            assert (out / f).read_bytes() == (src / f).read_bytes(), f
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(src)
    text = "w1 w2 w77 unknownword w124"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.unk_token_id == ref.unk_token_id == 0


def test_base_materializes_to_the_original_checkpoint(mstore, model_dirs, arch, tmp_path):
    mstore.materialize(f"{arch}-base", tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = load_checkpoint(model_dirs[arch]["base"])
    assert set(got) == set(want)
    for name, t in want.items():
        assert bits_equal(got[name], t), name
    assert read_json(tmp_path / "out" / "config.json")["torch_dtype"] == "float32"


def test_base_materializes_in_another_dtype(mstore, model_dirs, tmp_path):
    mstore.materialize("gpt2-base", tmp_path / "out", dtype="bfloat16")
    got = load_checkpoint(tmp_path / "out")
    for name, t in load_checkpoint(model_dirs["gpt2"]["base"]).items():
        assert bits_equal(got[name], t.to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------- sharding
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def test_sharded_output(mstore, fp32_outputs, arch, tmp_path):
    out = tmp_path / "out"
    result = mstore.materialize(f"{arch}-ft", out, dtype="float32", max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    assert not (out / "model.safetensors").exists()
    n = len(shards)
    for i, name in enumerate(shards, start=1):
        m = SHARD_RE.match(name)
        assert m and int(m.group(1)) == i and int(m.group(2)) == n, name
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.safetensors.index.json" in result.files
    single = load_checkpoint(fp32_outputs[arch])
    assert set(index["weight_map"]) == set(single)
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            names = list(f.keys())
            for k in names:
                assert index["weight_map"][k] == shard
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names)
        total += size
        assert size <= 20_000 or len(names) == 1, (shard, size, names)
    assert index["metadata"]["total_size"] == total
    sharded = load_checkpoint(out)
    for k, t in single.items():
        assert bits_equal(sharded[k], t), k
    model, info = hf_load(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(logits_of(model), logits_of(hf_load(fp32_outputs[arch])))


def test_bad_shard_size_is_refused(mstore, tmp_path):
    with pytest.raises(ValueError):
        mstore.materialize("gpt2-ft", tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists()


def test_sharded_input_checkpoints(mstore, model_dirs, arch, tmp_path):
    """A base and fine-tune saved in 20KB shards store and materialize like the unsharded ones."""
    from conftest import fine_tune_like

    model = make_model(arch)
    base = save_checkpoint(model, tmp_path / "base", max_shard_size="20KB")
    fine_tune_like(model)
    ft = save_checkpoint(model, tmp_path / "ft", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").is_file() and (ft / "model.safetensors.index.json").is_file()
    assert not (ft / "model.safetensors").exists()
    with deltahub.Store(tmp_path / "store") as store:
        add = store.add(base, name="b")
        assert add.n_tensors == len(load_checkpoint(model_dirs[arch]["base"]))
        res = store.compress(ft, base="b", name="f")
        assert res.codecs == {c: v["tensors"] for c, v in mstore.show(f"{arch}-ft")["codecs"].items()}
        store.materialize("f", tmp_path / "out", dtype="float16")
    mstore.materialize(f"{arch}-ft", tmp_path / "ref", dtype="float16")
    got, want = load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "ref")
    assert set(got) == set(want)
    for k in want:
        assert bits_equal(got[k], want[k]), k
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------- determinism
def test_materializing_twice_gives_identical_bytes(mstore, arch, tmp_path):
    for dtype in ("bfloat16", None):
        a = mstore.materialize(f"{arch}-ft", tmp_path / f"a-{dtype}", dtype=dtype, max_shard_size="30KB")
        b = mstore.materialize(f"{arch}-ft", tmp_path / f"b-{dtype}", dtype=dtype, max_shard_size="30KB")
        assert a.files == b.files
        assert tree_bytes(a.out_dir) == tree_bytes(b.out_dir)


def test_same_input_gives_same_manifest_ids_and_bytes_in_a_fresh_store(model_dirs, arch, tmp_path, mstore):
    """Content addressing: another store, other names, same manifests and same materialized bytes."""
    with deltahub.Store(tmp_path / "s") as store:
        base = store.add(model_dirs[arch]["base"], name="other-base")  # names are not part of the content
        ft = store.compress(model_dirs[arch]["ft"], base="other-base", name="other-ft")
        store.materialize("other-ft", tmp_path / "a", dtype="float16")
    assert re.fullmatch(r"[0-9a-f]{64}", base.manifest_id) and re.fullmatch(r"[0-9a-f]{64}", ft.manifest_id)
    assert base.manifest_id == mstore.show(f"{arch}-base")["manifest_id"]
    assert ft.manifest_id == mstore.show(f"{arch}-ft")["manifest_id"]
    mstore.materialize(f"{arch}-ft", tmp_path / "b", dtype="float16")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


# ---------------------------------------------------------------------------------------- output folder
def test_empty_existing_output_dir_is_used(mstore, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mstore.materialize("gpt2-ft", out)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_parent_dirs_are_created(mstore, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    mstore.materialize("gpt2-ft", out)
    assert (out / "config.json").is_file()


def test_non_empty_output_dir_is_refused_and_untouched(mstore, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = tree_bytes(out)
    with pytest.raises(OutputExistsError) as exc:
        mstore.materialize("gpt2-ft", out)
    assert "--force" in str(exc.value)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_path_that_is_a_file_is_refused(mstore, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    for force in (False, True):
        with pytest.raises(OutputExistsError):
            mstore.materialize("gpt2-ft", out, force=force)
    assert out.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_path_that_is_a_symlink_is_refused_unless_forced(mstore, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(OutputExistsError, match="is a symbolic link") as exc:
        mstore.materialize("gpt2-ft", link)
    assert "--force" in exc.value.hint and "was filled" not in str(exc.value)
    assert link.is_symlink() and list(target.iterdir()) == []
    mstore.materialize("gpt2-ft", link, force=True)  # replaces the link with a real folder
    assert not link.is_symlink() and (link / "model.safetensors").is_file()
    assert list(target.iterdir()) == []  # the link's target is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="is a symbolic link"):
        mstore.materialize("gpt2-ft", dangling)
    mstore.materialize("gpt2-ft", dangling, force=True)
    assert not dangling.is_symlink() and (dangling / "model.safetensors").is_file()
    assert not (tmp_path / "nowhere").exists()


def test_force_replaces_a_non_empty_output_dir(mstore, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"stale")
    mstore.materialize("gpt2-ft", out, force=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert load_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no old/temp folders left


# ---------------------------------------------------------------------------------------- failures
def test_unknown_name_writes_nothing(mstore, tmp_path):
    with pytest.raises(NameNotFoundError):
        mstore.materialize("nope", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _damage_late_base_tensor(store_home: Path, mstore, model_dirs, arch: str) -> str:
    """Flip a byte in the stored base tensor that the delta reads last (sign1 or same), so that
    materializing fails after several tensors were written. Objects are named by the sha256 of their
    content and base tensors are stored raw, so the object is found from the original checkpoint."""
    import hashlib

    codecs = {t["name"]: t["codec"] for t in mstore.show(f"{arch}-ft", tensors=True)["tensors"]}
    victim = max(n for n, c in codecs.items() if c in ("sign1", "same"))
    tensor = load_checkpoint(model_dirs[arch]["base"])[victim]
    oid = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    path = store_home / "objects" / oid[:2] / oid
    assert path.is_file(), "base tensors are stored raw under objects/<2 hex>/<sha256>"
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    return victim


def test_failure_midway_leaves_no_temp_dirs(mstore, model_dirs, tmp_path):
    home = tmp_path / "store"
    shutil.copytree(mstore.home, home)
    _damage_late_base_tensor(home, mstore, model_dirs, "llama")
    parent = tmp_path / "outputs"
    parent.mkdir()
    with deltahub.Store(home) as store:
        with pytest.raises(CorruptObjectError):
            store.materialize("llama-ft", parent / "out")
        assert list(parent.iterdir()) == []

        # With force over an existing output, the old output survives a failure.
        out = parent / "out"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        with pytest.raises(CorruptObjectError):
            store.materialize("llama-ft", out, force=True)
        assert tree_bytes(out) == {"keep.txt": b"mine"}
        assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_corrupt_object_fails_cleanly(mstore, tmp_path):
    """A damaged object is detected while materializing; nothing is left in the output's parent."""
    home = tmp_path / "store"
    shutil.copytree(mstore.home, home)
    info = mstore.show("gpt2-ft")
    keep = {info["manifest_id"], info["base"]["manifest_id"]}
    damaged = 0
    for p in (home / "objects").rglob("*"):
        if p.is_file() and p.name not in keep:
            os.chmod(p, 0o644)
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
            damaged += 1
    assert damaged
    parent = tmp_path / "outputs"
    parent.mkdir()
    with deltahub.Store(home) as store:
        with pytest.raises(CorruptObjectError):
            store.materialize("gpt2-ft", parent / "out")
        assert not store.verify().ok
    assert list(parent.iterdir()) == []


def test_output_files_are_not_world_writable(mstore, tmp_path):
    out = mstore.materialize("gpt2-ft", tmp_path / "out").out_dir
    assert json.loads((out / "config.json").read_text())
    mode = out.stat().st_mode & 0o777
    assert mode & 0o700 == 0o700 and not mode & 0o002
