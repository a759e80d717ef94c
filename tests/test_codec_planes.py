"""Codec ``planes``: progressive sign planes with per-matrix, per-row and per-group scales."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltahub
from deltahub import codec as codecs
from deltahub.errors import InputError
from deltahub.formats.manifest import parse_manifest
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401

GRANULARITY = [("matrix", None), ("row", None), ("group", 64)]


def _reference(base: torch.Tensor, ft: torch.Tensor, k: int, scales: str, group: int | None) -> torch.Tensor:
    """Residual binarization written out plainly (fp32 residual, float64 group means, rows and
    groups looped), independent of the codec's code: the fp32 reconstruction ``base + Σ s_i ⊙ S_i``."""
    r = ft.float() - base.float()
    n, kk = r.shape
    acc = base.float().clone()
    for _ in range(k):
        signs = torch.where(r >= 0, 1.0, -1.0)
        s = torch.empty_like(r)
        if scales == "matrix":
            s[:] = float(r.abs().double().mean())
        else:
            g = kk if scales == "row" else group
            for row in range(n):
                for c0 in range(0, kk, g):
                    s[row, c0 : c0 + g] = float(r[row, c0 : c0 + g].abs().double().mean())
        step = s * signs
        acc = acc + step
        r = r - step
    return acc


@pytest.mark.parametrize("scales, group", GRANULARITY)
def test_decode_matches_the_plain_reference_and_prefixes_never_get_worse(scales, group):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(24, 200, generator=g)
    ft = base + 0.02 * torch.randn(24, 200, generator=g)
    planes = codecs.get("planes")
    errors = []
    enc = planes.encode(base, ft, planes=4, scales=scales, group_size=group)
    for k in (1, 2, 3, 4):
        params, parts = planes.prefix(enc.params, {p: p for p in enc.parts}, k)
        got = planes.decode(base, {p: enc.parts[p] for p in parts}, params, torch.float32)
        want = _reference(base, ft, k, scales, group)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (k, float((got - want).abs().max()))
        errors.append(float((got - ft).norm()))
        # the first k planes of a 4-plane encode are exactly a k-plane encode
        alone = planes.encode(base, ft, planes=k, scales=scales, group_size=group)
        assert torch.equal(planes.decode(base, alone.parts, alone.params, torch.float32), got)
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.4 * errors[0]  # Gaussian deltas: 4 planes leave ~0.31 of the 1-plane error
    assert enc.rel_recon_error == pytest.approx(errors[-1] / float((ft - base).norm()), rel=1e-4)


@pytest.mark.parametrize("scales, group", GRANULARITY)
def test_operator_matches_the_decoded_delta(scales, group):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 130, generator=g)
    ft = base + 0.05 * torch.randn(40, 130, generator=g)
    planes = codecs.get("planes")
    enc = planes.encode(base, ft, planes=3, scales=scales, group_size=group)
    delta = planes.decode(base, enc.parts, enc.params, torch.float32) - base
    op = planes.operator(enc.parts, enc.params, (40, 130))
    x = torch.randn(5, 130, generator=g)
    assert torch.allclose(op.matmul(x), x @ delta.t(), atol=1e-5)
    idx = torch.tensor([0, 39, 7, 7])
    assert torch.allclose(op.rows(idx), delta[idx], atol=1e-6)


def test_bad_parameters_are_refused():
    planes = codecs.get("planes")
    for options in ({"planes": 0}, {"planes": 9}, {"scales": "col"}, {"scales": "group", "group_size": 48},
                    {"scales": "row", "group_size": 64}, {"bits": 2}):
        with pytest.raises(codecs.CodecError):
            planes.check_options(options)


@pytest.fixture
def filled(store, model_dirs):
    dirs = model_dirs["llama"]
    store.add(dirs["base"], name="base")
    return store


def _manifest(store, name):
    return parse_manifest(store._ctx.objects.read(store.show(name)["manifest_id"]))


def test_one_plane_with_a_matrix_scale_is_sign1_bit_for_bit(filled, model_dirs):
    ft = model_dirs["llama"]["ft"]
    filled.compress(ft, base="base", name="sign1")
    filled.compress(ft, base="base", name="one", codec="planes", codec_options={"planes": 1, "scales": "matrix"})
    assert filled.show("one")["manifest_id"] == filled.show("sign1")["manifest_id"]
    assert _manifest(filled, "one").version() == 1


