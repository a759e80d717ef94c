"""DeltaLinear / DeltaEmbedding on the CPU torch path: values, gradients, memory bound, backend log."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deltahub.codec import CodecError, decode_sign1, pack_signs, unpack_signs
from deltahub.runtime import DeltaEmbedding, DeltaLinear, reset_backend_choice, signs
from deltahub.runtime.backend import FALLBACK_MESSAGE, Backend, choose_backend
from deltahub.runtime.patch import transpose_packed

SHAPES = [(7, 45), (33, 88), (1, 1), (64, 32), (5, 65), (40, 100)]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


def _case(n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(dtype)
    delta = torch.randn(n, k, generator=gen)
    packed = pack_signs(delta)
    s = unpack_signs(packed, k)  # fp32 ±1
    bias = torch.randn(n, generator=gen).to(dtype)
    return w, packed, s, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_forward_matches_dense(n, k, dtype):
    w, packed, s, bias = _case(n, k, dtype=dtype)
    scale = 0.0371
    mod = DeltaLinear(w, packed, scale, bias=bias)
    for lead in [(3,), (2, 5), ()]:
        x = torch.randn(*lead, k).to(dtype)
        y = mod(x)
        assert y.dtype == dtype and y.shape == (*lead, n)
        ref = x.double() @ (w.double() + scale * s.double()).T + bias.double()
        atol, rtol = TOL[dtype]
        scale_ref = ref.abs().max().item() + 1
        assert torch.allclose(y.double(), ref, atol=atol * scale_ref, rtol=rtol), (y.double() - ref).abs().max()


def test_forward_differs_without_the_delta():
    """The check above can fail: the delta's contribution is much larger than the tolerance."""
    w, packed, s, _ = _case(33, 88)
    x = torch.randn(4, 88)
    y = DeltaLinear(w, packed, 0.05)(x)
    assert (y - x @ w.T).abs().max() > 100 * TOL[torch.float32][0]


