"""``deltahub vllm-prepare``: the stub folder vLLM serves a stored model from (no vLLM needed here;
the plug-in itself is tested in tests/vllm), and its pointer read as hostile input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BASE, assert_store_unchanged, snapshot_store

from deltahub.errors import InputError, NameNotFoundError, OutputExistsError
from deltahub.ops.vllm_stub import POINTER_FILE, open_stub, read_stub


@pytest.fixture
def with_deltas(based, model_dirs):
    store, home, _ = based
    store.compress(model_dirs["llama"]["ft"], base=BASE, name="ft")
    store.compress(model_dirs["llama"]["ft"], base=BASE, name="ft2", codec="planes",
                   codec_options={"planes": 2, "scales": "group", "group_size": 32})
    return store, home


def test_prepare_writes_config_tokenizer_and_pointer_but_no_weights(with_deltas, tmp_path):
    store, home = with_deltas
    out = tmp_path / "vllm" / "ft"
    res = store.vllm_prepare("ft", out, dtype="float16")
    files = sorted(p.name for p in out.iterdir())
    assert POINTER_FILE in files and "config.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt"))]
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "deltahub" and quant["version"] == 1
    assert config["torch_dtype"] == "float16" and res.dtype == "float16"
    # every 2-D Linear weight is sign1 (one plane, one scale); embeddings too (the default)
    assert quant["planes"]["model.layers.0.self_attn.q_proj.weight"] == [1, 1, None]
    assert res.delta_tensors == len(quant["planes"]) >= 14
    stub = read_stub(out)
    assert stub.name == "ft" and stub.home == home.resolve() and stub.manifest == res.manifest
    grouped = store.vllm_prepare("ft2", tmp_path / "vllm" / "ft2")
    planes = json.loads((grouped.out_dir / "config.json").read_text())["quantization_config"]["planes"]
    assert planes["model.layers.0.mlp.down_proj.weight"] == [2, 3, 32]  # K = 88: ceil(88 / 32) groups
    base = store.vllm_prepare(BASE, tmp_path / "vllm" / "base")
    assert base.delta_tensors == 0


def test_the_folder_keeps_serving_what_it_was_prepared_from(with_deltas, tmp_path, model_dirs):
    store, home = with_deltas
    res = store.vllm_prepare("ft", tmp_path / "v")
    store.compress(model_dirs["llama"]["base"], base=BASE, name="ft", force=True)  # re-point the name
    ctx, source = open_stub(read_stub(res.out_dir))
    try:
        assert source.resolved.manifest_id == res.manifest
    finally:
        ctx.close()
    store.rm("ft")
    store.gc()
    with pytest.raises(NameNotFoundError, match="no longer in") as exc:
        open_stub(read_stub(res.out_dir))
    assert "vllm-prepare ft" in exc.value.hint


def test_prepare_refuses_bad_outputs_and_leaves_the_store_alone(with_deltas, tmp_path):
    store, home = with_deltas
    snap = snapshot_store(home)
    with pytest.raises(OutputExistsError, match="outside the store"):
        store.vllm_prepare("ft", home / "inside")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        store.vllm_prepare("ft", full)
    assert (full / "keep.txt").read_text() == "mine"
    with pytest.raises(NameNotFoundError):
        store.vllm_prepare("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert_store_unchanged(home, snap)


@pytest.mark.parametrize("pointer, message", [
    (None, "has no deltahub.json"),
    (b"{" * 10, "not valid JSON|nest|JSON"),
    (b"[" * 5000 + b"]" * 5000, "nest|deep"),
    (b"x" * (70 << 10), "larger than"),
    ({"format": "other"}, "is not a deltahub-vllm-stub pointer"),
    ({"format": "deltahub-vllm-stub", "version": 99}, "stub version 99 is not supported"),
    ({"format": "deltahub-vllm-stub", "version": 1, "home": "relative/store", "name": "a", "manifest": "0" * 64},
     "absolute path"),
    ({"format": "deltahub-vllm-stub", "version": 1, "home": "/s", "name": "a", "manifest": "../../etc/passwd"},
     "64 hex digits"),
    ({"format": "deltahub-vllm-stub", "version": 1, "home": "/s", "name": "a", "manifest": "0" * 64, "bits": -1},
     "'bits' must be a positive integer"),
    (b'{"format": "deltahub-vllm-stub", "format": "deltahub-vllm-stub"}', "duplicate|twice|repeated"),
])
def test_hostile_pointers_are_refused_with_one_clear_error(tmp_path, pointer, message):
    folder = tmp_path / "stub"
    folder.mkdir()
    if pointer is not None:
        data = pointer if isinstance(pointer, bytes) else json.dumps(pointer).encode()
        (folder / POINTER_FILE).write_bytes(data)
    with pytest.raises(InputError, match=message) as exc:
        read_stub(folder)
    assert exc.value.hint and "\n" not in str(exc.value)


def test_a_symlinked_pointer_is_not_followed(with_deltas, tmp_path):
    store, _home = with_deltas
    res = store.vllm_prepare("ft", tmp_path / "real")
    evil = tmp_path / "evil"
    evil.mkdir()
    os.symlink(res.out_dir / POINTER_FILE, evil / POINTER_FILE)
    with pytest.raises(InputError, match="is a symbolic link"):
        read_stub(evil)


def test_a_pointer_to_a_folder_that_is_no_store_is_refused(tmp_path):
    from deltahub.errors import StoreError
    from deltahub.ops.vllm_stub import Stub

    with pytest.raises(StoreError, match="is not a deltahub store"):
        open_stub(Stub(tmp_path / "nowhere", "ft", "0" * 64))
    assert not (tmp_path / "nowhere").exists()  # nothing was created there


def test_cli_vllm_prepare_json(with_deltas, tmp_path):
    _store, home = with_deltas
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "deltahub.cli", "--home", str(home), "vllm-prepare", "ft", str(out),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == "ft" and Path(data["dir"]) == out and "deltahub.json" in data["files"]
    again = subprocess.run([sys.executable, "-m", "deltahub.cli", "--home", str(home), "vllm-prepare", "ft", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "not empty" in again.stderr and "--force" in again.stderr


def test_engine_vllm_plans_one_model_alone_or_a_base_with_adapters(based, model_dirs, monkeypatch, tmp_path):
    """``deltahub serve --engine vllm``'s command line (vLLM itself runs in tests/vllm)."""
    import shutil

    from deltahub.ops import vllm_engine
    from deltahub.ops.context import StoreContext

    store, home, _ = based
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    store.compress(model_dirs["llama"]["ft"], base=BASE, name="ft")
    ctx = StoreContext(home)
    try:
        one = vllm_engine.plan_vllm(ctx, ["ft"], "127.0.0.1", 8000, "float16", 4, 64, "sekrit", ["--seed=1"])
        assert one.served == ["ft"] and one.cmd[-1] == "--seed=1" and "--enable-lora" not in one.cmd
        assert one.env == {"VLLM_API_KEY": "sekrit", "DELTAHUB_VLLM_ONLY_DELTAHUB_ADAPTERS": "1"}
        assert "sekrit" not in " ".join(one.cmd)
        model = Path(one.cmd[one.cmd.index("--model") + 1])
        assert read_stub(model).name == "ft" and model.parent == one.workdir
        assert one.cmd[one.cmd.index("--max-model-len") + 1] == "64" and "--enforce-eager" in one.cmd
        shutil.rmtree(one.workdir)
        # the llama fine-tune changes norms and embeddings: no adapter can carry it
        with pytest.raises(InputError, match="cannot be a vLLM adapter of its base: it changes .* tensor") as exc:
            vllm_engine.plan_vllm(ctx, ["base", "ft"], "127.0.0.1", 8000, None, 4, None, None)
        assert "deltahub serve ft --engine vllm" in exc.value.hint
        pulled = vllm_engine.plan_vllm(ctx, [BASE], "127.0.0.1", 8000, None, 4, None, None, pull=True)
        assert "--enable-lora" in pulled.cmd and "--lora-modules" not in pulled.cmd
        assert pulled.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and pulled.env["DELTAHUB_VLLM_PULL"] == "1"
        shutil.rmtree(pulled.workdir)
        with pytest.raises(InputError, match="name the models"):
            vllm_engine.plan_vllm(ctx, [], "127.0.0.1", 8000, None, 4, None, None)
    finally:
        ctx.close()


