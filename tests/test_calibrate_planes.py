"""Calibration trains every scale of every codec: the ``planes`` codec's scale *parts* (per matrix, row,
group; all planes), written as new objects, signs untouched; ``sign1``'s scalar path is unchanged."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from calibrate_fixtures import one_thread, trained  # noqa: F401

from deltahub import codec as codecs
from deltahub.api import CalibrationOptions
from deltahub.calibrate.data import load_samples
from deltahub.codec.packing import unpack_signs
from deltahub.calibrate.distill import DistillConfig, calibrate_scales, delta_scales
from deltahub.calibrate.targets import DEFAULT_TOP_K, score_model
from deltahub.errors import DeltaHubError
from deltahub.formats.manifest import parse_manifest
from deltahub.ops import calibrate as calibrate_op
from deltahub.ops.load import load_model

FAST = {"samples": 32, "seq_len": 32, "steps": 30, "lr": 0.05}
SCALES = [("row", None), ("group", 32), ("matrix", None)]


def _opts(trained, **kw) -> CalibrationOptions:
    return CalibrationOptions(**{"data": trained["calib"], **FAST, **kw})


def _manifest(store, name: str):
    return store._ctx.resolve(name).manifest


def _planes_pair(store, trained, scales: str, group: int | None, planes: int = 2, name: str = "ft") -> str:
    store.add(trained["llama"]["base"], name="base")
    options = {"planes": planes, "scales": scales, **({"group_size": group} if group else {})}
    return store.compress(trained["llama"]["ft"], base="base", name=name, codec="planes", codec_options=options).manifest_id


_TEACHER: dict = {}


def _part(store, rec, part: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stored part of ``rec``, read back from its object (flat)."""
    return torch.frombuffer(bytearray(store._ctx.objects.read(rec.parts[part])), dtype=dtype)


def _heldout_kl(store, trained, name: str, bits: int | None = None) -> float:
    """Mean KL(fine-tune || delta read at ``bits`` planes) on 16 x 32 held-out tokens."""
    from transformers import AutoModelForCausalLM

    ft = trained["llama"]["ft"]
    if ft not in _TEACHER:
        tokens = load_samples(trained["heldout"], store.load_tokenizer(name), 16, 32, "eval").tokens
        teacher = score_model(lambda: AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32), tokens, 4, "cpu", keep_top_k=DEFAULT_TOP_K)
        _TEACHER[ft] = (tokens, teacher.targets)
    tokens, targets = _TEACHER[ft]
    stats = score_model(lambda: load_model(store._ctx, name, dtype=torch.float32, bits=bits), tokens, 4, "cpu", against=targets)
    return stats.mean_kl


@pytest.mark.parametrize("scales, group", SCALES[:2])
def test_planes_calibration_lowers_the_kl_and_changes_only_scale_parts(store, trained, scales, group):
    old_id = _planes_pair(store, trained, scales, group)
    old = _manifest(store, "ft")
    planes = [n for n, rec in old.tensors.items() if rec.codec == "planes"]
    assert planes and all(old.tensors[n].params["planes"] == 2 for n in planes)
    objects_before = set(store._ctx.objects.iter_ids())
    kl_before = _heldout_kl(store, trained, "ft")

    result = store.calibrate("ft", trained["llama"]["ft"], _opts(trained))
    new = _manifest(store, "ft")
    assert result.previous_manifest_id == old_id and result.manifest_id != old_id and not result.reverted
    assert result.loss_after < 0.8 * result.loss_before, (result.loss_before, result.loss_after)
    assert _heldout_kl(store, trained, "ft") < 0.8 * kl_before
    # every plane's scales of every planes tensor was trained: one key per tensor and plane
    assert set(result.scales) == {f"{n}#scales{i}" for n in planes for i in (0, 1)}
    specs = {n: old.tensors[n].impl.part_specs(old.tensors[n].shape, torch.float32, old.tensors[n].params) for n in planes}
    assert result.n_scales == sum(math.prod(specs[n][f"scales{i}"].shape) for n in planes for i in (0, 1))

    assert new.files == old.files and new.base == old.base and new.tensors.keys() == old.tensors.keys()
    changed = set()
    for tname, rec in new.tensors.items():
        prev = old.tensors[tname]
        assert (rec.codec, rec.dtype, rec.shape, rec.params) == (prev.codec, prev.dtype, prev.shape, prev.params)
        if rec.codec != "planes":
            assert rec.parts == prev.parts
            continue
        assert rec.parts.keys() == prev.parts.keys()
        for part, oid in rec.parts.items():
            if part.startswith("signs"):
                assert oid == prev.parts[part]  # the same sign objects
            elif oid != prev.parts[part]:
                changed.add(oid)
                t = torch.frombuffer(bytearray(store._ctx.objects.read(oid)), dtype=torch.float32)
                assert bool(torch.isfinite(t).all()) and bool((t >= 0).all())
                spec = rec.impl.part_specs(rec.shape, torch.float32, rec.params)[part]
                assert t.numel() * 4 == spec.nbytes
    assert len(changed) >= len(planes)  # most scale parts moved
    # written: the new scale objects and the manifest, nothing else
    assert set(store._ctx.objects.iter_ids()) - objects_before == changed | {result.manifest_id}
    assert store.verify().ok


