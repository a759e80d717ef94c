"""Continuous batching across fine-tunes (issue 12, work in progress): requests that join and leave
between decode steps, each row with its own fine-tune, give exactly what each gives decoded alone."""

from __future__ import annotations

import copy

import pytest
import torch

from deltahub.runtime.batching import BatchEngine, Request
from deltahub.runtime.multi_tenant import TenantModel, TensorChange, install_tenants


def _models(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
        suffix = "proj.weight"
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=48, n_layer=2, n_head=4, n_positions=128))
        suffix = ("c_attn.weight", "c_fc.weight", "c_proj.weight")
    base.eval()
    params = dict(base.named_parameters())
    names = [n for n in params if n.endswith(suffix)]
    changes, refs = [], []
    for _ in range(2):
        change = {n: TensorChange(tensor=params[n].detach() + 0.05 * torch.randn_like(params[n])) for n in names}
        ref = copy.deepcopy(base)
        for n, ch in change.items():
            dict(ref.named_parameters())[n].data.copy_(ch.tensor)
        changes.append(change)
        refs.append(ref)
    mt = copy.deepcopy(base)
    return base, refs, TenantModel(mt, install_tenants(mt, changes), ["a", "b"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staggered_requests_over_tenants_equal_each_decoded_alone(arch):
    base, refs, tenants = _models(arch)
    engine = BatchEngine(tenants, max_batch=3)
    plan = [([1, 5, 9, 13, 17], 0, 0, 10), ([2, 4], 1, 0, 6), ([3, 7, 11, 19, 23, 29, 31], -1, 2, 9),
            ([1, 5, 9, 13, 17], 1, 4, 10), ([8, 8, 8], 0, 5, 4), ([9], -1, 5, 7)]
    want = []
    with torch.no_grad():
        for prompt, t, _at, n in plan:
            model = base if t < 0 else refs[t]
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(prompt):].tolist())
    requests: list[Request | None] = [None] * len(plan)
    step = 0
    while step < 6 or not engine.idle:
        for i, (prompt, t, at, n) in enumerate(plan):
            if at == step:
                requests[i] = engine.submit(Request(tenant=t, prompt=prompt, max_new_tokens=n))
        engine.step()
        assert len(engine.rows) <= 3
        step += 1
    for req, w in zip(requests, want, strict=True):
        assert req is not None and req.finish_reason == "length"
        assert req.tokens == w


def test_stop_tokens_cancel_and_sampling_are_per_request():
    _base, _refs, tenants = _models("llama")
    engine = BatchEngine(tenants, max_batch=4, context=64)
    greedy = engine.submit(Request(tenant=0, prompt=[1, 2, 3], max_new_tokens=8))
    engine.run_until_idle()
    stop = engine.submit(Request(tenant=0, prompt=[1, 2, 3], max_new_tokens=8, stop_ids=[greedy.tokens[2]]))
    a = engine.submit(Request(tenant=1, prompt=[4, 5], max_new_tokens=12, temperature=1.0, seed=7))
    b = engine.submit(Request(tenant=1, prompt=[4, 5], max_new_tokens=12, temperature=1.0, seed=7))
    c = engine.submit(Request(tenant=1, prompt=[4, 5], max_new_tokens=12, temperature=1.0, seed=8))
    gone = engine.submit(Request(tenant=-1, prompt=[6], max_new_tokens=50))
    engine.step()
    gone.cancelled = True
    engine.run_until_idle()
    assert stop.finish_reason == "stop" and stop.tokens == greedy.tokens[:2]
    assert a.tokens == b.tokens and a.tokens != c.tokens  # (seeded: same seed, same text)
    assert gone.finish_reason == "cancelled" and len(gone.tokens) < 50
    with pytest.raises(Exception, match="context"):
        engine.submit(Request(tenant=0, prompt=list(range(60)), max_new_tokens=10))


def test_engine_thread_serves_concurrent_submitters_and_drains_on_close():
    import threading

    base, refs, tenants = _models("llama")
    runner = __import__("deltahub.runtime.batching", fromlist=["EngineThread"]).EngineThread(BatchEngine(tenants, max_batch=2))
    prompts = [([1, 2, 3], 0), ([4, 5], 1), ([6], -1), ([7, 8, 9, 10], 0), ([11, 12], 1)]
    results: dict[int, list[int]] = {}
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def client(i: int) -> None:
        prompt, t = prompts[i]
        req = Request(tenant=t, prompt=prompt, max_new_tokens=6, on_token=streamed[i].append)
        runner.submit(req).wait(60)
        results[i] = req.tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    with torch.no_grad():
        for i, (prompt, t) in enumerate(prompts):
            model = base if t < 0 else refs[t]
            want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert results[i] == want[0, len(prompt):].tolist() == streamed[i]
    slow = Request(tenant=0, prompt=[1], max_new_tokens=40)
    done = runner.submit(slow)
    runner.close(cancel=True, timeout=30)
    assert done.is_set() and slow.finish_reason in ("cancelled", "length")
    with pytest.raises(Exception, match="shutting down"):
        runner.submit(Request(tenant=0, prompt=[1]))
