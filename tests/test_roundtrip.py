"""Round trip exactness: add + compress + materialize equals a reference computed here, bit for bit.

The reference is computed independently of deltahub, from the original base and fine-tune
checkpoints only (``safetensors.torch.load_file``), using the decode formula of the format:

* ``sign1``: ``(W_base.float() + s * S).to(dtype)`` with ``S = sign(W_ft.float() - W_base.float())``
  (a zero delta gets +1) and ``s`` the stored scale, itself equal to ``mean|delta|`` in fp32;
* ``dense``: ``W_ft.to(dtype)``;
* ``same``:  ``W_base.to(dtype)``.

The only values taken from deltahub are the codec chosen per tensor and the scale, both read through
the public ``Store.show(name, tensors=True)``; the codec choice itself is checked against the rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fine_tune_like, make_model, save_checkpoint
from safetensors.torch import load_file

import deltahub

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------- helpers
def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(path / shard))
        return tensors
    return load_file(path / "model.safetensors")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes (NaN-safe, -0.0 != +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def fp32_ulp(x: float) -> float:
    return float(np.spacing(np.float32(abs(x))))


def reference(
    codec: str, base: torch.Tensor | None, ft: torch.Tensor, scale: float | None, dtype: torch.dtype
) -> torch.Tensor:
    """The expected materialized tensor, from the original checkpoints."""
    out_dtype = dtype if ft.is_floating_point() else ft.dtype
    if codec == "dense":
        return ft.to(out_dtype)
    assert base is not None
    if codec == "same":
        return base.to(out_dtype)
    assert codec == "sign1" and scale is not None
    delta = ft.float() - base.float()
    signs = torch.where(delta >= 0, torch.ones_like(delta), -torch.ones_like(delta))
    s = torch.tensor(scale, dtype=torch.float32)
    return (base.float() + s * signs).to(out_dtype)


def expected_scale(base: torch.Tensor, ft: torch.Tensor) -> float:
    """mean |W_ft - W_base| with the delta computed in fp32 (summed in fp64)."""
    delta = ft.float() - base.float()
    return float(delta.double().abs().mean())


def build(root: Path, arch: str, base_dtype=None, ft_dtype=None, seed: int = 0) -> dict[str, Path]:
    model = make_model(arch, seed=seed)
    base = save_checkpoint(model, root / "base", dtype=base_dtype)  # .to(dtype) works in place
    fine_tune_like(model)
    ft = save_checkpoint(model, root / "ft", dtype=ft_dtype)
    return {"base": base, "ft": ft}


def check_round_trip(store: deltahub.Store, name: str, dirs: dict[str, Path], out: Path, dtype: str | None) -> dict:
    """Materialize ``name`` in ``dtype`` and compare every tensor with the reference; returns stats."""
    base_t = load_checkpoint(dirs["base"])
    ft_t = load_checkpoint(dirs["ft"])
    info = store.show(name, tensors=True)
    records = {t["name"]: t for t in info["tensors"]}
    assert set(records) == set(ft_t), "the delta must describe exactly the fine-tune's tensors"

    result = store.materialize(name, out, dtype=dtype)
    got = load_checkpoint(out)
    assert set(got) == set(ft_t)
    if dtype is None:
        out_dtype = max(
            {t.dtype for t in ft_t.values()}, key=lambda d: sum(t.numel() for t in ft_t.values() if t.dtype == d)
        )
    else:
        out_dtype = DTYPES[dtype]
    assert result.dtype == str(out_dtype).removeprefix("torch.")

    seen: dict[str, int] = {}
    for tname, ft in ft_t.items():
        rec = records[tname]
        codec = rec["codec"]
        seen[codec] = seen.get(codec, 0) + 1
        base = base_t.get(tname)
        # The codec is the one the rules call for.
        if codec == "same":
            assert base is not None and bits_equal(base, ft), tname
            assert rec["scale"] is None
        elif codec == "sign1":
            assert base is not None and ft.ndim == 2 and base.shape == ft.shape, tname
            assert not bits_equal(base, ft)
            scale = rec["scale"]
            assert isinstance(scale, float) and scale > 0
            assert float(np.float32(scale)) == scale, "the scale is an fp32 value"
            want = expected_scale(base, ft)
            assert abs(scale - want) <= max(fp32_ulp(want), 1e-6 * want), (tname, scale, want)
        else:
            assert codec == "dense", codec
            assert rec["scale"] is None
            if base is not None and base.dtype == ft.dtype:
                assert not bits_equal(base, ft), f"{tname} is identical to the base but stored dense"
        want_t = reference(codec, base, ft, rec["scale"], out_dtype)
        assert bits_equal(got[tname], want_t), f"{tname} ({codec}) differs from the reference in {out_dtype}"
    return seen


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fp32_store(tmp_path_factory, model_dirs):
    """One store holding both architectures' fp32 base and fine-tune."""
    home = tmp_path_factory.mktemp("rt-store")
    with deltahub.Store(home) as store:
        for arch, dirs in model_dirs.items():
            store.add(dirs["base"], name=f"{arch}-base")
            store.compress(dirs["ft"], base=f"{arch}-base", name=f"{arch}-ft")
        yield store


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Checkpoints in other dtypes: bf16 base + bf16 fine-tune, and fp32 base + fp16 fine-tune."""
    root = tmp_path_factory.mktemp("rt-mixed")
    out = {}
    for arch in ("llama", "gpt2"):
        out[(arch, "bf16")] = build(root / arch / "bf16", arch, torch.bfloat16, torch.bfloat16)
        out[(arch, "fp32-fp16")] = build(root / arch / "fp32-fp16", arch, None, torch.float16)
    home = root / "store"
    with deltahub.Store(home) as store:
        for (arch, kind), dirs in out.items():
            store.add(dirs["base"], name=f"{arch}-{kind}-base")
            store.compress(dirs["ft"], base=f"{arch}-{kind}-base", name=f"{arch}-{kind}-ft")
        yield store, out


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_fp32_checkpoints(fp32_store, model_dirs, arch, dtype, tmp_path):
    seen = check_round_trip(fp32_store, f"{arch}-ft", model_dirs[arch], tmp_path / "out", dtype)
    # The fixtures are built so that all three codecs appear.
    assert seen.get("sign1", 0) > 0 and seen.get("dense", 0) > 0 and seen.get("same", 0) > 0, seen


def test_round_trip_default_dtype_is_the_fine_tunes(fp32_store, model_dirs, arch, tmp_path):
    check_round_trip(fp32_store, f"{arch}-ft", model_dirs[arch], tmp_path / "out", None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_float32_output_of_fp32_checkpoints_keeps_dense_and_same_exact(fp32_store, model_dirs, arch, tmp_path):
    """In fp32, dense tensors are the fine-tune's and same tensors the base's, byte for byte."""
    out = tmp_path / "out"
    fp32_store.materialize(f"{arch}-ft", out, dtype="float32")
    got = load_checkpoint(out)
    base_t, ft_t = load_checkpoint(model_dirs[arch]["base"]), load_checkpoint(model_dirs[arch]["ft"])
    codecs = {t["name"]: t["codec"] for t in fp32_store.show(f"{arch}-ft", tensors=True)["tensors"]}
    for tname, codec in codecs.items():
        if codec in ("dense", "same"):
            assert bits_equal(got[tname], ft_t[tname])
            if codec == "same":
                assert bits_equal(got[tname], base_t[tname])
        else:  # sign1 is an approximation: never the base, never (all of) the fine-tune
            assert not bits_equal(got[tname], base_t[tname])
            assert not bits_equal(got[tname], ft_t[tname])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", None])
def test_round_trip_bf16_base_and_fine_tune(mixed, arch, dtype, tmp_path):
    store, dirs = mixed
    d = dirs[(arch, "bf16")]
    assert {t.dtype for t in load_checkpoint(d["base"]).values()} == {torch.bfloat16}
    seen = check_round_trip(store, f"{arch}-bf16-ft", d, tmp_path / "out", dtype)
    assert seen.get("sign1", 0) > 0 and seen.get("same", 0) > 0, seen
    if dtype is None:
        assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bf16_fine_tune_has_zero_deltas_and_they_decode_as_plus_scale(mixed, arch):
    """bf16 rounding leaves some elements of W_ft equal to W_base: their sign must be +1."""
    store, dirs = mixed
    d = dirs[(arch, "bf16")]
    base_t, ft_t = load_checkpoint(d["base"]), load_checkpoint(d["ft"])
    records = {t["name"]: t for t in store.show(f"{arch}-bf16-ft", tensors=True)["tensors"]}
    zeros = 0
    with deltahub.Store(store.home) as s2:
        model = s2.load_model(f"{arch}-bf16-ft", dtype="float32")
    state = model.state_dict()
    for tname, rec in records.items():
        if rec["codec"] != "sign1":
            continue
        delta = ft_t[tname].float() - base_t[tname].float()
        mask = delta == 0
        zeros += int(mask.sum())
        if mask.any():
            rebuilt = state[tname] if tname in state else None
            assert rebuilt is not None
            want = base_t[tname].float()[mask] + torch.tensor(rec["scale"], dtype=torch.float32)
            assert torch.equal(rebuilt[mask], want)
    assert zeros > 0, "the bf16 fixture should produce some exactly-zero deltas"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", None])
def test_round_trip_fp16_fine_tune_of_fp32_base(mixed, arch, dtype, tmp_path):
    store, dirs = mixed
    d = dirs[(arch, "fp32-fp16")]
    assert {t.dtype for t in load_checkpoint(d["base"]).values()} == {torch.float32}
    assert {t.dtype for t in load_checkpoint(d["ft"]).values()} == {torch.float16}
    seen = check_round_trip(store, f"{arch}-fp32-fp16-ft", d, tmp_path / "out", dtype)
    # Different dtypes are never "same", even where the fine-tune did not change a tensor.
    assert seen.get("same", 0) == 0 and seen.get("sign1", 0) > 0, seen
    info = store.show(f"{arch}-fp32-fp16-ft")
    assert info["dtype"] == "float16"
    if dtype is None:
        assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_scales_do_not_depend_on_the_store(mixed, fp32_store, model_dirs, tmp_path):
    """Compressing the same pair again, in another store, records the same scales and manifest."""
    with deltahub.Store(tmp_path / "other") as other:
        dirs = model_dirs["llama"]
        other.add(dirs["base"], name="b")
        res = other.compress(dirs["ft"], base="b", name="f")
        a = {t["name"]: t["scale"] for t in other.show("f", tensors=True)["tensors"]}
    b = {t["name"]: t["scale"] for t in fp32_store.show("llama-ft", tensors=True)["tensors"]}
    assert a == b
    assert res.manifest_id == fp32_store.show("llama-ft")["manifest_id"]