@pytest.mark.parametrize("scales, group", SCALES)
def test_calibrated_planes_materialize_equals_delta_mode_at_every_prefix(store, trained, scales, group, tmp_path):
    _planes_pair(store, trained, scales, group)
    store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10))
    man = _manifest(store, "ft")
    x = torch.randint(3, 100, (2, 16))
    for bits in (None, 1):
        mat = load_model(store._ctx, "ft", dtype=torch.float32, bits=bits)
        delta = load_model(store._ctx, "ft", dtype=torch.float32, mode="delta", bits=bits)
        with torch.no_grad():
            a, b = mat(input_ids=x).logits, delta(input_ids=x).logits
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (bits, float((a - b).abs().max()))
        # the materialized tensors are base + Σ sᵢ⊙Sᵢ with the calibrated (stored) scale objects
        store.materialize("ft", tmp_path / f"out-{bits}", bits=bits)
        got = load_file(str(tmp_path / f"out-{bits}" / "model.safetensors"))
        base = load_file(str(trained["llama"]["base"] / "model.safetensors"))
        for tname, rec in man.tensors.items():
            if rec.codec != "planes":
                continue
            n, k = rec.shape
            want = base[tname].float()
            for i in range(1 if bits == 1 else rec.params["planes"]):
                s = _part(store, rec, f"scales{i}").reshape(-1, rec.impl.part_specs(rec.shape, torch.float32, rec.params)[f"scales{i}"].shape[1])
                s = s.repeat_interleave(group, dim=1)[:, :k] if s.shape[1] > 1 else s
                signs = unpack_signs(_part(store, rec, f"signs{i}", torch.int32).reshape(n, -1), k, torch.float32)
                want = want + s * signs
            assert torch.allclose(got[tname].float(), want, rtol=0, atol=1e-6), tname
    # --bits 1 of the calibrated delta reads plane 0 only, with its calibrated scales
    tname = next(n for n, rec in man.tensors.items() if rec.codec == "planes")
    rec = man.tensors[tname]
    params, parts = rec.impl.prefix(rec.params, rec.parts, 1)
    assert set(parts) == {"signs0", "scales0"} and parts["scales0"] == rec.parts["scales0"]


def test_a_prefix_of_a_calibrated_two_plane_delta_stays_sensible(store, trained):
    """Scales calibrated for 2 planes, read at 1 plane: still much better than the base and no
    worse than 1.25x the uncalibrated 1-plane prefix (measured: see docs/design.md)."""
    _planes_pair(store, trained, "row", None)
    kl1_before = _heldout_kl(store, trained, "ft", bits=1)
    kl2_before = _heldout_kl(store, trained, "ft", bits=2)
    store.calibrate("ft", trained["llama"]["ft"], _opts(trained))
    kl1_after = _heldout_kl(store, trained, "ft", bits=1)
    kl2_after = _heldout_kl(store, trained, "ft", bits=2)
    assert kl2_after < kl2_before
    assert kl1_after < 1.25 * kl1_before, (kl1_before, kl1_after)


def test_the_trained_parameters_are_exactly_the_scale_parts(store, trained):
    _planes_pair(store, trained, "group", 32)
    student = load_model(store._ctx, "ft", dtype=torch.float32, mode="delta", trainable_scales=True)
    man = _manifest(store, "ft")
    scales = delta_scales(student, {n for n, r in man.tensors.items() if r.codec == "planes"})
    for key, p in scales.items():
        tname, _, part = key.partition("#")
        rec = man.tensors[tname]
        assert part in rec.impl.trainable_parts(rec.params)
        assert p.dtype == torch.float32 and tuple(p.shape) == rec.impl.part_specs(rec.shape, torch.float32, rec.params)[part].shape
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in scales.values()}
    before = {n: t.detach().clone() for n, t in student.state_dict().items()}
    tokens = torch.randint(3, 100, (8, 16))
    targets = score_model(lambda: load_model(store._ctx, "ft", dtype=torch.float32), tokens, 4, "cpu", keep_top_k=DEFAULT_TOP_K).targets
    run = calibrate_scales(student, scales, tokens, targets, DistillConfig(steps=3, lr=0.05))
    after = student.state_dict()
    keys = {f"{k.partition('#')[0].removesuffix('.weight')}.delta.{k.partition('#')[2]}" for k in scales}
    for n, t in before.items():
        if n not in keys:
            assert torch.equal(after[n], t), n  # nothing but the scales moved
    assert all(isinstance(v, torch.Tensor) for v in run.final.values())


