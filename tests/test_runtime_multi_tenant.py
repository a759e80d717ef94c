"""Multi-tenant serving: every row of a batch behaves exactly like its fine-tune run alone."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from conftest import fine_tune_like, make_model, save_checkpoint

import deltahub
from deltahub import kernels
from deltahub.errors import NameNotFoundError, WrongBaseError
from deltahub.runtime import DeltaLinear, reset_backend_choice
from deltahub.runtime import backend as backend_mod
from deltahub.runtime.backend import FALLBACK_MESSAGE, Backend
from deltahub.runtime.multi_tenant import MultiTenantLinear, MultiTenantModule, TenantError

N_TENANTS = 3


def _tenant_checkpoint(arch: str, i: int, path: Path) -> Path:
    """Fine-tune ``i`` of the fixture base: its own perturbation, and its own norm weights."""
    model = make_model(arch)
    fine_tune_like(model, seed=10 + i)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.1 * (i + 1))
    return save_checkpoint(model, path)


@pytest.fixture(scope="module")
def tenant_dirs(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("tenants")
    return {arch: [_tenant_checkpoint(arch, i, root / arch / f"ft{i}") for i in range(N_TENANTS)] for arch in ("llama", "gpt2")}


def _fill(store, model_dirs, tenant_dirs, arch: str, embeddings: str) -> list[str]:
    store.add(model_dirs[arch]["base"], name="base")
    names = []
    for i, path in enumerate(tenant_dirs[arch]):
        store.compress(path, base="base", name=f"ft{i}", embeddings=embeddings)
        names.append(f"ft{i}")
    return names


TENANTS = ["ft2", "base", "ft0", "ft1", "ft0"]


@pytest.mark.parametrize("embeddings", ["sign1", "dense"])
def test_each_row_equals_its_fine_tune_alone(store, model_dirs, tenant_dirs, arch, embeddings):
    names = _fill(store, model_dirs, tenant_dirs, arch, embeddings)
    mt = store.load_multi_tenant(names)
    assert mt.names == names and mt.base_names == ["base"]
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1)).repeat(len(TENANTS), 1)
    batch = mt(ids, TENANTS).logits
    alone: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in set(TENANTS):
        with torch.no_grad():
            alone[name] = (
                store.load_model(name, mode="delta")(ids[:1]).logits[0],
                store.load_model(name)(ids[:1]).logits[0],
            )
    for row, name in enumerate(TENANTS):
        alone_delta, alone_full = alone[name]
        assert torch.allclose(batch[row], alone_delta, atol=1e-5, rtol=1e-5), (name, (batch[row] - alone_delta).abs().max())
        assert torch.allclose(batch[row], alone_full, atol=2e-5, rtol=1e-4), (name, (batch[row] - alone_full).abs().max())
    # the rows really differ: same input, different tenants
    for a in range(4):
        for b in range(a + 1, 4):
            assert (batch[a] - batch[b]).abs().max() > 1e-3, (TENANTS[a], TENANTS[b])
    # per-tenant norms were made per row
    assert any(isinstance(m, MultiTenantModule) for m in mt.model.modules())
    assert any(isinstance(m, MultiTenantLinear) for m in mt.model.modules())


def test_generate_gives_the_same_tokens_as_alone(store, model_dirs, tenant_dirs, arch):
    names = _fill(store, model_dirs, tenant_dirs, arch, "sign1")
    mt = deltahub.load_multi_tenant(names, home=store.home)
    pairs = [("ft0", "w5 w6 w7 w8 w9"), ("ft1", "w10"), ("base", "w11 w12"), ("ft2", "w13 w14 w15"), ("ft1", "w20 w21 w22")]
    got = mt.generate_ids(pairs, max_new_tokens=6, min_new_tokens=6)
    texts = mt.generate(pairs, max_new_tokens=6, min_new_tokens=6)
    tok = store.load_tokenizer("base")
    models = {name: store.load_model(name, mode="delta") for name in {n for n, _ in pairs}}
    for (name, prompt), tokens, text in zip(pairs, got, texts):
        model = models[name]
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        alone = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert tokens == alone, (name, prompt)
        assert text == tok.decode(alone, skip_special_tokens=True)
    assert len({tuple(t) for t in got}) > 1


def test_delta_of_another_base_is_refused(store, model_dirs, tenant_dirs, tmp_path):
    names = _fill(store, model_dirs, tenant_dirs, "llama", "sign1")
    other = make_model("llama", seed=7)
    other_base = save_checkpoint(other, tmp_path / "other-base")
    ft = copy.deepcopy(other)
    fine_tune_like(ft, seed=3)
    store.add(other_base, name="other-base")
    store.compress(save_checkpoint(ft, tmp_path / "other-ft"), base="other-base", name="other-ft")
    with pytest.raises(WrongBaseError, match="other-ft.*another base"):
        store.load_multi_tenant(names + ["other-ft"])
    with pytest.raises(WrongBaseError):
        store.load_multi_tenant(["other-base", "ft0"])


def test_bad_names_and_missing_tenant_ids(store, model_dirs, tenant_dirs):
    names = _fill(store, model_dirs, tenant_dirs, "llama", "sign1")
    with pytest.raises(NameNotFoundError):
        store.load_multi_tenant(names + ["nope"])
    mt = store.load_multi_tenant(names[:2])
    with pytest.raises(NameNotFoundError, match="not served"):
        mt.generate([("ft2", "w1")])
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TenantError, match="no tenant ids"):
        mt.model(ids)
    with pytest.raises(TenantError, match="2 rows but 1"):
        mt(ids.repeat(2, 1), ["ft0"])


def test_memory_is_one_base_plus_packed_bits(store, model_dirs, tenant_dirs):
    names = _fill(store, model_dirs, tenant_dirs, "llama", "sign1")
    mt = store.load_multi_tenant(names)
    base = store.load_model("base")

    def nbytes(model):
        seen = {}
        for t in list(model.parameters()) + list(model.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    # one fp32 base + 3 × (1 bit per weight ≈ 1/32 of it) + per-tenant norm vectors
    assert nbytes(mt.model) < nbytes(base) * (1 + N_TENANTS / 32 + 0.05)


def test_torch_path_logged_and_kernel_glue(store, model_dirs, tenant_dirs, monkeypatch, caplog):
    """On the CPU the torch path is chosen and logged. The GPU code path (which ids reach the kernel,
    and how) is checked here by forcing the Triton backend with the kernels' plain-torch references
    standing in for the Triton kernels; running the real kernels needs a GPU."""
    names = _fill(store, model_dirs, tenant_dirs, "gpt2", "sign1")
    reset_backend_choice()
    with caplog.at_level(logging.INFO, logger="deltahub"):
        mt = store.load_multi_tenant(names)
    assert any(FALLBACK_MESSAGE in r.getMessage() for r in caplog.records)
    ids = torch.randint(3, 128, (len(TENANTS), 6), generator=torch.Generator().manual_seed(2))
    want = mt(ids, TENANTS).logits

    calls = {"mt": 0, "one": 0}

    def mt_ref(x, weight, packed, scales, tenant, bias=None, *, validate=True, strategy="auto"):
        calls["mt"] += 1
        return kernels.multi_tenant_sign_matmul_ref(x, weight, packed, scales, tenant, bias)

    def one_ref(x, packed, scale, weight=None, bias=None):
        calls["one"] += 1
        return kernels.sign_matmul_ref(x, packed, scale, weight, bias)

    monkeypatch.setattr(kernels, "multi_tenant_sign_matmul", mt_ref)
    monkeypatch.setattr(kernels, "sign_matmul", one_ref)
    monkeypatch.setattr(backend_mod, "_chosen", {"cpu": Backend.TRITON})
    got = mt(ids, TENANTS).logits
    assert calls["mt"] > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)

    delta = store.load_model("ft1", mode="delta")
    assert any(isinstance(m, DeltaLinear) for m in delta.modules())
    with torch.no_grad():
        via_kernel = delta(ids[:1]).logits
    assert calls["one"] > 0
    monkeypatch.setattr(backend_mod, "_chosen", {"cpu": Backend.TORCH})
    with torch.no_grad():
        assert torch.allclose(via_kernel, delta(ids[:1]).logits, atol=1e-5, rtol=1e-5)
