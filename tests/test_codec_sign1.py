"""Tests of deltahub.codec.sign1: BitDelta encode/decode and its statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codec import (
    CodecError,
    DeltaStats,
    decode_sign1,
    encode_sign1,
    fp32_scale,
    pack_signs,
    reference_decode_sign1,
)

SETTINGS = settings(deadline=None, max_examples=50)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

ks = st.one_of(st.sampled_from([1, 31, 32, 33, 64, 65]), st.integers(1, 160))
ns = st.one_of(st.just(1), st.integers(1, 12))


def make_pair(
    n: int, k: int, seed: int, base_dtype: torch.dtype, ft_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A base ``[n, k]`` and a fine-tuned copy with small deltas, ~10% left unchanged."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn((n, k), generator=gen).to(base_dtype)
    ft = base.float() + 0.02 * torch.randn((n, k), generator=gen)
    same = torch.rand((n, k), generator=gen) < 0.1
    ft = torch.where(same, base.float(), ft).to(ft_dtype)
    return base, ft


def ulp32(x: float) -> float:
    return float(np.spacing(np.float32(abs(x))))


# --- encode ------------------------------------------------------------------------------


@SETTINGS
@given(
    n=ns,
    k=ks,
    seed=st.integers(0, 2**31 - 1),
    base_dtype=st.sampled_from(DTYPES),
    ft_dtype=st.sampled_from(DTYPES),
)
def test_encode_matches_direct_computation(
    n: int, k: int, seed: int, base_dtype: torch.dtype, ft_dtype: torch.dtype
) -> None:
    base, ft = make_pair(n, k, seed, base_dtype, ft_dtype)
    enc = encode_sign1(base, ft)
    delta = ft.float() - base.float()  # fp32, as specified
    d64 = delta.double()

    assert torch.equal(enc.packed, pack_signs(delta))
    st_ = enc.stats
    assert st_.numel == n * k
    assert st_.abs_sum == pytest.approx(d64.abs().sum().item(), rel=1e-12, abs=1e-300)
    assert st_.delta_sq_sum == pytest.approx((d64**2).sum().item(), rel=1e-12, abs=1e-300)
    assert st_.base_sq_sum == pytest.approx((base.double() ** 2).sum().item(), rel=1e-12)

    mean_abs = d64.abs().mean().item()
    assert enc.scale == fp32_scale(enc.scale)  # exactly representable in fp32
    assert abs(enc.scale - mean_abs) <= ulp32(mean_abs)

    signs = torch.where(delta >= 0, 1.0, -1.0).double()
    dnorm = d64.norm().item()
    if dnorm == 0:
        assert enc.rel_recon_error == 0.0
    else:
        direct = (d64 - enc.scale * signs).norm().item() / dnorm
        assert enc.rel_recon_error == pytest.approx(direct, rel=1e-6, abs=1e-7)
    assert st_.rel_delta_norm == pytest.approx(dnorm / base.double().norm().item(), rel=1e-9)


@SETTINGS
@given(n=ns, k=ks, seed=st.integers(0, 2**31 - 1), chunk_bytes=st.sampled_from([1, 500, 4096]))
def test_encode_chunking_invariance(n: int, k: int, seed: int, chunk_bytes: int) -> None:
    base, ft = make_pair(n, k, seed, torch.bfloat16, torch.float16)
    a = encode_sign1(base, ft)
    b = encode_sign1(base, ft, chunk_bytes=chunk_bytes)
    assert torch.equal(a.packed, b.packed)
    assert a.scale == b.scale
    assert a.stats == b.stats  # exact: per-row sums added with math.fsum
    assert a.rel_recon_error == b.rel_recon_error


def test_encode_long_rows_chunking_invariance() -> None:
    # a one-row chunk of a long row must be reduced like a row of a multi-row chunk
    base, ft = make_pair(3, 70_000, 7, torch.float32, torch.float32)
    a = encode_sign1(base, ft)
    b = encode_sign1(base, ft, chunk_bytes=1)
    assert a.stats == b.stats and a.scale == b.scale and torch.equal(a.packed, b.packed)


def test_encode_identical_tensors() -> None:
    base = torch.randn(4, 40).to(torch.bfloat16)
    enc = encode_sign1(base, base.clone())
    assert enc.scale == 0.0
    assert enc.stats.abs_sum == 0.0 and enc.stats.delta_sq_sum == 0.0
    assert enc.rel_recon_error == 0.0
    assert enc.stats.rel_delta_norm == 0.0
    assert enc.packed[:, 0].tolist() == [-1] * 4  # 32 bits of +1
    assert enc.packed[:, 1].tolist() == [0xFF] * 4  # 8 bits of +1, padding zero
    assert torch.equal(decode_sign1(base, enc.packed, enc.scale, torch.bfloat16), base)


def test_encode_empty() -> None:
    enc = encode_sign1(torch.zeros(0, 5), torch.zeros(0, 5))
    assert enc.packed.shape == (0, 1) and enc.scale == 0.0 and enc.stats.numel == 0


def test_encode_rejects_bad_input() -> None:
    base = torch.zeros(3, 4)
    with pytest.raises(CodecError, match="shape mismatch"):
        encode_sign1(base, torch.zeros(4, 3))
    with pytest.raises(CodecError, match="2-D"):
        encode_sign1(torch.zeros(12), torch.zeros(12))
    with pytest.raises(CodecError, match="dtype|fp32"):
        encode_sign1(base.int(), base.int())
    bad = base.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(CodecError, match=r"NaN.*\[2, 1\]"):
        encode_sign1(base, bad)
    with pytest.raises(CodecError, match=r"NaN.*\[2, 1\]"):
        encode_sign1(base, bad, chunk_bytes=1)
    inf = base.clone()
    inf[1, 3] = float("inf")
    with pytest.raises(CodecError, match=r"Inf.*\[1, 3\]"):
        encode_sign1(inf.half(), base)


def test_delta_stats_edge_cases() -> None:
    assert DeltaStats(4, 0.0, 0.0, 0.0).rel_delta_norm == 0.0
    assert DeltaStats(4, 1.0, 1.0, 0.0).rel_delta_norm == math.inf
    assert DeltaStats(4, 0.0, 0.0, 1.0).rel_recon_error(0.5) == 0.0
    # delta = [3, -1]: mean|d| = 2, S = [+1, -1], residual [1, 1] -> sqrt(2)/sqrt(10)
    s = DeltaStats(2, 4.0, 10.0, 1.0)
    assert s.rel_recon_error(2.0) == pytest.approx(math.sqrt(2 / 10))
    # all |delta| equal: exact reconstruction, tiny negative err^2 clamped to 0
    assert DeltaStats(3, 0.3, 0.03, 1.0).rel_recon_error(0.1) == pytest.approx(0.0, abs=1e-7)


# --- decode ------------------------------------------------------------------------------


@SETTINGS
@given(
    n=ns,
    k=ks,
    seed=st.integers(0, 2**31 - 1),
    base_dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from(DTYPES),
    chunk_bytes=st.sampled_from([1, 300, 64 << 20]),
)
def test_decode_bit_identical_to_reference(
    n: int,
    k: int,
    seed: int,
    base_dtype: torch.dtype,
    out_dtype: torch.dtype,
    chunk_bytes: int,
) -> None:
    base, ft = make_pair(n, k, seed, base_dtype, out_dtype)
    enc = encode_sign1(base, ft)
    got = decode_sign1(base, enc.packed, enc.scale, out_dtype, chunk_bytes=chunk_bytes)
    ref = reference_decode_sign1(base, enc.packed, enc.scale, out_dtype)
    assert got.dtype == out_dtype and got.shape == (n, k)
    assert torch.equal(got, ref)
    # the formula written out independently of the library's unpacking
    delta = ft.float() - base.float()
    s = torch.tensor(enc.scale, dtype=torch.float32)
    naive = (base.to(torch.float32) + s * torch.where(delta >= 0, 1.0, -1.0)).to(out_dtype)
    assert torch.equal(got, naive)


@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_decode_larger_matrix(base_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    # several tiles, K not a multiple of 32, a scale that is not exactly fp32
    base, ft = make_pair(300, 1000, 11, base_dtype, out_dtype)
    enc = encode_sign1(base, ft)
    for scale in (enc.scale, 0.013, 1e-41, 3e4):  # 1e-41: subnormal in fp32
        ref = reference_decode_sign1(base, enc.packed, scale, out_dtype)
        assert torch.equal(decode_sign1(base, enc.packed, scale, out_dtype), ref)
        assert torch.equal(decode_sign1(base, enc.packed, scale, out_dtype, chunk_bytes=40_000), ref)
        assert torch.equal(ref, reference_decode_sign1(base, enc.packed, fp32_scale(scale), out_dtype))
    tiny = base * 1e-36  # subnormal sums in fp32
    ref = reference_decode_sign1(tiny, enc.packed, 1e-41, out_dtype)
    assert torch.equal(decode_sign1(tiny, enc.packed, 1e-41, out_dtype), ref)


def test_decode_non_contiguous_base() -> None:
    big = torch.randn(70, 50).half()
    base = big.t()  # [50, 70], not contiguous
    ft = (base.float() + 0.01 * torch.randn(50, 70)).half()
    enc = encode_sign1(base, ft)
    for out_dtype in DTYPES:
        assert torch.equal(
            decode_sign1(base, enc.packed, enc.scale, out_dtype),
            reference_decode_sign1(base.contiguous(), enc.packed, enc.scale, out_dtype),
        )


def test_decode_reduces_error() -> None:
    base, ft = make_pair(64, 256, 3, torch.float32, torch.float32)
    enc = encode_sign1(base, ft)
    out = decode_sign1(base, enc.packed, enc.scale, torch.float32)
    err = (out.double() - ft.double()).norm() / (ft.double() - base.double()).norm()
    assert err.item() == pytest.approx(enc.rel_recon_error, rel=1e-4)
    assert enc.rel_recon_error < 1.0


def test_decode_rejects_bad_input() -> None:
    base = torch.zeros(3, 40)
    packed = pack_signs(base)
    with pytest.raises(CodecError, match="ceil"):
        decode_sign1(base, packed[:, :1], 0.1, torch.float16)
    with pytest.raises(CodecError, match="rows"):
        decode_sign1(base, packed[:2], 0.1, torch.float16)
    with pytest.raises(CodecError, match="int32"):
        decode_sign1(base, packed.to(torch.int64), 0.1, torch.float16)
    with pytest.raises(CodecError, match="2-D"):
        decode_sign1(torch.zeros(120), packed, 0.1, torch.float16)
    with pytest.raises(CodecError, match="finite"):
        decode_sign1(base, packed, float("nan"), torch.float16)
    with pytest.raises(CodecError, match="finite"):
        decode_sign1(base, packed, 1e39, torch.float16)  # inf in fp32
    with pytest.raises(CodecError, match="out_dtype"):
        decode_sign1(base, packed, 0.1, torch.int8)


def test_decode_empty() -> None:
    out = decode_sign1(torch.zeros(0, 33), torch.zeros(0, 2, dtype=torch.int32), 1.0, torch.float16)
    assert out.shape == (0, 33) and out.dtype == torch.float16


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_decode_worker_threads(monkeypatch: pytest.MonkeyPatch, out_dtype: torch.dtype) -> None:
    import deltahub.codec.sign1 as sign1_mod

    monkeypatch.setattr(sign1_mod, "_workers", lambda n_blocks, numel, k, threads=None: min(3, n_blocks))
    base, ft = make_pair(257, 1000, 5, torch.bfloat16, out_dtype)
    enc = encode_sign1(base, ft)
    ref = reference_decode_sign1(base, enc.packed, enc.scale, out_dtype)
    assert torch.equal(decode_sign1(base, enc.packed, enc.scale, out_dtype), ref)
    assert torch.equal(decode_sign1(base, enc.packed, enc.scale, out_dtype, chunk_bytes=9000), ref)


def test_default_threading_large_matrix() -> None:
    base, ft = make_pair(1030, 1024, 9, torch.float16, torch.float16)  # > 2**20 elements
    enc = encode_sign1(base, ft)
    for threads in (1, 2, 4):
        other = encode_sign1(base, ft, threads=threads)
        assert torch.equal(other.packed, enc.packed) and other.stats == enc.stats
    ref = reference_decode_sign1(base, enc.packed, enc.scale, torch.float16)
    assert torch.equal(decode_sign1(base, enc.packed, enc.scale, torch.float16), ref)
    for threads in (1, 2, 4):
        assert torch.equal(decode_sign1(base, enc.packed, enc.scale, torch.float16, threads=threads), ref)


def test_decode_long_rows() -> None:
    base, ft = make_pair(3, 40_001, 13, torch.float16, torch.bfloat16)  # K > tile size
    enc = encode_sign1(base, ft)
    for out_dtype in DTYPES:
        ref = reference_decode_sign1(base, enc.packed, enc.scale, out_dtype)
        assert torch.equal(decode_sign1(base, enc.packed, enc.scale, out_dtype), ref)


def test_decode_requires_grad_inputs() -> None:
    base = torch.randn(40, 50, requires_grad=True)
    enc = encode_sign1(base.detach(), base.detach() + 0.01)
    out = decode_sign1(base, enc.packed, enc.scale, torch.float16)
    assert torch.equal(out, reference_decode_sign1(base.detach(), enc.packed, enc.scale, torch.float16))


def test_encode_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import deltahub.codec.sign1 as sign1_mod

    base, ft = make_pair(257, 1000, 17, torch.float16, torch.bfloat16)
    single = encode_sign1(base, ft)
    monkeypatch.setattr(sign1_mod, "_workers", lambda n_blocks, numel, k, threads=None: min(3, n_blocks))
    for chunk_bytes in (64 << 20, 50_000):
        multi = encode_sign1(base, ft, chunk_bytes=chunk_bytes)
        assert torch.equal(multi.packed, single.packed)
        assert multi.stats == single.stats and multi.scale == single.scale
    # the first non-finite value is reported, whichever thread finds one first
    bad = ft.clone()
    bad[250, 7] = float("inf")
    bad[100, 3] = float("nan")
    bad[40, 9] = float("-inf")
    for _ in range(3):
        with pytest.raises(CodecError, match=r"Inf in delta at \[40, 9\]"):
            encode_sign1(base, bad, chunk_bytes=50_000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_into_out_and_in_place(dtype: torch.dtype) -> None:
    base, ft = make_pair(50, 70, 21, dtype, dtype)
    enc = encode_sign1(base, ft)
    ref = reference_decode_sign1(base, enc.packed, enc.scale, dtype)
    buf = torch.full((50, 70), 7.0, dtype=dtype)
    assert decode_sign1(base, enc.packed, enc.scale, dtype, out=buf) is buf
    assert torch.equal(buf, ref)
    in_place = base.clone()
    decode_sign1(in_place, enc.packed, enc.scale, dtype, out=in_place, chunk_bytes=2000)
    assert torch.equal(in_place, ref)
    with pytest.raises(CodecError, match="out must be"):
        decode_sign1(base, enc.packed, enc.scale, dtype, out=torch.empty(50, 71, dtype=dtype))
    other = torch.float32 if dtype != torch.float32 else torch.float16
    with pytest.raises(CodecError, match="out must be"):
        decode_sign1(base, enc.packed, enc.scale, dtype, out=torch.empty(50, 70, dtype=other))
