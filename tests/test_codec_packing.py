"""Tests of deltahub.codec.packing: sign packing layout v1 and the codec identifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codec import (
    CODEC_VERSIONS,
    PACKING_V1,
    Codec,
    CodecError,
    PackingLayout,
    pack_signs,
    packed_shape,
    unpack_signs,
)

SETTINGS = settings(deadline=None, max_examples=50)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

ks = st.one_of(st.sampled_from([1, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65, 96, 100]), st.integers(1, 200))
ns = st.one_of(st.just(1), st.integers(1, 9))


def random_delta(n: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[n, k]`` values with random signs, some exact +0.0 and -0.0."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn((n, k), generator=gen)
    pick = torch.rand((n, k), generator=gen)
    d[pick < 0.1] = 0.0
    d[(pick >= 0.1) & (pick < 0.2)] = -0.0
    return d.to(dtype)


def python_pack(delta: torch.Tensor) -> list[list[int]]:
    """Plain-python reference of layout v1: int32 words, bit j of word w = column 32w+j."""
    n, k = delta.shape
    words = (k + 31) // 32
    rows = []
    for r in range(n):
        row = []
        for w in range(words):
            word = 0
            for j in range(32):
                c = 32 * w + j
                if c < k and float(delta[r, c]) >= 0:  # -0.0 >= 0 is True
                    word |= 1 << j
            row.append(word - (1 << 32) if word >= 1 << 31 else word)  # as int32
        rows.append(row)
    return rows


def expected_signs(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(delta >= 0, 1.0, -1.0).to(dtype)


# --- layout ------------------------------------------------------------------------------


def test_known_row_bit_layout() -> None:
    k = 40
    delta = -torch.ones((2, k))
    for c in (0, 3, 31, 32, 39):
        delta[0, c] = 0.5
    delta[1, 5] = 0.0  # zero delta -> +1
    delta[1, 6] = -0.0  # negative zero -> +1 as well
    packed = pack_signs(delta)
    assert packed.dtype == torch.int32
    assert packed.shape == (2, 2)
    word0 = (1 << 0) | (1 << 3) | (1 << 31)
    assert packed[0, 0].item() == word0 - (1 << 32)  # bit 31 set: negative as int32
    assert packed[0, 1].item() == (1 << 0) | (1 << 7)  # columns 32 and 39
    assert packed[1].tolist() == [(1 << 5) | (1 << 6), 0]
    # byte view: byte b holds columns 8b..8b+7, column 8b+i at bit i
    assert packed[0].view(torch.uint8).tolist() == [0b00001001, 0, 0, 0b10000000, 0b10000001, 0, 0, 0]


def test_nan_gets_bit_zero() -> None:
    delta = torch.tensor([[float("nan"), 1.0, float("-inf"), float("inf")]])
    assert packed_bits_as_list(pack_signs(delta), 4) == [[0, 1, 0, 1]]


def packed_bits_as_list(packed: torch.Tensor, k: int) -> list[list[int]]:
    by = packed.view(torch.uint8).numpy()
    return np.unpackbits(by, axis=-1, bitorder="little")[:, :k].astype(int).tolist()


@SETTINGS
@given(n=ns, k=ks, seed=st.integers(0, 2**31 - 1))
def test_matches_python_reference(n: int, k: int, seed: int) -> None:
    delta = random_delta(n, k, seed)
    assert pack_signs(delta).tolist() == python_pack(delta)


@SETTINGS
@given(n=ns, k=ks, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(FLOAT_DTYPES))
def test_matches_numpy_packbits_little(n: int, k: int, seed: int, dtype: torch.dtype) -> None:
    delta = random_delta(n, k, seed, dtype)
    packed = pack_signs(delta)
    assert packed.shape == packed_shape(n, k)
    bits = (delta >= 0).numpy()
    padded = np.zeros((n, packed.shape[1] * 32), dtype=bool)
    padded[:, :k] = bits
    want = np.packbits(padded, axis=-1, bitorder="little")
    assert np.array_equal(packed.view(torch.uint8).numpy(), want)


@SETTINGS
@given(
    n=ns,
    k=ks,
    seed=st.integers(0, 2**31 - 1),
    in_dtype=st.sampled_from(FLOAT_DTYPES),
    out_dtype=st.sampled_from(FLOAT_DTYPES),
    chunk_bytes=st.sampled_from([1, 100, 64 << 20]),
)
def test_round_trip(
    n: int, k: int, seed: int, in_dtype: torch.dtype, out_dtype: torch.dtype, chunk_bytes: int
) -> None:
    delta = random_delta(n, k, seed, in_dtype)
    packed = pack_signs(delta, chunk_bytes=chunk_bytes)
    assert torch.equal(packed, pack_signs(delta))
    signs = unpack_signs(packed, k, out_dtype, chunk_bytes=chunk_bytes)
    assert signs.dtype == out_dtype and signs.shape == (n, k)
    assert torch.equal(signs, expected_signs(delta, out_dtype))


@SETTINGS
@given(n=ns, k=ks, seed=st.integers(0, 2**31 - 1))
def test_padding_bits_are_zero(n: int, k: int, seed: int) -> None:
    # all deltas positive: every real bit is 1, every padding bit must be 0
    delta = random_delta(n, k, seed).abs()
    packed = pack_signs(delta)
    bits = np.unpackbits(packed.view(torch.uint8).numpy(), axis=-1, bitorder="little")
    assert bits[:, :k].all()
    assert not bits[:, k:].any()


@SETTINGS
@given(n=ns, k=ks, seed=st.integers(0, 2**31 - 1))
def test_unpack_ignores_padding_bits(n: int, k: int, seed: int) -> None:
    delta = random_delta(n, k, seed)
    packed = pack_signs(delta)
    dirty = packed.clone()
    if k % 32:
        dirty[:, -1] |= torch.tensor(-1 << (k % 32), dtype=torch.int32)  # set padding bits
    assert torch.equal(unpack_signs(dirty, k), expected_signs(delta, torch.float32))


def test_zero_and_negative_zero_get_plus_one() -> None:
    delta = torch.tensor([[0.0, -0.0, -1e-30, 1e-30]], dtype=torch.float32)
    assert unpack_signs(pack_signs(delta), 4).tolist() == [[1.0, 1.0, -1.0, 1.0]]
    for dtype in (torch.float16, torch.bfloat16):
        d = torch.tensor([[0.0, -0.0, -1.0]], dtype=dtype)
        assert unpack_signs(pack_signs(d), 3).tolist() == [[1.0, 1.0, -1.0]]


def test_empty_shapes() -> None:
    assert pack_signs(torch.zeros((0, 5))).shape == (0, 1)
    assert pack_signs(torch.zeros((3, 0))).shape == (3, 0)
    assert unpack_signs(torch.zeros((0, 1), dtype=torch.int32), 5).shape == (0, 5)
    assert unpack_signs(torch.zeros((3, 0), dtype=torch.int32), 0).shape == (3, 0)


def test_packed_shape() -> None:
    assert packed_shape(1, 1) == (1, 1)
    assert packed_shape(4, 32) == (4, 1)
    assert packed_shape(4, 33) == (4, 2)
    assert packed_shape(11008, 4096) == (11008, 128)
    with pytest.raises(CodecError):
        packed_shape(-1, 3)


# --- validation --------------------------------------------------------------------------


def test_unpack_rejects_bad_packed() -> None:
    good = pack_signs(torch.ones((2, 33)))
    with pytest.raises(CodecError, match="int32"):
        unpack_signs(good.to(torch.int64), 33)
    with pytest.raises(CodecError, match="2-D"):
        unpack_signs(good.reshape(-1), 33)
    with pytest.raises(CodecError, match="ceil"):
        unpack_signs(good, 32)
    with pytest.raises(CodecError, match="ceil"):
        unpack_signs(good, 65)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match="2-D"):
        pack_signs(torch.ones(5))
    with pytest.raises(CodecError, match="floating"):
        pack_signs(torch.ones((2, 2), dtype=torch.int32))


# --- layout description and codec ids ----------------------------------------------------


def test_layout_json_round_trip() -> None:
    d = PACKING_V1.to_json()
    assert d == {
        "version": 1,
        "axis": "last",
        "word_bits": 32,
        "word_dtype": "int32",
        "byte_order": "little",
        "bit_order": "lsb_first",
        "one_means": "+1",
        "zero_delta_sign": "+1",
        "padding": "zero bits up to a multiple of word_bits",
    }
    assert PackingLayout.from_json(d) == PACKING_V1
    assert PackingLayout() == PACKING_V1


def test_layout_from_json_rejects_unknown() -> None:
    d = PACKING_V1.to_json()
    with pytest.raises(CodecError, match="version 2"):
        PackingLayout.from_json({**d, "version": 2})
    with pytest.raises(CodecError, match="bit_order"):
        PackingLayout.from_json({**d, "bit_order": "msb_first"})
    with pytest.raises(CodecError, match="frobnicate"):
        PackingLayout.from_json({**d, "frobnicate": 1})
    missing = dict(d)
    del missing["axis"]
    with pytest.raises(CodecError, match="axis"):
        PackingLayout.from_json(missing)
    with pytest.raises(CodecError, match="version True"):
        PackingLayout.from_json({**d, "version": True})
    with pytest.raises(CodecError, match="word_bits"):
        PackingLayout.from_json({**d, "word_bits": 32.0})
    with pytest.raises(CodecError):
        PackingLayout.from_json([1])  # type: ignore[arg-type]


def test_codec_ids() -> None:
    assert [c.value for c in Codec] == ["same", "sign1", "dense"]
    assert Codec("sign1") is Codec.SIGN1
    assert Codec.SIGN1 == "sign1"
    assert str(Codec.DENSE) == "dense"
    assert CODEC_VERSIONS == {Codec.SAME: 1, Codec.SIGN1: 1, Codec.DENSE: 1}
    assert issubclass(CodecError, ValueError)


def test_codec_imports_nothing_from_deltahub() -> None:
    import ast
    import pathlib

    import deltahub.codec as codec

    for path in pathlib.Path(codec.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("deltahub"), path
                if node.level > 1:
                    pytest.fail(f"{path}: relative import beyond deltahub.codec")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("deltahub"), path
