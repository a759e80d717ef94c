"""Many fine-tunes per vLLM engine through the LoRA request path (deltahub/integrations/vllm/lora.py).

One test per patched function (P1 ``WorkerLoRAManager._load_adapter``, P2 ``_all_lora_classes``),
the resolver, and end to end: a mixed batch of two fine-tunes and the base equals each model alone
(transformers on the materialized fine-tune), a third loads on demand and evicts one, the prefix
cache is never shared across fine-tunes, and a fine-tune that a LoRA slot cannot carry is refused.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_fixtures import hub_server  # noqa: E402,F401
from vllm_fixtures import ADAPTERS, MAX_TOKENS, PROMPTS, one_rank, run_engines, vstore  # noqa: E402,F401

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear(module: str) -> str | None:
    """An engine that carries adapters for every decoder Linear (what vLLM wraps by default)."""
    return module if module.rpartition(".")[2] in LINEAR else None


def _engine_config(vstore, name: str = "base") -> SimpleNamespace:
    """The HF config an engine serving ``name``'s stub folder has (its quantization_config)."""
    import json

    return SimpleNamespace(quantization_config=json.loads((vstore["stub"][name] / "config.json").read_text())
                           ["quantization_config"])


# ---------------------------------------------------------------------------------------- P1
def test_p1_load_adapter_reads_a_fine_tune_from_the_store(vstore):
    from vllm.lora.request import LoRARequest

    from deltahub.integrations.vllm.lora import AdapterError, load_adapter

    req = LoRARequest("ad-planes", 7, str(vstore["stub"]["ad-planes"]))
    model = load_adapter(req, _engine_config(vstore), _linear)
    assert model.id == 7 and len(model.loras) == 2 * 7  # 2 layers x 7 Linear weights
    q = model.loras["model.layers.0.self_attn.q_proj"]
    assert q.lora_a.dtype == torch.int32 and tuple(q.lora_a.shape) == (2, 128, 4)  # P=2 slots, K=128: 4 words
    assert q.lora_b.dtype == torch.float32 and tuple(q.lora_b.shape) == (2, 128, 1) and q.lora_b.abs().min() > 0
    one = load_adapter(LoRARequest("ad-sign1", 8, str(vstore["stub"]["ad-sign1"])), _engine_config(vstore), _linear)
    b = one.loras["model.layers.1.mlp.down_proj"].lora_b
    assert (b[1] == 0).all() and (b[0] == b[0, 0, 0]).all()  # one plane, one scale per matrix, padded to P=2
    with pytest.raises(AdapterError, match="it changes 4 tensor\\(s\\) a LoRA slot cannot carry") as exc:
        load_adapter(LoRARequest("ft-sign1", 9, str(vstore["stub"]["ft-sign1"])), _engine_config(vstore), _linear)
    assert "deltahub serve ft-sign1 --engine vllm" in exc.value.hint
    with pytest.raises(AdapterError, match="carries no adapter for 2 of its Linear layers, e.g. .*v_proj"):  # no v_proj
        load_adapter(req, _engine_config(vstore), lambda m: None if m.endswith("v_proj") else m)
    other = SimpleNamespace(quantization_config={**_engine_config(vstore).quantization_config, "home": "/elsewhere"})
    with pytest.raises(AdapterError, match="prepared from .*, this engine's base from /elsewhere"):
        load_adapter(req, other, _linear)
    with pytest.raises(AdapterError, match="serves a fine-tune, not a base"):
        load_adapter(req, _engine_config(vstore, "ft-planes"), _linear)
    with pytest.raises(AdapterError, match="does not serve a deltahub base"):
        load_adapter(req, SimpleNamespace(), _linear)
    one_plane = SimpleNamespace(quantization_config={**_engine_config(vstore).quantization_config, "adapter_planes": 1})
    with pytest.raises(AdapterError, match="2 sign plane") as exc:
        load_adapter(req, one_plane, _linear)
    assert "--adapter-planes 2" in exc.value.hint