@pytest.mark.parametrize("scales, group", GRANULARITY)
def test_materialize_bits_is_the_smaller_delta(filled, model_dirs, tmp_path, scales, group):
    """``materialize --bits k`` of a 3-plane delta writes the same bytes as a k-plane delta, and a
    matrix's checkpoint tensor equals the plain reference."""
    ft_dir = model_dirs["llama"]["ft"]
    opts = {"scales": scales, **({"group_size": group} if group else {})}
    filled.compress(ft_dir, base="base", name="p3", codec="planes", codec_options={"planes": 3, **opts})
    man = _manifest(filled, "p3")
    assert man.version() == 2 and {r.codec for r in man.tensors.values()} >= {"planes"}
    base = load_file(model_dirs["llama"]["base"] / "model.safetensors")
    ft = load_file(ft_dir / "model.safetensors")
    for k in (1, 2, 3):
        filled.materialize("p3", tmp_path / f"p3-{k}", bits=k)
        got = load_file(tmp_path / f"p3-{k}" / "model.safetensors")
        name = next(n for n, r in man.tensors.items() if r.codec == "planes")
        assert torch.allclose(got[name].float(), _reference(base[name], ft[name], k, scales, group), atol=1e-6)
        if k < 3 and not (k == 1 and scales == "matrix"):
            filled.compress(ft_dir, base="base", name=f"p{k}", codec="planes", codec_options={"planes": k, **opts})
            filled.materialize(f"p{k}", tmp_path / f"p{k}")
            assert (tmp_path / f"p{k}" / "model.safetensors").read_bytes() == (tmp_path / f"p3-{k}" / "model.safetensors").read_bytes()
    errs = []
    for k in (1, 2, 3):
        got = load_file(tmp_path / f"p3-{k}" / "model.safetensors")
        errs.append(math.sqrt(sum(float((got[n].float() - ft[n].float()).pow(2).sum()) for n in ft)))
    assert errs[0] > errs[1] > errs[2]


def test_bits_beyond_what_is_stored_is_a_clear_error(filled, model_dirs, tmp_path):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="p2", codec="planes", codec_options={"planes": 2})
    filled.compress(model_dirs["llama"]["ft"], base="base", name="s1")
    for name, bits, match in (("p2", 3, "at most 2 plane"), ("p2", 0, "1 or more"), ("s1", 2, "at most 1 plane"),
                              ("base", 1, "deltas only")):
        with pytest.raises(InputError, match=match):
            filled.materialize(name, tmp_path / "x", bits=bits)
        assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="planes must be an int"):
        filled.compress(model_dirs["llama"]["ft"], base="base", name="bad", codec="planes", codec_options={"planes": 9})
    assert "bad" not in {m["name"] for m in filled.list()}


