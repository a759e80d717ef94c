"""deltahub's vLLM plug-in on vLLM's CPU build (runs in .venv-vllm: scripts/test-vllm.sh).

* registration through the ``vllm.general_plugins`` entry point;
* ``create_weights`` / ``apply`` of the ``deltahub`` quantization method on vLLM's own parallel linear
  layers (one rank, gloo), weights placed by vLLM's own ``weight_loader`` s (fused q/k/v and
  gate/up), against the materialized weight;
* end to end: greedy tokens of ``vllm.LLM`` and of vLLM's OpenAI server on a stub folder equal
  transformers on the materialized fine-tune, for sign1, two-plane and grouped-scale deltas;
* an unsupported vLLM version is refused with a clear message.

Engines run in a child process (tests/vllm/engine_run.py); each start costs a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vllm_fixtures import FINETUNES, MAX_TOKENS, PROMPTS, free_port as _free_port, one_rank, run_engines as _run_engines, vstore  # noqa: E402,F401,E501



# ---------------------------------------------------------------------------------------- registration
def test_the_entry_point_registers_the_load_format_and_quantization_method():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "deltahub"]
    assert [ep.value for ep in eps] == ["deltahub.integrations.vllm:register"]
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm.config.load import LoadConfig
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.model_executor.model_loader import get_model_loader

    from deltahub.integrations.vllm import register
    from deltahub.integrations.vllm.loader import DeltahubModelLoader
    from deltahub.integrations.vllm.quant import DeltahubConfig

    assert get_quantization_config("deltahub") is DeltahubConfig
    assert isinstance(get_model_loader(LoadConfig(load_format="deltahub")), DeltahubModelLoader)
    register()  # again: vLLM runs plug-ins in every process, sometimes twice
    assert QUANTIZATION_METHODS.count("deltahub") == 1
    assert torch.ops.deltahub.planes_delta is not None


def test_unsupported_versions_are_refused_clearly():
    from deltahub.integrations.vllm import UnsupportedVLLMError, check_vllm_version

    assert check_vllm_version("0.32.0") == "0.32.0" and check_vllm_version("0.33.1+cu129") == "0.33.1+cu129"
    for bad in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(UnsupportedVLLMError, match=rf"vLLM {re.escape(bad)} is not supported.*0\.32\.x, 0\.33\.x"):
            check_vllm_version(bad)


# ---------------------------------------------------------------------------------------- layers
def _encoded(codec: str, options: dict | None, n: int, k: int, seed: int):
    """A base ``[n, k]``, a fine-tune of it stored by ``codec``, its operator and decoded weight."""
    from deltahub.codec import registry

    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=gen)
    ft = base + 0.05 * torch.randn(n, k, generator=gen)
    impl = registry.get(codec)
    enc = impl.encode(base, ft, **(options or {}))
    params = impl.check_params(enc.params, (n, k))
    op = impl.operator(enc.parts, params, (n, k))
    decoded = impl.decode(base, enc.parts, params, torch.float32)
    return base, op, decoded, impl.planes_layout((n, k), params)


def _load(layer, shard, base, op, n):
    """Feed one shard through the layer's own (vLLM) weight_loader, as the loader does."""
    from deltahub.integrations.vllm.loader import _planes_for

    rows = _planes_for(layer, op, n)
    assert rows is not None
    for param, tensor in ((layer.weight, base), (layer.delta_signs, rows[0]), (layer.delta_scales, rows[1])):
        if shard is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)


