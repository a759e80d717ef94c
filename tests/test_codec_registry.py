"""The codec registry's proof: a codec defined in tests/ (``toy_codec.rowsign``, two parts and a
trainable parameter) goes through compress → push → pull → materialize, delta mode, multi-tenant
serving, calibration's plumbing, show, verify and gc with no change to deltahub/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import deltahub
from deltahub import codec as codecs
from deltahub.errors import CorruptObjectError, InputError, UnsupportedFormatError
from deltahub.formats.manifest import Manifest, TensorRecord, parse_manifest
from deltahub.runtime import DeltaLinear
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401
from toy_codec import NAME, RowSignCodec, RowSignOperator, reference_rowsign

REPO = f"{FAKE_USER}/toy-delta"
BASE_REPO, BASE_REV = "someone/tiny-base", "b" * 40


def _push(store, hub_server):
    plant_repo(hub_server, BASE_REPO, BASE_REV)  # push checks that the base repo exists
    return store.push("toy", REPO, base_repo=f"{BASE_REPO}@{BASE_REV}")


@pytest.fixture
def rowsign():
    codec = codecs.register(RowSignCodec())
    yield codec
    codecs.registry.unregister(NAME)


@pytest.fixture
def toy_store(store, model_dirs, rowsign):
    dirs = model_dirs["llama"]
    store.add(dirs["base"], name="base")
    result = store.compress(dirs["ft"], base="base", name="toy", codec=NAME)
    assert result.codecs[NAME] > 0
    return store


def _manifest(store, name: str) -> Manifest:
    return parse_manifest(store._ctx.objects.read(store.show(name)["manifest_id"]))


def _matrices(man: Manifest) -> list[str]:
    return [n for n, rec in man.tensors.items() if rec.codec == NAME]


def _check_checkpoint(out: Path, model_dirs, man: Manifest) -> None:
    """Every rowsign tensor of the written checkpoint equals the independent reference; every
    other tensor equals the fine-tune (dense) or the base (same), bit for bit."""
    base = load_file(model_dirs["llama"]["base"] / "model.safetensors")
    ft = load_file(model_dirs["llama"]["ft"] / "model.safetensors")
    got: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        got.update(load_file(shard))
    assert set(got) == set(ft)
    for name, rec in man.tensors.items():
        if rec.codec == NAME:
            signs, scales = reference_rowsign(base[name], ft[name])
            expect = (base[name].float() + scales[:, None] * signs).to(ft[name].dtype)
            assert torch.equal(got[name], expect), name
        elif rec.codec == "same":
            assert torch.equal(got[name], base[name]), name
        else:
            assert torch.equal(got[name], ft[name]), name


def test_registry_basics(rowsign):
    assert NAME in codecs.names() and codecs.get(NAME) is rowsign
    codecs.register(rowsign)  # the same instance again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        codecs.register(RowSignCodec())
    with pytest.raises(codecs.UnknownCodecError, match="unknown codec 'nope'"):
        codecs.get("nope")
    for built_in in ("same", "dense", "sign1"):
        assert codecs.get(built_in).name == built_in


def test_toy_codec_round_trip_compress_push_pull_materialize(toy_store, model_dirs, tmp_path, hub_server):
    man = _manifest(toy_store, "toy")
    assert man.version() == 2 and _matrices(man)
    raw = json.loads(toy_store._ctx.objects.read(toy_store.show("toy")["manifest_id"]))
    assert raw["format_version"] == 2
    spec = raw["tensors"][_matrices(man)[0]]
    assert set(spec["parts"]) == {"signs", "scales"} and spec["params"] == {"gain": 1.0}
    assert {"dense", "same"} >= {rec.codec for rec in man.tensors.values()} - {NAME}

    toy_store.materialize("toy", tmp_path / "out_a")
    _check_checkpoint(tmp_path / "out_a", model_dirs, man)

    pushed = _push(toy_store, hub_server)
    b = deltahub.Store(tmp_path / "store_b")
    try:
        b.add(model_dirs["llama"]["base"], name="base")
        pulled = b.pull(REPO, name="toy")
        assert pulled.commit == pushed.commit and pulled.manifest_id == toy_store.show("toy")["manifest_id"]
        b.materialize("toy", tmp_path / "out_b")
        for f in (tmp_path / "out_a").iterdir():
            assert (tmp_path / "out_b" / f.name).read_bytes() == f.read_bytes(), f.name
        assert b.verify().ok
        shown = b.show("toy", tensors=True)
        assert shown["kind"] == "delta"
        b.gc()
        b.materialize("toy", tmp_path / "out_c")  # gc kept every part of the rowsign tensors
        assert sorted(p.name for p in (tmp_path / "out_c").iterdir()) == sorted(p.name for p in (tmp_path / "out_a").iterdir())
    finally:
        b.close()


def test_toy_codec_hub_layout_names_both_parts(toy_store, hub_server, tmp_path):
    from huggingface_hub import hf_hub_download

    _push(toy_store, hub_server)
    hub = json.loads(Path(hf_hub_download(REPO, "deltahub.json", cache_dir=tmp_path / "c")).read_bytes())
    assert hub["format_version"] == 2
    man = _manifest(toy_store, "toy")
    name = _matrices(man)[0]
    parts = hub["tensors"][name]["parts"]
    assert set(parts) == {"signs", "scales"}
    path = hf_hub_download(REPO, parts["scales"]["file"], cache_dir=tmp_path / "c")
    with safe_open(path, framework="pt") as f:
        scales = f.get_tensor(parts["scales"]["key"])
        signs = f.get_tensor(parts["signs"]["key"])
    assert parts["scales"]["key"] == f"{name}:scales" and scales.dtype == torch.float32
    assert signs.dtype == torch.int32 and list(signs.shape) == parts["signs"]["stored_shape"]


def test_toy_codec_delta_mode_and_multi_tenant(toy_store, model_dirs, tmp_path):
    toy_store.compress(model_dirs["llama"]["ft"], base="base", name="signed")  # sign1, same fine-tune
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    full = toy_store.load_model("toy")  # materialized in memory
    delta = toy_store.load_model("toy", mode="delta")
    ops = [m.delta for m in delta.modules() if isinstance(m, DeltaLinear)]
    assert ops and all(isinstance(op, RowSignOperator) for op in ops)
    with torch.no_grad():
        want = full(ids).logits
        got = delta(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)

    trainable = toy_store.load_model("toy", mode="delta", trainable_scales=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".delta.gain") for n in names)

    mt = toy_store.load_multi_tenant(["toy", "signed"])
    signed = toy_store.load_model("signed")
    with torch.no_grad():
        batch = mt(ids.repeat(3, 1), ["toy", "base", "signed"]).logits
        base = toy_store.load_model("base")(ids).logits
        alone_signed = signed(ids).logits
    assert torch.allclose(batch[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(batch[1], base[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(batch[2], alone_signed[0], atol=1e-4, rtol=1e-4)


def test_toy_codec_trained_parameter_goes_through_with_scales(toy_store):
    from deltahub.calibrate.distill import delta_scales
    from deltahub.ops.calibrate import with_scales

    man = _manifest(toy_store, "toy")
    student = toy_store.load_model("toy", mode="delta", trainable_scales=True)
    keys = delta_scales(student, set(_matrices(man)))
    assert keys and all(k.endswith("#gain") for k in keys)
    first = next(iter(keys))
    new = with_scales(man, {first: 1.25})
    tname = first.partition("#")[0]
    assert new.tensors[tname].params == {"gain": 1.25} and new.tensors[tname].parts == man.tensors[tname].parts
    assert parse_manifest(new.to_bytes()).tensors[tname].params == {"gain": 1.25}


def test_unregistered_codec_is_refused_on_read_with_a_hint(toy_store, rowsign):
    data = toy_store._ctx.objects.read(toy_store.show("toy")["manifest_id"])
    codecs.registry.unregister(NAME)
    try:
        with pytest.raises(UnsupportedFormatError, match="unknown to this deltahub.*install the package"):
            parse_manifest(data)
    finally:
        codecs.register(rowsign)


def test_bad_parts_and_params_are_corrupt(toy_store):
    raw = json.loads(toy_store._ctx.objects.read(toy_store.show("toy")["manifest_id"]))
    name = next(n for n, s in raw["tensors"].items() if s["codec"] == NAME)
    for mutate in (
        lambda s: s["parts"].pop("scales"),
        lambda s: s["parts"].update(extra="0" * 64),
        lambda s: s["params"].update(gain="x"),
        lambda s: s["parts"].update(signs="not-an-id"),
        lambda s: s.pop("params"),
    ):
        obj = json.loads(json.dumps(raw))
        mutate(obj["tensors"][name])
        with pytest.raises(CorruptObjectError):
            parse_manifest(json.dumps(obj).encode())


def test_compress_refuses_unknown_or_non_delta_codecs(store, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    with pytest.raises(InputError, match="unknown codec 'nope'"):
        store.compress(model_dirs["llama"]["ft"], base="base", name="x", codec="nope")
    with pytest.raises(InputError, match="does not store a delta"):
        store.compress(model_dirs["llama"]["ft"], base="base", name="x", codec="dense")
    assert [m["name"] for m in store.list()] == ["base"]


def test_built_in_manifests_stay_v1_and_v2_reads_them_the_same(store, model_dirs):
    """Deltas of the built-in codecs are written as v1 (same ids as before codecs existed, readable by
    older deltahub); the same records written as v2 parse to the same tensors."""
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    data = store._ctx.objects.read(store.show("ft")["manifest_id"])
    man = parse_manifest(data)
    assert json.loads(data)["format_version"] == 1 and man.to_bytes() == bytes(data)
    v2 = Manifest(**{**man.__dict__, "format_version": 2})
    again = parse_manifest(v2.to_bytes())
    assert again.version() == 2 and again.tensors == man.tensors
    rec = next(r for r in man.tensors.values() if r.codec == "sign1")
    assert rec.parts == {"signs": rec.object} and rec.params == {"scale": rec.scale}
    with pytest.raises(ValueError, match="cannot be written in manifest v1"):
        TensorRecord("w", NAME if NAME in codecs.names() else "sign1", "float32", (2, 3),
                     parts={"signs": "0" * 64, "x": "1" * 64}).to_json(1)


# ------------------------------------------------------------------ review findings (hostile try-out)
@pytest.mark.parametrize("scale", [10**400, 1e308, -1e39])
def test_sign1_scale_beyond_fp32_is_corrupt_not_a_crash(store, model_dirs, scale):
    from deltahub.hub.layout import parse_hub_manifest

    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    raw = json.loads(store._ctx.objects.read(store.show("ft")["manifest_id"]))
    name = next(n for n, s in raw["tensors"].items() if s["codec"] == "sign1")
    raw["tensors"][name]["scale"] = scale
    with pytest.raises(CorruptObjectError, match="finite fp32 scale"):
        parse_manifest(json.dumps(raw).encode())
    raw["format"], raw["format_version"], raw["manifest"] = "deltahub.hub", 1, "0" * 64
    with pytest.raises(CorruptObjectError):
        parse_hub_manifest(json.dumps(raw).encode())


class _Misbehaving(RowSignCodec):
    """rowsign whose encoder breaks its own contract in one way (``how``)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def encode(self, base, finetuned):
        enc = super().encode(base, finetuned)
        if self.how == "int-param":
            enc.params = {"gain": 1}
        elif self.how == "nan-param":
            enc.params = {"gain": float("nan")}
        elif self.how == "short-part":
            enc.parts["scales"] = enc.parts["scales"][:-1]
        elif self.how == "wrong-dtype":
            enc.parts["scales"] = enc.parts["scales"].double()
        elif self.how == "missing-part":
            del enc.parts["scales"]
        elif self.how == "extra-part":
            enc.parts["more"] = enc.parts["scales"]
        return enc