def test_delta_mode_and_multi_tenant_with_planes(filled, model_dirs):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="rows", codec="planes",
                    codec_options={"planes": 2, "scales": "row"})
    filled.compress(model_dirs["llama"]["ft"], base="base", name="signed")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = filled.load_model("rows")(ids).logits
        got = filled.load_model("rows", mode="delta")(ids).logits
        one = filled.load_model("rows", bits=1)(ids).logits
        one_delta = filled.load_model("rows", mode="delta", bits=1)(ids).logits
        mt = filled.load_multi_tenant(["rows", "signed"])
        batch = mt(ids.repeat(2, 1), ["rows", "signed"]).logits
        signed = filled.load_model("signed")(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(one_delta, one, atol=1e-4, rtol=1e-4) and not torch.allclose(one, want, atol=1e-6)
    assert torch.allclose(batch[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(batch[1], signed[0], atol=1e-4, rtol=1e-4)


def test_planes_round_trip_through_the_hub(filled, model_dirs, tmp_path, hub_server):
    plant_repo(hub_server, "someone/tiny-base", "c" * 40)
    filled.compress(model_dirs["llama"]["ft"], base="base", name="g", codec="planes",
                    codec_options={"planes": 2, "scales": "group", "group_size": 32})
    repo = f"{FAKE_USER}/planes-delta"
    filled.push("g", repo, base_repo="someone/tiny-base@" + "c" * 40)
    b = deltahub.Store(tmp_path / "b")
    try:
        b.add(model_dirs["llama"]["base"], name="base")
        pulled = b.pull(repo, name="g")
        assert pulled.manifest_id == filled.show("g")["manifest_id"]
        filled.materialize("g", tmp_path / "a_out")
        b.materialize("g", tmp_path / "b_out")
        assert (tmp_path / "a_out" / "model.safetensors").read_bytes() == (tmp_path / "b_out" / "model.safetensors").read_bytes()
        assert b.verify().ok
    finally:
        b.close()


def test_cli_bits_options(filled, model_dirs, tmp_path):
    from click.testing import CliRunner

    from deltahub.cli import cli

    home = str(filled._ctx.home)
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(model_dirs["llama"]["ft"]), "--base", "base",
                                 "--name", "p", "--bits", "2", "--scales", "row", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["codecs"]["planes"] > 0
    r = CliRunner().invoke(cli, ["--home", home, "materialize", "p", str(tmp_path / "o"), "--bits", "3"])
    assert r.exit_code == 5 and "at most 2 plane" in r.output
    r = CliRunner().invoke(cli, ["--home", home, "materialize", "p", str(tmp_path / "o"), "--bits", "1"])
    assert r.exit_code == 0, r.output


def test_pull_bits_fetches_only_the_first_planes(filled, model_dirs, tmp_path, hub_server):
    """The Hub layout puts each plane in its own files (plane 0 with the dense tensors), so
    ``pull --bits 1`` downloads only the first file(s); what it stores materializes exactly like
    ``materialize --bits 1`` of the full delta, and a later full pull completes it."""
    plant_repo(hub_server, "someone/tiny-base", "c" * 40)
    filled.compress(model_dirs["llama"]["ft"], base="base", name="p3", codec="planes",
                    codec_options={"planes": 3, "scales": "row"})
    repo = f"{FAKE_USER}/planes3"
    pushed = filled.push("p3", repo, base_repo="someone/tiny-base@" + "c" * 40)
    delta_files = sorted(f for f in pushed.files if f.startswith("delta-"))
    assert len(delta_files) == 3  # one per plane
    b = deltahub.Store(tmp_path / "b")
    try:
        b.add(model_dirs["llama"]["base"], name="base")
        one = b.pull(repo, name="one", bits=1)
        assert [f for f in one.downloaded if f.startswith("delta-")] == delta_files[:1]
        full = b.pull(repo, name="full")
        assert [f for f in full.downloaded if f.startswith("delta-")] == delta_files[1:]  # plane 0 is stored
        assert full.bytes > one.bytes > 0
        assert one.manifest_id != full.manifest_id == filled.show("p3")["manifest_id"]
        b.materialize("one", tmp_path / "b1")
        filled.materialize("p3", tmp_path / "a1", bits=1)
        assert (tmp_path / "b1" / "model.safetensors").read_bytes() == (tmp_path / "a1" / "model.safetensors").read_bytes()
        with pytest.raises(InputError, match="at most 3 plane"):
            b.pull(repo, name="four", bits=4)
        assert "four" not in {m["name"] for m in b.list()}
        assert b.verify().ok
    finally:
        b.close()


# ------------------------------------------------------------------ hostile try-out findings
def test_a_planes_tensor_must_be_floating_and_verify_checks_part_sizes(filled, model_dirs):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="g", codec="planes",
                    codec_options={"planes": 2, "scales": "group", "group_size": 32})
    raw = json.loads(filled._ctx.objects.read(filled.show("g")["manifest_id"]))
    name = next(n for n, s in raw["tensors"].items() if s["codec"] == "planes")
    int8 = json.loads(json.dumps(raw))
    int8["tensors"][name]["dtype"] = "int8"
    with pytest.raises(Exception, match="must be floating point"):
        parse_manifest(json.dumps(int8).encode())
    wider = json.loads(json.dumps(raw))
    wider["tensors"][name]["params"]["group_size"] = 64  # parses, but the scale parts are too big
    man = parse_manifest(json.dumps(wider, sort_keys=True, separators=(",", ":")).encode())
    from deltahub.store import Compression

    ctx = filled._ctx
    with ctx.writing():
        info = ctx.put(man.to_bytes(), Compression.AUTO)
        ctx.register(man, info, {}, [], "tampered", force=False)
    report = filled.verify()
    assert [(p["kind"], p["subject"]) for p in report.problems] == [("bad-manifest", info.sha256)] * 2
    assert "holds" in report.problems[0]["detail"] and "layout needs" in report.problems[0]["detail"]


def test_group_size_zero_is_refused_not_defaulted(filled, model_dirs):
    with pytest.raises(InputError, match="group_size must be a multiple"):
        filled.compress(model_dirs["llama"]["ft"], base="base", name="x", codec="planes",
                        codec_options={"planes": 2, "scales": "group", "group_size": 0})


def test_cli_refuses_an_explicit_other_codec_with_plane_options(filled, model_dirs):
    from click.testing import CliRunner

    from deltahub.cli import cli

    home = str(filled._ctx.home)
    for extra, match in ((["--codec", "sign1", "--bits", "2"], "set codec planes, not sign1"),
                         (["--codec", "sign1", "--lossless"], "takes no --codec")):
        r = CliRunner().invoke(cli, ["--home", home, "compress", str(model_dirs["llama"]["ft"]), "--base", "base",
                                     "--name", "x", *extra])
        assert r.exit_code == 2 and match in r.output, r.output
    assert [m["name"] for m in filled.list()] == ["base"]


def test_pull_bits_below_one_is_refused_before_any_request(filled, hub_server):
    n = len(hub_server.requests)
    with pytest.raises(InputError, match="1 or more"):
        filled.pull(f"{FAKE_USER}/whatever", bits=0)
    assert len(hub_server.requests) == n