def test_engine_vllm_refuses_models_of_two_bases_and_builtin_only_flags(based, model_dirs, monkeypatch):
    import deltahub.api
    from deltahub.ops import vllm_engine
    from deltahub.ops.context import StoreContext

    store, home, _ = based
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    store.add(model_dirs["gpt2"]["base"], name="other")
    ctx = StoreContext(home)
    try:
        with pytest.raises(InputError, match="one vLLM engine serves one base"):
            vllm_engine.plan_vllm(ctx, [BASE, "other"], "127.0.0.1", 8000, None, 4, None, None)
    finally:
        ctx.close()
    with pytest.raises(InputError, match="not available with --engine vllm: --all, --memory-budget"):
        deltahub.api.serve([], serve_all=True, home=home, memory_budget="1GB", engine="vllm")
    with pytest.raises(InputError, match="--engine-arg goes with --engine vllm"):
        deltahub.api.serve([BASE], home=home, engine_args=["--x"])


def test_conv1d_weights_are_served_decoded_and_adapters_must_match_the_bases_files(based, model_dirs, tmp_path):
    """GPT-2's Conv1D weights are [in, out]: engines transpose them, so their deltas are never planes
    (they are decoded, exactly); a fine-tune whose tokenizer differs from its base's is no adapter."""
    import shutil

    from deltahub.ops.context import StoreContext
    from deltahub.ops.vllm_stub import adapter_problems, planes_plan, source_of

    store, home, _ = based
    store.add(model_dirs["gpt2"]["base"], name="g")
    store.compress(model_dirs["gpt2"]["ft"], base="g", name="g-ft")
    plan = json.loads((store.vllm_prepare("g-ft", tmp_path / "g").out_dir / "config.json").read_text())[
        "quantization_config"]["planes"]
    assert not [n for n in plan if ".attn.c_" in n or ".mlp.c_" in n]
    odd = tmp_path / "odd-tok"
    shutil.copytree(model_dirs["llama"]["base"], odd)
    cfg = json.loads((odd / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (odd / "tokenizer_config.json").write_text(json.dumps(cfg))
    store.compress(odd, base=BASE, name="tok")
    ctx = StoreContext(home)
    try:
        source = source_of(ctx, ctx.resolve("tok"))
        problems = adapter_problems(source, planes_plan(source))
        assert problems == ["its tokenizer_config.json differ(s) from the base's (an adapter is served with the base's)"]
    finally:
        ctx.close()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_pointer_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    folder = tmp_path / "stub"
    folder.mkdir()
    (os.mkfifo if kind == "fifo" else os.mkdir)(folder / POINTER_FILE)
    with pytest.raises(InputError, match="is not a regular file"):
        read_stub(folder)


def test_adapter_slot_options_are_checked_by_name(with_deltas, tmp_path):
    store, _home = with_deltas
    for group in (33, 0, -5):
        with pytest.raises(InputError, match=f"--adapter-group must be a positive multiple of 32, got {group}"):
            store.vllm_prepare(BASE, tmp_path / "o", adapter_group=group)
    with pytest.raises(InputError, match="--adapter-planes must be 1 to 8"):
        store.vllm_prepare(BASE, tmp_path / "o", adapter_planes=9)
    assert not (tmp_path / "o").exists()


def test_a_full_output_disk_names_the_output_folder(with_deltas, tmp_path):
    """vllm-prepare onto a full tmpfs: one clear error naming that folder, nothing half-written."""
    import subprocess as sp

    store, home = with_deltas
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if sp.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        (tiny / "filler").write_bytes(b"x" * 6000)
        proc = sp.run([sys.executable, "-m", "deltahub.cli", "--home", str(home), "vllm-prepare", "ft", str(tiny / "o")],
                      capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
        assert f"in {tiny}" in proc.stderr and "output folder" in proc.stderr, proc.stderr
        assert sorted(p.name for p in tiny.iterdir()) == ["filler"]
    finally:
        sp.run(["umount", str(tiny)])