@pytest.mark.parametrize("n,k", [(7, 45), (40, 100)])
def test_gradients_match_autograd_through_dense(n, k):
    w, packed, s, bias = _case(n, k, seed=3)
    mod = DeltaLinear(w, packed, 0.02, bias=bias, trainable_scale=True)
    x = torch.randn(2, 6, k, requires_grad=True)
    g = torch.randn(2, 6, n)
    (mod(x) * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    s_ref = torch.tensor(0.02, requires_grad=True)
    ((x_ref @ (w + s_ref * s).T + bias) * g).sum().backward()

    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(mod.scale.grad, s_ref.grad, rtol=1e-5)
    assert mod.scale.grad.dtype == torch.float32 and mod.scale.grad.shape == ()
    assert mod.weight.grad is None and mod.bias.grad is None
    assert not mod.weight.requires_grad and not mod.bias.requires_grad and not mod.packed.requires_grad


def test_scale_parameter_and_frozen_by_default():
    w, packed, _, _ = _case(7, 45)
    mod = DeltaLinear(w, packed, torch.tensor([0.5]))
    assert isinstance(mod.scale, torch.nn.Parameter)
    assert mod.scale.shape == () and mod.scale.dtype == torch.float32 and not mod.scale.requires_grad
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == []
    x = torch.randn(3, 45, requires_grad=True)
    mod(x).sum().backward()  # x still gets a gradient
    assert x.grad is not None and mod.scale.grad is None
    trainable = DeltaLinear(w, packed, 0.5, trainable_scale=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == ["delta.scale"]


def test_half_precision_cast_keeps_the_scale_fp32():
    w, packed, _, _ = _case(7, 45)
    scale = 0.123456789
    mod = DeltaLinear(w, packed, scale).to(torch.bfloat16)
    assert mod.weight.dtype == torch.bfloat16
    assert mod.scale.dtype == torch.float32 and mod.scale.item() == torch.tensor(scale).item()
    assert mod.packed.dtype == torch.int32
    mod.half()
    assert mod.weight.dtype == torch.float16 and mod.scale.dtype == torch.float32


def test_from_linear_shares_the_base_weight():
    lin = torch.nn.Linear(45, 7)
    packed = pack_signs(torch.randn(7, 45))
    mod = DeltaLinear.from_linear(lin, packed, 0.1)
    assert mod.weight.data_ptr() == lin.weight.data_ptr() and mod.bias.data_ptr() == lin.bias.data_ptr()
    assert (mod.in_features, mod.out_features) == (45, 7)


def test_bad_inputs_are_refused():
    w, packed, _, _ = _case(7, 45)
    with pytest.raises(CodecError, match="int32"):
        DeltaLinear(w, packed[:, :1].contiguous(), 0.1)
    with pytest.raises(CodecError, match="int32"):
        DeltaLinear(w, packed.to(torch.int64), 0.1)
    with pytest.raises(CodecError, match="bias"):
        DeltaLinear(w, packed, 0.1, bias=torch.zeros(8))
    with pytest.raises(CodecError, match="2-D"):
        DeltaLinear(w[0], packed, 0.1)
    with pytest.raises(CodecError, match="inputs"):
        DeltaLinear(w, packed, 0.1)(torch.randn(3, 44))


class _Shapes(TorchDispatchMode):
    """Records the size of every tensor an op creates in new memory (views are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tree_flatten((args, kwargs))[0]
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.numels.append((str(func), t.numel()))
        return out


def test_no_full_delta_is_ever_built(monkeypatch):
    """Forward and backward create no tensor as large as the [N, K] matrix, and the unpacked sign
    chunks stay within the (lowered) chunk budget; the results are still right."""
    n, k = 96, 200
    w, packed, s, _ = _case(n, k, seed=5)
    monkeypatch.setattr(signs, "CHUNK_BYTES", 8 * 1024)
    seen: list[tuple[int, int]] = []
    real = signs.unpack_rows

    def spy(packed_rows, kk, dtype):
        out = real(packed_rows, kk, dtype)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(signs, "unpack_rows", spy)
    mod = DeltaLinear(w, packed, 0.03, trainable_scale=True)
    x = torch.randn(4, k, requires_grad=True)
    with _Shapes() as rec:
        y = mod(x)
        y.sum().backward()
    biggest = max(numel for _op, numel in rec.numels)
    assert biggest < n * k / 4, sorted(rec.numels, key=lambda t: -t[1])[:3]
    budget_rows = signs.rows_per_chunk(k, 4)
    assert seen and max(r for r, _ in seen) <= budget_rows < n
    assert torch.allclose(y, x @ (w + 0.03 * s).T, atol=1e-4)
    # The same recorder does see a full-size tensor when one is built (so the check can fail).
    with _Shapes() as rec2:
        _ = x.detach() @ (w + 0.03 * s).T
    assert max(numel for _op, numel in rec2.numels) >= n * k


def test_torch_fallback_is_chosen_on_cpu_and_logged(caplog):
    reset_backend_choice()
    w, packed, _, _ = _case(7, 45)
    with caplog.at_level(logging.INFO, logger="deltahub.runtime.backend"):
        DeltaLinear(w, packed, 0.1)(torch.randn(2, 45))
        DeltaLinear(w, packed, 0.1)(torch.randn(2, 45))
    msgs = [r.getMessage() for r in caplog.records if r.name == "deltahub.runtime.backend"]
    assert len(msgs) == 1 and FALLBACK_MESSAGE in msgs[0]
    assert choose_backend("cpu") is Backend.TORCH


def test_delta_embedding_equals_materialized_rows():
    v, h = 50, 45
    w, packed, _, _ = _case(v, h, seed=7)
    scale = 0.0123
    emb = DeltaEmbedding(w, packed, scale, padding_idx=0)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    full = decode_sign1(w, packed, scale, torch.float32)
    assert torch.equal(emb(ids), full[ids])  # bit for bit: the same fp32 formula per row
    emb16 = DeltaEmbedding(w.to(torch.bfloat16), packed, scale)
    full16 = decode_sign1(w.to(torch.bfloat16), packed, scale, torch.bfloat16)
    assert torch.equal(emb16(ids), full16[ids])


def test_delta_embedding_scale_gradient():
    w, packed, s, _ = _case(20, 33, seed=9)
    emb = DeltaEmbedding(w, packed, 0.5, trainable_scale=True)
    ids = torch.tensor([1, 4, 4, 19])
    g = torch.randn(4, 33)
    (emb(ids) * g).sum().backward()
    assert torch.allclose(emb.scale.grad, (g * s[ids]).sum(), rtol=1e-5)
    assert emb.weight.grad is None


@pytest.mark.parametrize("r,c", [(45, 7), (88, 64), (1, 33), (100, 40), (64, 96)])
def test_transpose_packed(r, c, monkeypatch):
    monkeypatch.setattr(signs, "CHUNK_BYTES", 64)  # several row blocks
    delta = torch.randn(r, c)
    packed = pack_signs(delta)
    t = transpose_packed(packed, r, c)
    assert torch.equal(t, pack_signs(delta.t().contiguous()))


def test_runtime_imports_only_codec_and_kernels():
    """DESIGN.md layering: runtime -> {kernels, codec} (plus torch, transformers, numpy, stdlib)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "deltahub" / "runtime"
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    bad.append(f"{path.name}: relative import")
                elif node.module == "deltahub":  # from deltahub import kernels
                    mods = [f"deltahub.{a.name}" for a in node.names]
                elif node.module:
                    mods = [node.module]
            allowed = ("deltahub.codec", "deltahub.kernels", "deltahub.runtime")
            for m in mods:
                if m.split(".")[0] == "deltahub" and not any(m == a or m.startswith(a + ".") for a in allowed):
                    bad.append(f"{path.name}: {m}")
    assert not bad, bad
    assert len(list(root.glob("*.py"))) >= 5
