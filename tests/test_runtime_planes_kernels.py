"""The runtime's kernel path for ``planes`` deltas, without a GPU: the Triton backend is forced on the
CPU and the kernels' plain-torch references stand in for the Triton kernels (the kernels themselves
are checked against those references under the interpreter: tests/kernels_planes_interp_cases.py).
What is checked is the glue: which kernel a delta-mode model and a multi-tenant model call, with
which stacked planes, scales and tenant ids, and that the outputs equal the torch path's."""

from __future__ import annotations

import pytest
import torch

from deltahub import kernels
from deltahub.codec.planes_apply import PlanesStack, PlanesStacks
from deltahub.runtime import backend as backend_mod
from deltahub.runtime.backend import Backend
from deltahub.runtime.multi_tenant import MultiTenantLinear

TENANTS = {  # name -> codec options: two layouts share a stack, a third has its own
    "rows2": {"planes": 2, "scales": "row"},
    "group3": {"planes": 3, "scales": "group", "group_size": 32},
    "rows2b": {"planes": 2, "scales": "row"},
}


@pytest.fixture
def planes_store(store, model_dirs, tmp_path):
    from conftest import fine_tune_like, make_model, save_checkpoint

    store.add(model_dirs["llama"]["base"], name="base")
    for i, (name, opts) in enumerate(TENANTS.items()):
        model = make_model("llama")
        fine_tune_like(model, seed=30 + i)
        store.compress(save_checkpoint(model, tmp_path / name), base="base", name=name, codec="planes", codec_options=opts)
    return store


@pytest.fixture
def forced_kernels(monkeypatch):
    """Force the Triton backend on the CPU with the references standing in; count the calls."""
    calls = {"planes": 0, "mt_planes": 0, "other": 0}

    def planes(x, packed, scales, weight=None, bias=None, *, group_size=None):
        calls["planes"] += 1
        assert packed.dim() == 3 and scales.dim() == 3 and scales.dtype == torch.float32
        return kernels.planes_matmul_ref(x, packed, scales, weight, bias, group_size=group_size)

    def mt_planes(x, weight, packed, scales, tenant, bias=None, *, group_size=None, validate=True, strategy="auto"):
        calls["mt_planes"] += 1
        assert packed.dim() == 4 and not validate
        return kernels.multi_tenant_planes_matmul_ref(x, weight, packed, scales, tenant, bias, group_size=group_size)

    def other(*args, **kwargs):
        calls["other"] += 1
        raise AssertionError("a sign1 kernel was called for planes deltas")

    monkeypatch.setattr(kernels, "planes_matmul", planes)
    monkeypatch.setattr(kernels, "multi_tenant_planes_matmul", mt_planes)
    monkeypatch.setattr(kernels, "sign_matmul", other)
    monkeypatch.setattr(kernels, "multi_tenant_sign_matmul", other)

    def use(kind: Backend) -> None:
        monkeypatch.setattr(backend_mod, "_chosen", {"cpu": kind})

    return calls, use


def test_delta_mode_uses_planes_matmul(planes_store, forced_kernels):
    calls, use = forced_kernels
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    for name in ("rows2", "group3"):
        model = planes_store.load_model(name, mode="delta")
        with torch.no_grad():
            use(Backend.TORCH)
            want = model(ids).logits
            before = calls["planes"]
            use(Backend.TRITON)
            got = model(ids).logits
            again = model(ids).logits  # second call: the planes' stacked view, no new copy
        assert calls["planes"] > before
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, (got - want).abs().max())
        assert torch.equal(got, again)
    assert calls["other"] == 0


def test_multi_tenant_uses_multi_tenant_planes_matmul(planes_store, forced_kernels):
    calls, use = forced_kernels
    names = list(TENANTS)
    use(Backend.TORCH)
    mt = planes_store.load_multi_tenant(names)
    linears = [m for m in mt.model.modules() if isinstance(m, MultiTenantLinear)]
    assert linears and all(len(m.stacks) == 1 and isinstance(m.stacks[0], PlanesStacks) for m in linears)
    parts = linears[0].stacks[0].parts
    assert [type(p) for p in parts] == [PlanesStack, PlanesStack] and [p.tenants for p in parts] == [[0, 2], [1]]
    rows = ["group3", "base", "rows2", "rows2b", "rows2", "group3"]
    ids = torch.randint(3, 128, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = mt(ids, rows).logits
        use(Backend.TRITON)
        got = mt(ids, rows).logits
    assert calls["mt_planes"] > 0 and calls["other"] == 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    with torch.no_grad():  # and each row is its fine-tune alone (torch path)
        use(Backend.TORCH)
        for i, name in enumerate(rows[:3]):
            alone = planes_store.load_model(name, mode="delta")(ids[i : i + 1]).logits[0]
            assert torch.allclose(got[i], alone, atol=1e-4, rtol=1e-4), name