def test_p1_patched_load_adapter_sends_other_folders_to_vllm(vstore, tmp_path, monkeypatch):
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import WorkerLoRAManager

    from deltahub.integrations.vllm import lora

    lora.install_lora_patches()
    patched = WorkerLoRAManager._load_adapter
    assert patched.__wrapped__ is not patched  # vLLM's own, kept for PEFT folders
    calls = []
    assert patched.__wrapped__ is lora._vllm_load_adapter
    monkeypatch.setattr(lora, "_vllm_load_adapter", lambda self, r: calls.append(r.lora_path) or "peft")
    wrappers = {f"model.layers.{i}.{m}": object.__new__(type("W", (lora.DeltaSlots,), {}))
                for i in range(2) for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    mgr = SimpleNamespace(modules=wrappers, packed_modules_mapping={"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                                    "gate_up_proj": ["gate_proj", "up_proj"]},
                          model=SimpleNamespace(config=_engine_config(vstore)))
    fake = SimpleNamespace(_adapter_manager=mgr, embedding_modules={"embed_tokens": "input_embeddings"})
    peft = tmp_path / "peft"
    peft.mkdir()
    assert patched(fake, LoRARequest("p", 1, str(peft))) == "peft" and calls == [str(peft)]
    model = patched(fake, LoRARequest("ad-sign1", 2, str(vstore["stub"]["ad-sign1"])))
    assert sorted({m.rpartition(".")[2] for m in model.loras}) == sorted(LINEAR) and calls == [str(peft)]


# ---------------------------------------------------------------------------------------- P2
class _Punica:
    """The one thing a wrapper reads of vLLM's punica wrapper here: the slot of every token."""

    def __init__(self, slots: list[int]) -> None:
        self.token_lora_indices = torch.tensor(slots)

    def add_lora_linear(self, y, *args, **kwargs):  # no PEFT adapter in these slots
        return y


def test_p2_wrappers_carry_per_slot_deltas_and_leave_base_rows_alone(one_rank, vstore):
    from vllm.config.lora import LoRAConfig
    from vllm.lora.request import LoRARequest
    from vllm.lora.utils import _all_lora_classes, from_layer
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from deltahub.integrations.vllm import lora

    lora.install_lora_patches()
    assert any(issubclass(c, lora.DeltaSlots) for c in _all_lora_classes)
    cfg = _engine_config(vstore)
    base = QKVParallelLinear(128, 32, 4, 2, bias=False, prefix="model.layers.0.self_attn.qkv_proj",
                             params_dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(base.weight.shape, generator=gen) * 0.1
    with torch.no_grad():
        base.weight.copy_(w0)
    base.quant_method.process_weights_after_loading(base)  # (vLLM's CPU GEMM takes the weight over)
    layer = from_layer(base, 2, LoRAConfig(max_lora_rank=8, max_loras=2, lora_dtype=torch.float32), ["q_proj", "k_proj", "v_proj"], cfg)
    assert isinstance(layer, lora.DeltaSlots) and tuple(layer.dh_packed.shape) == (2, 2, 256, 4)
    ads = {n: lora.load_adapter(LoRARequest(n, i + 1, str(vstore["stub"][n])), cfg, _linear)
           for i, n in enumerate(["ad-sign1", "ad-planes"])}
    deltas = {}
    for slot, (name, model) in enumerate(ads.items()):
        parts = [model.loras[f"model.layers.0.self_attn.{s}"] for s in ("q_proj", "k_proj", "v_proj")]
        layer.set_lora(slot, [p.lora_a for p in parts], [p.lora_b for p in parts])
        from deltahub.kernels import unpack_signs_dense

        deltas[slot] = torch.cat([sum(unpack_signs_dense(p.lora_a[i], 128).float() * p.lora_b[i]
                                      for i in range(2)) for p in parts])
    x = torch.randn(5, 128, generator=gen)
    slots = [-1, 0, 1, 0, -1]
    layer.set_mapping(_Punica(slots))
    y = layer.apply(x)
    for row, s in enumerate(slots):
        w = w0 if s < 0 else w0 + deltas[s]
        assert torch.allclose(y[row], x[row] @ w.T, atol=1e-4), (row, s)
    layer.reset_lora(0)
    y2 = layer.apply(x)
    assert torch.allclose(y2[1], x[1] @ w0.T, atol=1e-4) and torch.allclose(y2[2], y[2])
    layer.set_lora(1, [torch.zeros(8, 128)] * 3, [torch.zeros(n, 8) for n in (128, 64, 64)])  # a PEFT (float) adapter
    assert layer.dh_active.tolist() == [False, False]


# ---------------------------------------------------------------------------------------- resolver
def test_the_resolver_finds_fine_tunes_of_the_served_base_by_name(vstore, tmp_path, monkeypatch):
    from deltahub.integrations.vllm.lora import DeltahubResolver

    monkeypatch.setenv("DELTAHUB_VLLM_ADAPTERS", str(tmp_path / "adapters"))
    r = DeltahubResolver()
    base = str(vstore["stub"]["base"])
    req = asyncio.run(r.resolve_lora(base, "ad-sign1"))
    assert req.lora_name == "ad-sign1" and Path(req.lora_path).parent == tmp_path / "adapters"
    assert (Path(req.lora_path) / "deltahub.json").is_file()
    assert asyncio.run(r.resolve_lora(base, "ad-sign1")).lora_path == req.lora_path  # reused
    assert asyncio.run(r.resolve_lora(base, "nope")) is None
    assert asyncio.run(r.resolve_lora(base, "../../etc")) is None
    assert asyncio.run(r.resolve_lora(base, "base")) is None  # the base itself is no adapter
    assert asyncio.run(r.resolve_lora(str(tmp_path), "ad-sign1")) is None  # not a deltahub engine


def test_the_resolver_pulls_a_hub_repo_id_when_asked(vstore, tmp_path, monkeypatch, hub_server):
    """``deltahub serve --engine vllm --pull``: a fine-tune of the served base that the store lacks
    is pulled from the Hub by its repo id (the project's own test Hub), then served as an adapter."""
    import deltahub
    from hub_fixtures import FAKE_USER, plant_repo

    from deltahub.integrations.vllm.lora import DeltahubResolver, load_adapter

    repo = f"{FAKE_USER}/ad-planes-delta"
    plant_repo(hub_server, "someone/tiny-base", "b" * 40)
    with deltahub.Store(vstore["home"]) as store:
        store.push("ad-planes", repo, base_repo=f"someone/tiny-base@{'b' * 40}")
    fresh = tmp_path / "fresh"
    with deltahub.Store(fresh) as store:
        store.add(vstore["root"] / "ck" / "base", name="base")
        base = store.vllm_prepare("base", tmp_path / "base-stub", dtype="float32", adapter_planes=2).out_dir
    monkeypatch.setenv("DELTAHUB_VLLM_ADAPTERS", str(tmp_path / "adapters"))
    r = DeltahubResolver()
    assert asyncio.run(r.resolve_lora(str(base), repo)) is None  # not without --pull
    monkeypatch.setenv("DELTAHUB_VLLM_PULL", "1")
    req = asyncio.run(r.resolve_lora(str(base), repo))
    assert req is not None and req.lora_name == repo
    model = load_adapter(req, SimpleNamespace(quantization_config=__import__("json").loads(
        (base / "config.json").read_text())["quantization_config"]), _linear)
    assert len(model.loras) == 14
    for hostile in (f"{FAKE_USER}/missing", "../../etc/passwd", "a" * 300):
        assert asyncio.run(r.resolve_lora(str(base), hostile)) is None


def test_an_only_deltahub_engine_refuses_peft_folders(tmp_path, monkeypatch):
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import WorkerLoRAManager

    from deltahub.integrations.vllm import lora

    lora.install_lora_patches()
    monkeypatch.setenv("DELTAHUB_VLLM_ONLY_DELTAHUB_ADAPTERS", "1")
    monkeypatch.setattr(lora, "_vllm_load_adapter", lambda self, r: pytest.fail("vLLM's loader was reached"))
    with pytest.raises(lora.AdapterError, match="deltahub adapters only"):
        WorkerLoRAManager._load_adapter(SimpleNamespace(), LoRARequest("p", 1, str(tmp_path)))


# ---------------------------------------------------------------------------------------- end to end
def test_mixed_batches_equal_each_model_alone_with_on_demand_loads_and_private_prefix_caches(vstore, tmp_path):
    stub, want = vstore["stub"], vstore["want"]

    def req(name: str, i: int):
        return None if name == "base" else [name, i, str(stub[name])]

    ids = {"ad-sign1": 1, "ad-planes": 2, "ad-matrix": 3, "ft-sign1": 4}
    long = " ".join(f"w{i}" for i in range(3, 80))  # two full 32-token blocks
    batches = [
        {"prompts": [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]],  # base, two fine-tunes: one forward
         "loras": [req("base", 0), req("ad-sign1", 1), req("ad-planes", 2), req("ad-sign1", 1)]},
        {"prompts": [PROMPTS[1], PROMPTS[0]], "loras": [req("ad-matrix", 3), req("base", 0)]},  # loads, evicts
        {"prompts": [PROMPTS[2]], "loras": [req("ad-planes", 2)]},  # back after eviction
        {"prompts": [long], "loras": [req("base", 0)]},
        {"prompts": [long, long], "loras": [req("ad-sign1", 1), req("base", 0)]},
        {"prompts": [PROMPTS[0]], "loras": [req("ft-sign1", ids["ft-sign1"])]},  # refused
    ]
    run, = run_engines(tmp_path, [{"model": str(stub["base"]), "max_tokens": MAX_TOKENS, "batches": batches,
                                   "engine": {"enable_lora": True, "max_loras": 2, "max_cpu_loras": 2,
                                              "max_lora_rank": 8, "enable_prefix_caching": True,
                                              "block_size": 32}}])
    assert "error" not in run, run.get("error")
    tokens, cached, errors = run["tokens"], run["cached"], run["errors"]
    assert errors[:5] == [None] * 5, errors
    assert tokens[0] == [want["base"][0], want["ad-sign1"][0], want["ad-planes"][1], want["ad-sign1"][2]]
    assert tokens[1] == [want["ad-matrix"][1], want["base"][0]]
    assert tokens[2] == [want["ad-planes"][2]]
    assert len({str(want[n][0]) for n in ("base", "ad-sign1", "ad-planes")}) == 3  # the models differ
    # the long prompt's blocks are cached under the base: the fine-tune reuses none, the base all
    assert cached[4][0] == 0 and cached[4][1] >= 64, cached
    assert "ft-sign1" in errors[5] and "cannot be served as an adapter" in errors[5]
