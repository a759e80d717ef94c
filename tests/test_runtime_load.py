"""load_model(mode="delta"): logits equal the materialized model's, memory ≈ base + packed bits."""

from __future__ import annotations

import logging

import pytest
import torch

import deltahub
from deltahub.errors import InputError
from deltahub.runtime import DeltaEmbedding, DeltaLinear, reset_backend_choice
from deltahub.runtime.backend import FALLBACK_MESSAGE


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(seed))


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("embeddings", ["sign1", "dense"])
def test_delta_mode_logits_equal_materialized(store, model_dirs, arch, embeddings):
    store.add(model_dirs[arch]["base"], name="base")
    store.compress(model_dirs[arch]["ft"], base="base", name="ft", embeddings=embeddings)
    full = store.load_model("ft")
    delta = store.load_model("ft", mode="delta")
    with torch.no_grad():
        want = full(_ids()).logits
        got = delta(_ids()).logits
        base_logits = store.load_model("base")(_ids()).logits
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert (want - base_logits).abs().max() > 1e-3  # the fine-tune differs from the base

    manifest = store._ctx.resolve("ft").manifest
    sign1 = {n for n, rec in manifest.tensors.items() if rec.codec == "sign1"}
    mods = {n for n, m in delta.named_modules(remove_duplicate=False) if isinstance(m, DeltaLinear | DeltaEmbedding)}
    tied = {"lm_head"} if arch == "gpt2" and embeddings == "sign1" else set()
    assert mods == {n.rpartition(".")[0] for n in sign1} | tied
    assert len(sign1) >= 2 * 4 + (0 if embeddings == "dense" else 1)
    # memory: the base model's bytes plus the packed bits (1/32 of fp32), not two models
    assert _storage_bytes(delta) < _storage_bytes(full) * (1 + 1 / 16)


def test_tied_lm_head_shares_weight_signs_and_scale(store, model_dirs):
    store.add(model_dirs["gpt2"]["base"], name="base")
    store.compress(model_dirs["gpt2"]["ft"], base="base", name="ft", embeddings="sign1")
    model = store.load_model("ft", mode="delta", trainable_scales=True)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, DeltaEmbedding) and isinstance(head, DeltaLinear)
    assert head.weight is wte.weight and head.packed is wte.packed and head.scale is wte.scale
    # GPT-2 Conv1D layers became DeltaLinear over [out, in] weights with re-packed signs
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, DeltaLinear) and c_fc.weight.shape == (4 * 48, 48)


def test_trainable_scales_get_the_only_gradients(store, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    model = store.load_model("ft", mode="delta", trainable_scales=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale") for n in trainable)
    model.train()
    model(_ids()).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable) and all(torch.isfinite(g) and g != 0 for g in grads.values())
    frozen = store.load_model("ft", mode="delta")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_delta_mode_bf16(store, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    full = store.load_model("ft", dtype="bfloat16")
    delta = store.load_model("ft", dtype="bfloat16", mode="delta")
    assert next(delta.parameters()).dtype == torch.bfloat16
    assert all(m.scale.dtype == torch.float32 for m in delta.modules() if isinstance(m, DeltaLinear))
    with torch.no_grad():
        want, got = full(_ids()).logits.float(), delta(_ids()).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_base_in_delta_mode_loads_normally(store, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    model = store.load_model("base", mode="delta")
    assert not any(isinstance(m, DeltaLinear | DeltaEmbedding) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, store.load_model("base")(_ids()).logits)


def test_module_level_api_and_bad_mode(store, model_dirs, home):
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    model = deltahub.load_model("ft", mode="delta", home=home)
    assert any(isinstance(m, DeltaLinear) for m in model.modules())
    with pytest.raises(InputError, match="load mode"):
        store.load_model("ft", mode="packed")


def test_delta_mode_logs_the_torch_fallback(store, model_dirs, caplog):
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    reset_backend_choice()
    with caplog.at_level(logging.INFO, logger="deltahub"):
        store.load_model("ft", mode="delta")
    assert any(FALLBACK_MESSAGE in r.getMessage() for r in caplog.records)