def test_a_non_finite_or_negative_trained_scale_is_never_published(store, trained, monkeypatch):
    old_id = _planes_pair(store, trained, "row", None)
    objects_before = set(store._ctx.objects.iter_ids())
    real = calibrate_scales

    for bad in (float("nan"), -1.0):
        def poisoned(student, scales, *args, bad=bad, **kw):
            run = real(student, scales, *args, **kw)
            key = sorted(run.final)[0]
            run.final[key] = run.final[key].clone().fill_(bad)
            return run

        monkeypatch.setattr(calibrate_op, "calibrate_scales", poisoned)
        with pytest.raises(DeltaHubError, match="bad scales") as err:
            store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=2))
        assert err.value.hint and "calib-lr" in err.value.hint
        assert store._ctx.resolve("ft").manifest_id == old_id
        assert set(store._ctx.objects.iter_ids()) == objects_before


def test_trained_parts_refuses_wrong_layout_and_untrainable_parts():
    planes = codecs.get("planes")
    params = planes.check_params({"planes": 2, "scales": "row"}, (4, 64))
    assert planes.trainable_parts(params) == ("scales0", "scales1")
    ok = planes.trained_parts((4, 64), torch.float32, params, {"scales1": torch.ones(4, 1, dtype=torch.float64)})
    assert ok["scales1"].dtype == torch.float32 and ok["scales1"].is_contiguous()
    with pytest.raises(codecs.CodecError, match="layout"):
        planes.trained_parts((4, 64), torch.float32, params, {"scales0": torch.ones(1, 1)})
    with pytest.raises(codecs.CodecError, match="no trainable part"):
        planes.trained_parts((4, 64), torch.float32, params, {"signs0": torch.ones(4, 2)})
    with pytest.raises(codecs.CodecError, match="non-finite"):
        planes.trained_parts((4, 64), torch.float32, params, {"scales0": torch.full((4, 1), float("inf"))})
    # codecs whose scales are parameters have no trainable parts
    assert codecs.get("sign1").trainable_parts({"scale": 1.0}) == ()


def test_calibration_stats_record_the_mean_of_the_scales(store, trained):
    _planes_pair(store, trained, "row", None)
    shown = {t["name"]: t for t in store.show("ft", tensors=True)["tensors"]}
    man = _manifest(store, "ft")

    def mean_scales(m, tname):
        rec = m.tensors[tname]
        ts = [torch.frombuffer(bytearray(store._ctx.objects.read(rec.parts[p])), dtype=torch.float32)
              for p in rec.impl.trainable_parts(rec.params)]
        return float(torch.cat(ts).double().mean())

    store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10))
    store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10, seed=1))
    new = _manifest(store, "ft")
    after = {t["name"]: t for t in store.show("ft", tensors=True)["tensors"]}
    for tname, t in after.items():
        if t["codec"] != "planes":
            assert t["initial_scale"] is None and t["rel_recon_error"] == shown[tname]["rel_recon_error"]
            continue
        assert shown[tname]["scale"] is None  # as compressed: no single scale
        assert t["initial_scale"] == pytest.approx(mean_scales(man, tname), rel=1e-9)  # kept through 2 calibrations
        assert t["scale"] == pytest.approx(mean_scales(new, tname), rel=1e-9)
        assert t["rel_recon_error"] is None  # not known without the fine-tune's tensor
        assert t["stored_bytes"] == shown[tname]["stored_bytes"]  # raw fp32 scales: the same size


def test_sign1_keys_are_unchanged_by_the_parts_path(store, trained):
    """sign1 keeps training one 0-d parameter per tensor, recorded as floats in the manifest params
    (the byte-identical comparison with the previous code is in docs/design.md)."""
    store.add(trained["llama"]["base"], name="base")
    store.compress(trained["llama"]["ft"], base="base", name="ft")
    result = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=5))
    man = _manifest(store, "ft")
    assert all("#" not in k for k in result.scales)
    for tname, v in result.scales.items():
        assert man.tensors[tname].scale == v["calibrated"]
    again = parse_manifest(man.to_bytes())
    assert dataclasses.asdict(again) == dataclasses.asdict(man)


def test_compress_bits_calibrate_verify_and_materialize_bits_commands(home, trained, tmp_path):
    from click.testing import CliRunner

    from deltahub.cli import cli

    def run(*args, expect: int = 0):
        result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)], catch_exceptions=False)
        assert result.exit_code == expect, result.output
        return result

    dirs = trained["llama"]
    run("add", dirs["base"], "--name", "base")
    fast = ["--calib-data", trained["calib"], "--calib-samples", 16, "--calib-seq-len", 32, "--calib-steps", 5,
            "--calib-lr", 0.05, "--device", "cpu"]
    out = json.loads(run("compress", dirs["ft"], "--base", "base", "--name", "ft", "--bits", 2, "--scales", "group",
                         "--group-size", 32, "--calibrate", *fast, "--json").stdout)
    cal = out["calibration"]
    assert cal["loss_after"] < cal["loss_before"] and any("#scales1" in k for k in cal["scales"])
    assert run("verify").stdout.strip().endswith("ok")  # every part size checked against the layout
    table = run("show", "ft", "--tensors").stdout
    assert "INITIAL" in table
    run("materialize", "ft", tmp_path / "one", "--bits", 1)
    run("materialize", "ft", tmp_path / "two")
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(one[name], two[name])  # the prefix reads fewer planes