@pytest.mark.parametrize("how", ["int-param", "nan-param", "short-part", "wrong-dtype", "missing-part", "extra-part"])
def test_a_codec_breaking_its_contract_is_refused_before_anything_is_stored(store, model_dirs, how):
    from deltahub.errors import CodecError as DeltaCodecError

    store.add(model_dirs["llama"]["base"], name="base")
    codecs.register(_Misbehaving(how), replace=True)
    try:
        with pytest.raises(DeltaCodecError, match=f"codec {NAME} gave tensor"):
            store.compress(model_dirs["llama"]["ft"], base="base", name="bad", codec=NAME)
    finally:
        codecs.registry.unregister(NAME)
    assert [m["name"] for m in store.list()] == ["base"]
    assert store.gc(dry_run=True).objects == [] and store.verify().ok


def test_register_refuses_what_manifests_could_not_hold():
    class Bad(RowSignCodec):
        pass

    for attr, value, match in (
        ("version", True, "version"),
        ("uses_base", "yes", "uses_base"),
        ("name", "ѕign1", "ASCII"),  # a Cyrillic look-alike
        ("name", "x" * 65, "ASCII"),
        ("part_names", ["signs"], "part names"),
    ):
        codec = Bad()
        setattr(codec, attr, value)
        with pytest.raises(ValueError, match=match):
            codecs.register(codec)
    assert NAME not in codecs.names()


def test_verify_names_the_missing_codec_plugin(toy_store, rowsign):
    codecs.registry.unregister(NAME)
    try:
        report = toy_store.verify()
        assert [p["kind"] for p in report.problems] == ["bad-manifest"]
        assert "unknown to this deltahub" in report.problems[0]["detail"]
        assert "install the package that provides that codec" in report.problems[0]["detail"]
        assert toy_store.gc().objects == []  # nothing of the unreadable model is collected
    finally:
        codecs.register(rowsign)
    assert toy_store.verify().ok


@pytest.mark.parametrize("src, match", [
    ("", "empty string"),
    ("~nosuchuser_zz/x", "no such checkpoint directory"),
    ("x" * 5000, "the name is too long"),
])
def test_odd_checkpoint_specs_get_one_clear_error(store, model_dirs, src, match):
    store.add(model_dirs["llama"]["base"], name="base")
    with pytest.raises(InputError, match=match) as info:
        store.compress(src, base="base", name="x")
    assert len(str(info.value)) < 300