@pytest.mark.parametrize("apply", ["on-the-fly", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_with_mixed_planes_equals_the_materialized_weight(one_rank, dtype, apply):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from deltahub.integrations.vllm.quant import DeltahubConfig, DeltahubLinearMethod

    k, head, heads, kv = 96, 32, 2, 1  # K = 3 words; q 64 rows, k and v 32 each
    shards = {"q": ("sign1", None, heads * head), "k": ("planes", {"planes": 2, "scales": "row"}, kv * head),
              "v": ("sign1", None, kv * head)}
    enc = {s: _encoded(c, o, n, k, seed=i) for i, (s, (c, o, n)) in enumerate(shards.items())}
    qc = DeltahubConfig({f"l.{s}_proj.weight": (e[3].planes, e[3].columns, e[3].group) for s, e in enc.items()},
                        apply=apply)
    qc.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    layer = QKVParallelLinear(k, head, heads, kv, bias=False, quant_config=qc, prefix="l.qkv_proj", params_dtype=dtype)
    assert isinstance(layer.quant_method, DeltahubLinearMethod) and layer.quant_method.layout == (2, 1, None)
    for s, (base, op, _dec, _lay) in enc.items():
        _load(layer, s, base.to(dtype), op, shards[s][2])
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.delta_merged == (apply == "merged")
    assert (layer.delta_signs.numel() == 0) == (apply == "merged")  # merged: the planes are freed
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(9)).to(dtype)
    y, _ = layer(x)
    # reference: the fine-tune's decoded weight (W + Δ in fp32), the base rounded to dtype first
    ref_w = torch.cat([(b.to(dtype).float() + (d - b)) for b, _op, d, _l in enc.values()])
    ref = x.float() @ ref_w.T
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert y.dtype == dtype and torch.allclose(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    assert not torch.allclose(y.float(), x.float() @ torch.cat([b for b, *_ in enc.values()]).T, atol=1e-3)


def test_gate_up_and_row_parallel_with_group_scales(one_rank):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    from deltahub.integrations.vllm.quant import DeltahubConfig

    opts = {"planes": 1, "scales": "group", "group_size": 64}
    gate, up = _encoded("planes", opts, 88, 96, 1), _encoded("planes", opts, 88, 96, 2)  # C = 2 (96 = 64 + 32)
    down = _encoded("planes", opts, 96, 88, 3)  # K = 88: not a multiple of 32, last group 24 columns
    qc = DeltahubConfig({"m.gate_proj.weight": (1, 2, 64), "m.up_proj.weight": (1, 2, 64), "m.down_proj.weight": (1, 2, 64)},
                        apply="on-the-fly")
    qc.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    gu = MergedColumnParallelLinear(96, [88, 88], bias=False, quant_config=qc, prefix="m.gate_up_proj",
                                    params_dtype=torch.float32)
    dn = RowParallelLinear(88, 96, bias=False, quant_config=qc, prefix="m.down_proj", params_dtype=torch.float32)
    for shard, (base, op, _d, _l) in enumerate((gate, up)):
        _load(gu, shard, base, op, 88)
    _load(dn, None, down[0], down[1], 96)
    for layer in (gu, dn):
        layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    h, _ = gu(x)
    assert torch.allclose(h, x @ torch.cat([gate[2], up[2]]).T, atol=1e-4)
    z = torch.randn(3, 88, generator=torch.Generator().manual_seed(5))
    y, _ = dn(z)
    assert torch.allclose(y, z @ down[2].T, atol=1e-4)


def test_shards_with_different_scale_layouts_stay_unquantized(one_rank):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, UnquantizedLinearMethod

    from deltahub.integrations.vllm.quant import DeltahubConfig

    qc = DeltahubConfig({"m.gate_proj.weight": (1, 1, None), "m.up_proj.weight": (1, 2, 64)})
    qc.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    gu = MergedColumnParallelLinear(96, [88, 88], bias=False, quant_config=qc, prefix="m.gate_up_proj",
                                    params_dtype=torch.float32)
    assert isinstance(gu.quant_method, UnquantizedLinearMethod)  # the loader gives it the decoded weight
    assert DeltahubConfig({"m.gate_proj.weight": (1, 1, None)}).layout_for("m.o_proj") is None


# ---------------------------------------------------------------------------------------- end to end
def test_llm_on_stub_folders_equals_transformers_on_the_materialized_fine_tunes(vstore, tmp_path):
    import deltahub

    with deltahub.Store(vstore["home"]) as store:  # the on-the-fly path too (auto merges on a CPU)
        fly = store.vllm_prepare("ft-group", tmp_path / "fly", dtype="float32", apply="on-the-fly").out_dir
    names = ["base", *FINETUNES]
    runs = _run_engines(tmp_path, [{"model": str(vstore["stub"][n]), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                                    "inspect": True} for n in names]
                        + [{"model": str(fly), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "inspect": True}]
                        + [{"model": str(vstore["stub"]["ft-sign1"]), "prompts": PROMPTS, "max_tokens": 1,
                            "fake_vllm_version": "0.31.2"}])
    refused = runs.pop()
    assert "vLLM 0.31.2 is not supported by deltahub's vLLM plug-in" in refused["error"], refused
    on_the_fly = runs.pop()
    assert on_the_fly["tokens"] == vstore["want"]["ft-group"]
    assert on_the_fly["inspect"] == {"delta_layers": 8, "merged": 0, "nonzero_scales": 8}
    for name, run in zip(names, runs):
        assert run["tokens"] == vstore["want"][name], name
        delta = run["inspect"]
        if name == "base":
            assert delta["delta_layers"] == 0
        else:  # every Linear of both layers (qkv, o, gate_up, down) got its delta as sign planes (merged on a CPU)
            assert delta == {"delta_layers": 8, "merged": 8, "nonzero_scales": 0}, (name, delta)
    assert len({json.dumps(r["tokens"]) for r in runs}) == len(names)  # four different models


def test_deltahub_serve_engine_vllm_serves_a_base_and_its_fine_tunes(vstore, tmp_path):
    """``deltahub serve base ad-sign1 ad-planes --engine vllm``: vLLM's own OpenAI server in its
    default multi-process mode (the engine process finds the plug-in through the entry point), the
    base as the model and each fine-tune a LoRA adapter; the real OpenAI client gets each model's
    greedy tokens. SIGTERM stops it and its temporary stub folders are removed."""
    import signal

    import openai
    from transformers import AutoTokenizer

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltahub.cli", "--home", str(vstore["home"]), "serve", "base", "ad-sign1", "ad-planes",
         "--engine", "vllm", "--dtype", "float32", "--max-context", "256", "--port", str(port),
         "--engine-arg=--gpu-memory-utilization=0.1"],
        stdout=log, stderr=subprocess.STDOUT, env={**env, "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(tmp_path)})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["base", "ad-sign1", "ad-planes"]
                break
            except (openai.APIConnectionError, openai.InternalServerError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the server did not start:\n" + (tmp_path / "server.log").read_text()[-4000:])
                time.sleep(1)
        tok = AutoTokenizer.from_pretrained(vstore["stub"]["base"])
        for name in ("base", "ad-sign1", "ad-planes"):
            for prompt, want in zip(PROMPTS[:2], vstore["want"][name][:2]):
                r = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
                assert r.choices[0].text.split() == tok.decode(want, skip_special_tokens=True).split(), name
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="ft-sign1", prompt="w1", max_tokens=2)
        assert len(list(tmp_path.glob("deltahub-vllm-*"))) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not list(tmp_path.glob("deltahub-vllm-*"))  # the stub folders are gone
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "--load-format deltahub" in text and "--enable-lora" in text and "--lora-modules" in text


def test_engine_vllm_refuses_what_an_adapter_cannot_carry(vstore):
    proc = subprocess.run([sys.executable, "-m", "deltahub.cli", "--home", str(vstore["home"]), "serve", "base", "ft-sign1",
                           "--engine", "vllm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ft-sign1 cannot be a vLLM adapter of its base: it changes 4 tensor(s)" in proc.stderr
    assert "deltahub serve ft-sign1 --engine vllm" in proc.stderr


def test_a_folder_without_pointer_is_refused_before_loading(vstore, tmp_path):
    import shutil

    bad = tmp_path / "no-pointer"
    shutil.copytree(vstore["stub"]["ft-sign1"], bad)
    (bad / "deltahub.json").unlink()
    run, = _run_engines(tmp_path, [{"model": str(bad), "prompts": ["w1"], "max_tokens": 1}])
    assert "has no deltahub.json: it is not a deltahub stub folder" in run["error"]
    assert "deltahub vllm-prepare NAME DIR" in run["error"]
