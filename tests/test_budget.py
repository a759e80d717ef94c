"""Size budgets (issue 11 part 3): ``compress --avg-bits / --max-size`` chooses the planes of each
matrix by measured sensitivity, stores the order in which planes pay, and ``materialize`` / ``pull``
/ ``load_model`` ``max_size`` pick the best prefix of one stored artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import deltahub
from deltahub.errors import CorruptObjectError, IncompatibleBaseError, InputError, UnsupportedFormatError
from deltahub.formats.manifest import parse_manifest
from deltahub.ops.budget import Budget, fit_prefix, plane_order, role_plane_order
from hub_fixtures import FAKE_USER, hub_server, plant_repo  # noqa: F401

@pytest.fixture
def filled(store, model_dirs):
    store.add(model_dirs["llama"]["base"], name="base")
    return store


def _manifest(store, name):
    return parse_manifest(store._ctx.objects.read(store.show(name)["manifest_id"]))


def _n_params(manifest) -> int:
    return sum(rec.numel for rec in manifest.tensors.values())


# ------------------------------------------------------------------------------ the allocation
def test_plane_order_takes_the_most_error_per_byte_first_and_keeps_each_tensors_order():
    errors = {"a": [10.0, 4.0, 3.0], "b": [5.0, 4.5, 1.0], "c": [8.0, 2.0, 1.9]}
    costs = {"a": [1, 2, 2], "b": [1, 2, 2], "c": [1, 1, 1]}
    order = plane_order(errors, costs)
    # c's plane 1 removes 6 per byte, a's 3; b's plane 1 pays only with its plane 2 (3.5 over 4
    # bytes beats 0.5 over 2): it comes as a run of two
    assert order[:2] == [("c", 1), ("a", 1)]
    assert order.index(("b", 1)) + 1 == order.index(("b", 2))
    for t in errors:
        planes = [p for n, p in order if n == t]
        assert planes == sorted(planes) == list(range(1, len(errors[t])))
    assert len(order) == 6


def test_role_of_replaces_layer_numbers_only():
    from deltahub.calibrate.sensitivity import role_of

    assert role_of("model.layers.13.mlp.up_proj.weight") == "model.layers.N.mlp.up_proj.weight"
    assert role_of("transformer.h.0.attn.c_attn.weight") == "transformer.h.N.attn.c_attn.weight"
    assert role_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert role_of("layers.2.w2.weight") == "layers.N.w2.weight"
    assert role_of("model.norm2.weight") == "model.norm2.weight"  # a digit inside a name is no layer


def test_role_plane_order_ranks_roles_by_measured_kl_and_tensors_by_fisher():
    # the Fisher says the q role (layers 0, 1) is worth far more than the up role; the measured KL
    # says the opposite: every plane of up comes first, and within up, layer 1 (the larger Fisher gain)
    q, u = "l.{}.q.weight", "l.{}.up.weight"
    errors = {q.format(0): [100.0, 50.0, 40.0], q.format(1): [100.0, 60.0, 50.0],
              u.format(0): [2.0, 1.5, 1.0], u.format(1): [2.0, 1.0, 0.2]}
    costs = dict.fromkeys(errors, [4, 4, 4])
    measured = {"l.N.q.weight": [0.01, 0.009, 0.008], "l.N.up.weight": [0.5, 0.1, 0.05]}
    order = role_plane_order(errors, costs, measured)
    assert order[:4] == [(u.format(1), 1), (u.format(0), 1), (u.format(1), 2), (u.format(0), 2)]
    assert sorted(order) == sorted((t, p) for t in errors for p in (1, 2))
    for t in errors:
        assert [p for n, p in order if n == t] == [1, 2]
    # without a measurement a role falls back to its Fisher sum: q first
    assert role_plane_order(errors, costs, {})[0] == (q.format(0), 1)
    # a measurement that is not finite (or too short) is not used
    without_up = role_plane_order(errors, costs, {"l.N.q.weight": measured["l.N.q.weight"]}, per_kl=1000.0)
    for bad in ([float("nan"), 0.1, 0.05], [0.5, 0.1], [-1.0, 0.1, 0.05]):
        assert role_plane_order(errors, costs, {**measured, "l.N.up.weight": bad}, per_kl=1000.0) == without_up


def test_a_role_without_a_measurement_gets_the_measured_roles_factor():
    # a and b are measured at 10x their Fisher figure; c has no measurement. Unscaled, c's Fisher gain
    # per byte (2/4) would come after a's measured one (10/4); scaled by the median factor 10, first.
    errors = {"a.weight": [2.0, 1.0], "b.weight": [2.0, 1.0], "c.weight": [3.0, 1.0]}
    costs = dict.fromkeys(errors, [4, 4])
    measured = {"a.weight": [20.0, 10.0], "b.weight": [20.0, 10.0]}
    assert role_plane_order(errors, costs, measured)[0] == ("c.weight", 1)
    assert role_plane_order(errors, costs, {**measured, "c.weight": [3.0, 1.0]})[-1] == ("c.weight", 1)
    # a KL a hair below zero (fp32 rounding of an unchanged role) is a measurement of 0, not a fallback
    tiny = role_plane_order(errors, costs, {**measured, "c.weight": [-1e-9, -2e-9]})
    assert tiny[-1] == ("c.weight", 1)


def test_measure_roles_measures_each_role_and_puts_every_weight_back(model_dirs):
    from transformers import AutoModelForCausalLM

    from deltahub.calibrate.sensitivity import measure_roles, role_of

    model = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]["ft"]))
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {n: p.detach().clone() for n, p in params.items()}
    names = [n for n in params if n.endswith(("up_proj.weight", "q_proj.weight"))]
    roles: dict[str, list[str]] = {}
    for n in names:
        roles.setdefault(role_of(n), []).append(n)
    gen = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(params[n].shape, generator=gen) for n in names}
    scale = {"up_proj": 0.5, "q_proj": 0.05}

    def prefixes(name):
        w = params[name].detach().clone()
        s = next(v for k, v in scale.items() if k in name)
        return lambda k: w + noise[name] * s / 4 ** (k - 1)  # the error shrinks with every plane

    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=gen)
    kl = measure_roles(model, tokens, roles, prefixes, 3, batch_size=2)
    assert set(kl) == set(roles) and all(len(c) == 3 for c in kl.values())
    for curve in kl.values():
        assert curve[0] > curve[1] > curve[2] > 0
    assert kl["model.layers.N.mlp.up_proj.weight"][0] > kl["model.layers.N.self_attn.q_proj.weight"][0]
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    exact = measure_roles(model, tokens, roles, lambda n: (lambda k, w=params[n].detach().clone(): w), 2)
    assert all(v < 1e-6 for c in exact.values() for v in c)

    def broken(name):
        return lambda k: torch.zeros(3) if k == 2 else params[name].detach() * 2

    with pytest.raises(ValueError, match="shape"):
        measure_roles(model, tokens, roles, broken, 2)
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_fit_prefix_never_exceeds_the_budget_and_refuses_one_below_the_minimum():
    order = [("a", 1), ("b", 1), ("a", 2)]
    costs = {"a": [10, 5, 7], "b": [10, 4]}
    assert fit_prefix(20, order, costs, 20) == 0
    assert fit_prefix(20, order, costs, 25) == 1
    assert fit_prefix(20, order, costs, 28) == 1  # b's plane would fit after a's, but a prefix stops
    assert fit_prefix(20, order, costs, 29) == 2
    assert fit_prefix(20, order, costs, 10**9) == 3
    with pytest.raises(InputError, match="needs 20"):
        fit_prefix(20, order, costs, 19, n_params=100)


@pytest.mark.parametrize("bad", [dict(), dict(avg_bits=1.0, max_bytes=10), dict(avg_bits=-1.0), dict(avg_bits=math.nan),
                                 dict(max_bytes=0), dict(avg_bits=2.0, max_planes=9)])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(InputError):
        Budget(**bad).check()


# ------------------------------------------------------------------------------ compress
@pytest.mark.parametrize("avg_bits", [1.8, 2.5, 3.5])
def test_a_budget_is_met_and_never_exceeded(filled, model_dirs, avg_bits):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=avg_bits, calibration=_cal())
    m = _manifest(filled, "d")
    assert m.version() == 2 and m.plane_order is not None
    budget = math.floor(avg_bits * _n_params(m) / 8)
    assert m.tensor_nbytes() <= budget
    # every stored plane is in the order, and the order is what the tensors hold
    planes = m.planes_of()
    assert len(m.plane_order) == sum(k - 1 for k in planes.values())
    assert max(planes.values()) <= 4


def test_more_budget_buys_more_planes_and_a_smaller_budget_is_a_prefix(filled, model_dirs, tmp_path):
    ft = model_dirs["llama"]["ft"]
    filled.compress(ft, base="base", name="big", avg_bits=3.5, calibration=_cal())
    filled.compress(ft, base="base", name="small", avg_bits=2.2, calibration=_cal())
    big, small = _manifest(filled, "big"), _manifest(filled, "small")
    assert big.tensor_nbytes() > small.tensor_nbytes()
    assert sum(big.planes_of().values()) > sum(small.planes_of().values())
    # the small budget, served from the big artifact, is exactly the small compress
    cut = big.at_size(math.floor(2.2 * _n_params(big) / 8))
    assert cut.tensors == small.tensors
    assert cut.plane_order == small.plane_order
    # and materializes to the same bytes
    filled.materialize("big", tmp_path / "cut", max_size=math.floor(2.2 * _n_params(big) / 8))
    filled.materialize("small", tmp_path / "small")
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "small" / "model.safetensors").read_bytes()


def test_the_sensitivity_decides_the_allocation(filled, model_dirs, store, tmp_path):
    """A matrix whose error moves the output more gets more planes: with the fine-tune's change to
    one matrix scaled up 20x (its error too), that matrix gets more planes than before, and the most."""
    from conftest import save_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]["ft"]))
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]["base"]))
    loud = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        w, b = dict(model.named_parameters())[loud], dict(base.named_parameters())[loud]
        w.copy_(b + 20 * (w - b))
    save_checkpoint(model, tmp_path / "loud")
    filled.compress(tmp_path / "loud", base="base", name="loud", avg_bits=2.5, calibration=_cal())
    filled.compress(model_dirs["llama"]["ft"], base="base", name="quiet", avg_bits=2.5, calibration=_cal())
    planes, before = _manifest(filled, "loud").planes_of(), _manifest(filled, "quiet").planes_of()
    assert planes[loud] == max(planes.values()) > before[loud]


def test_a_budget_below_the_smallest_delta_changes_nothing(filled, model_dirs):
    before = (sorted(m["name"] for m in filled.list()), filled.du()["objects"])
    with pytest.raises(InputError, match="one plane of every matrix alone needs") as err:
        filled.compress(model_dirs["llama"]["ft"], base="base", name="d", max_size=1000, calibration=_cal())
    assert "--max-size" in err.value.hint
    assert (sorted(m["name"] for m in filled.list()), filled.du()["objects"]) == before
    assert filled.verify().ok


def test_a_budget_needs_a_progressive_codec(filled, model_dirs):
    with pytest.raises(InputError, match="has no planes"):
        filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=2.0, codec="lossless")


# ------------------------------------------------------------------------------ reading a prefix
def test_max_size_reads_the_best_prefix_and_refuses_bad_sizes(filled, model_dirs, tmp_path):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=3.0, calibration=_cal())
    m = _manifest(filled, "d")
    sizes = m.prefix_sizes()
    mid = sizes[len(sizes) // 2]
    filled.materialize("d", tmp_path / "mid", max_size=mid)
    filled.materialize("d", tmp_path / "mid1", max_size=mid + 1)  # one byte more buys nothing new
    assert (tmp_path / "mid" / "model.safetensors").read_bytes() == (tmp_path / "mid1" / "model.safetensors").read_bytes()
    filled.materialize("d", tmp_path / "all")
    filled.materialize("d", tmp_path / "min", max_size=sizes[0])
    full, least, half = (load_file(tmp_path / d / "model.safetensors") for d in ("all", "min", "mid"))
    ft = load_file(model_dirs["llama"]["ft"] / "model.safetensors")

    def err(x):
        return sum(float((x[k].float() - ft[k].float()).norm() ** 2) for k in ft)

    assert err(full) < err(half) < err(least)
    with pytest.raises(InputError, match="too small"):
        filled.materialize("d", tmp_path / "x", max_size=sizes[0] - 1)
    with pytest.raises(InputError, match="give one"):
        filled.materialize("d", tmp_path / "x", max_size=mid, bits=1)
    with pytest.raises(InputError, match="deltas only"):
        filled.materialize("base", tmp_path / "x", max_size=10**9)
    assert not (tmp_path / "x").exists()


def test_load_model_max_size_matches_materialize(filled, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=3.0, calibration=_cal())
    mid = _manifest(filled, "d").prefix_sizes()[3]
    filled.materialize("d", tmp_path / "m", max_size=mid)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    x = torch.randint(3, 100, (2, 12))
    want = ref(input_ids=x).logits
    for mode in ("materialize", "delta"):
        got = filled.load_model("d", mode=mode, max_size=f"{mid}B")(input_ids=x).logits
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), mode


def test_show_prints_the_allocation_per_layer(filled, model_dirs):
    from click.testing import CliRunner

    from deltahub.cli import cli

    home = str(filled._ctx.home)
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(model_dirs["llama"]["ft"]), "--base", "base",
                                 "--name", "d", "--avg-bits", "2.5", "--calib-samples", "8", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["--home", home, "show", "d"])
    assert r.exit_code == 0, r.output
    assert "chosen by sensitivity for a budget" in r.output
    for layer in ("model.layers.0", "model.layers.1"):
        line = next(line for line in r.output.splitlines() if line.strip().startswith(layer))
        assert "q_proj" in line and "down_proj" in line
    info = json.loads(CliRunner().invoke(cli, ["--home", home, "show", "d", "--json"]).output)
    alloc = info["allocation"]
    assert alloc["ordered"] and alloc["planes"] == _manifest(filled, "d").planes_of()
    assert alloc["avg_bits"] <= 2.5 and alloc["min_tensor_bytes"] <= alloc["tensor_bytes"]
    r = CliRunner().invoke(cli, ["--home", home, "compress", str(model_dirs["llama"]["ft"]), "--base", "base",
                                 "--name", "e", "--avg-bits", "2", "--max-size", "1MB"])
    assert r.exit_code == 2 and "give one" in r.output
    r = CliRunner().invoke(cli, ["--home", home, "materialize", "d", "out", "--max-size", "lots"])
    assert r.exit_code == 2 and "--max-size" in r.output


# ------------------------------------------------------------------------------ the Hub
def test_pull_max_size_fetches_only_the_files_of_the_planes_it_keeps(filled, model_dirs, tmp_path, hub_server):
    plant_repo(hub_server, "someone/tiny-base", "c" * 40)
    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=3.5, calibration=_cal())
    full = _manifest(filled, "d")
    repo = f"{FAKE_USER}/budgeted"
    pushed = filled.push("d", repo, base_repo="someone/tiny-base@" + "c" * 40)
    sizes = full.prefix_sizes()
    b = deltahub.Store(tmp_path / "b")
    try:
        b.add(model_dirs["llama"]["base"], name="base")
        budget = sizes[len(sizes) // 2]
        small = b.pull(repo, name="small", max_size=budget)
        got = _manifest(b, "small")
        assert got.tensor_nbytes() <= budget
        assert got.plane_order == full.plane_order[: len(got.plane_order)]
        # every fetched delta file holds only parts the pulled manifest keeps
        kept = set(got.object_ids())
        fetched = [f for f in small.downloaded if f.startswith("delta-")]
        delta_files = sorted(f for f in pushed.files if f.startswith("delta-"))
        assert fetched == delta_files[: len(fetched)] and len(fetched) < len(delta_files)
        from deltahub.hub.layout import parse_hub_manifest

        hub = parse_hub_manifest(_hub_json_bytes(tmp_path, repo))
        for t in hub.tensors:
            if t.file in fetched:
                assert t.stored.object in kept
        # the pulled prefix is the same model as that prefix read from the full artifact
        b.materialize("small", tmp_path / "b_out")
        filled.materialize("d", tmp_path / "a_out", max_size=got.tensor_nbytes())
        assert (tmp_path / "a_out" / "model.safetensors").read_bytes() == (tmp_path / "b_out" / "model.safetensors").read_bytes()
        whole = b.pull(repo, name="whole")
        assert whole.manifest_id == filled.show("d")["manifest_id"]
        assert not set(whole.downloaded) & set(fetched)  # what the small pull fetched is not fetched again
        with pytest.raises(InputError, match="too small"):
            b.pull(repo, name="tiny", max_size=sizes[0] - 1)
        assert "tiny" not in {m["name"] for m in b.list()}
        assert b.verify().ok
    finally:
        b.close()


def _hub_json_bytes(tmp_path, repo):
    from huggingface_hub import hf_hub_download

    return open(hf_hub_download(repo, "deltahub.json", cache_dir=tmp_path / "hfc"), "rb").read()


# ------------------------------------------------------------------------------ the format
def test_a_plane_order_is_validated_when_read(filled, model_dirs):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=3.0, calibration=_cal())
    m = _manifest(filled, "d")
    obj = json.loads(m.to_bytes())
    assert parse_manifest(m.to_bytes()).to_bytes() == m.to_bytes()
    t, p = obj["plane_order"][0]

    def bad(change):
        o = json.loads(m.to_bytes())
        change(o)
        with pytest.raises((CorruptObjectError, UnsupportedFormatError)):
            parse_manifest(json.dumps(o).encode())

    bad(lambda o: o["plane_order"].pop())  # a stored plane left out
    bad(lambda o: o["plane_order"].append([t, p]))  # twice
    bad(lambda o: o["plane_order"].insert(0, ["no.such.weight", 1]))
    bad(lambda o: o["plane_order"].insert(0, [t, 0]))  # plane 0 is never ordered
    bad(lambda o: o.update(plane_order="a"))
    bad(lambda o: o.update(plane_order=[[t, True]]))
    bad(lambda o: o.update(format_version=1))


def _cal():
    from deltahub.api import CalibrationOptions

    return CalibrationOptions(samples=8, seq_len=64)


# ------------------------------------------------------------------------------ hostile try-out findings
def _edited_copy(src, dst, edit=None, nan_in=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if nan_in is not None:
        tensors = load_file(dst / "model.safetensors")
        tensors[nan_in][0, 0] = float("nan")
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_nan_fine_tune_gets_the_nan_refusal_not_a_crash(filled, model_dirs, tmp_path):
    bad = _edited_copy(model_dirs["llama"]["ft"], tmp_path / "nan", nan_in="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(deltahub.errors.DeltaHubError, match="NaN"):
        filled.compress(bad, base="base", name="n", avg_bits=3.0, calibration=_cal())
    r = filled.compress(bad, base="base", name="n", avg_bits=8.0, calibration=_cal(), allow_nonfinite=True)
    assert r.codecs.get("dense", 0) >= 1 and filled.verify().ok


def test_a_fine_tune_transformers_cannot_run_is_a_clear_error(filled, model_dirs, tmp_path):
    for i, edit in enumerate([lambda c: c.update(num_attention_heads=3), lambda c: c.update(architectures=["LlamaModel"]),
                              lambda c: c.update(hidden_size=128)]):
        bad = _edited_copy(model_dirs["llama"]["ft"], tmp_path / f"bad{i}", edit=edit)
        # (another architecture than the base's is refused by the base check, before any measuring)
        with pytest.raises((InputError, IncompatibleBaseError), match="--bits K|sensitivity|cannot load|but base"):
            filled.compress(bad, base="base", name=f"b{i}", avg_bits=3.0, calibration=_cal())


def test_sequences_longer_than_the_context_are_cut_and_bad_devices_refused(store, model_dirs):
    store.add(model_dirs["gpt2"]["base"], name="g")
    from deltahub.api import CalibrationOptions

    store.compress(model_dirs["gpt2"]["ft"], base="g", name="d", avg_bits=3.0,
                   calibration=CalibrationOptions(samples=4, seq_len=1000))  # n_positions is 64
    with pytest.raises(InputError, match="device"):
        store.compress(model_dirs["gpt2"]["ft"], base="g", name="e", avg_bits=3.0,
                       calibration=CalibrationOptions(samples=4, device="nope"))


def test_huge_budgets_keep_everything_and_huge_sizes_are_refused(filled, model_dirs, tmp_path):
    filled.compress(model_dirs["llama"]["ft"], base="base", name="all", avg_bits=1e308, calibration=_cal())
    assert max(_manifest(filled, "all").planes_of().values()) == 4
    with pytest.raises(deltahub.errors.DeltaHubError, match="too large"):
        filled.materialize("all", tmp_path / "x", max_size="9" * 400)


def test_budget_argument_mistakes_are_refused_before_any_work(filled, model_dirs, tmp_path):
    from click.testing import CliRunner

    from deltahub.cli import cli

    home = str(filled._ctx.home)
    ft = str(model_dirs["llama"]["ft"])
    r = CliRunner().invoke(cli, ["--home", home, "compress", ft, "--base", "base", "--name", "x", "--avg-bits", "2",
                                 "--codec", "sign1"])
    assert r.exit_code == 2 and "size budget chooses sign planes" in r.output
    r = CliRunner().invoke(cli, ["--home", home, "compress", ft, "--base", "base", "--name", "x", "--avg-bits", "2",
                                 "--bits", "1"])
    assert r.exit_code != 0 and "--bits must be 2..8" in r.output
    for bad in (16000.5, [], True):
        with pytest.raises(InputError, match="max_size must be"):
            filled.materialize("base", tmp_path / "x", max_size=bad)
    assert "x" not in {m["name"] for m in filled.list()}


def _unprefixed_copy(src, dst, prefix="transformer."):
    """A copy of a checkpoint folder with ``prefix`` removed from every tensor name (as GPT-2 files on the Hub store them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checkpoint_names_without_the_models_prefix_are_measured_the_same(store, model_dirs, tmp_path, caplog):
    """GPT-2 files often store ``h.0.attn.c_attn.weight`` for the model's ``transformer.h.0.…``: the
    sensitivity and the role KLs must still reach those tensors, giving the same allocation."""
    import logging

    base = _unprefixed_copy(model_dirs["gpt2"]["base"], tmp_path / "base")
    ft = _unprefixed_copy(model_dirs["gpt2"]["ft"], tmp_path / "ft")
    store.add(model_dirs["gpt2"]["base"], name="g")
    store.add(base, name="gn")
    store.compress(model_dirs["gpt2"]["ft"], base="g", name="with", avg_bits=3.0, calibration=_cal())
    with caplog.at_level(logging.INFO, logger="deltahub"):
        store.compress(ft, base="gn", name="without", avg_bits=3.0, calibration=_cal())
    assert "median sensitivity" not in caplog.text and "no parameter in the loaded model" not in caplog.text
    assert "KL of h.N.attn.c_attn.weight" in caplog.text  # the roles were measured under the file's names
    with_prefix = {k.removeprefix("transformer."): v for k, v in _manifest(store, "with").planes_of().items()}
    assert _manifest(store, "without").planes_of() == with_prefix


def test_a_budget_below_the_smallest_delta_is_refused_before_measuring(filled, model_dirs, monkeypatch):
    import deltahub.ops.compress as compress_ops

    def measured(*a, **k):
        raise AssertionError("the sensitivity was measured")

    monkeypatch.setattr(compress_ops, "measure_finetune", measured)
    with pytest.raises(InputError, match="one plane of every matrix alone needs"):
        filled.compress(model_dirs["llama"]["ft"], base="base", name="d", max_size=1000, calibration=_cal())
    with pytest.raises(InputError, match="one plane of every matrix alone needs"):
        filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=0.01, calibration=_cal())


def test_gc_is_not_held_up_by_the_role_passes(filled, model_dirs, monkeypatch):
    """The base is read under the store's reading lock tensor by tensor, not across the forward passes:
    gc (which takes that lock exclusively) can run while a budgeted compress measures."""
    import deltahub.calibrate.sensitivity as sensitivity

    real = sensitivity.measure_roles
    took: list[bool] = []

    def measure_roles(*args, **kwargs):
        with filled._ctx.collecting(timeout=2):  # raises if a reader still holds the lock
            took.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure_roles", measure_roles)
    filled.compress(model_dirs["llama"]["ft"], base="base", name="d", avg_bits=2.5, calibration=_cal())
    assert took == [True] and filled.verify().ok


def test_show_tells_same_named_matrices_of_one_layer_apart():
    # GPT-2's attention and MLP both have a c_proj: show must not print "c_proj 1  c_proj 2"
    from deltahub.cli import _allocation_lines

    alloc = {"ordered": True, "planes": {}, "tensor_bytes": 10, "min_tensor_bytes": 5, "avg_bits": 2.0, "min_avg_bits": 1.0,
             "by_layer": [{"layer": "transformer.h.0", "planes": {"attn.c_attn": 1, "attn.c_proj": 2, "mlp.c_fc": 3, "mlp.c_proj": 4}},
                          {"layer": "model.layers.0", "planes": {"self_attn.q_proj": 2, "mlp.up_proj": 1}}]}
    lines = _allocation_lines(alloc)
    assert "--max-size down to 5 bytes" in lines[0]  # exact: a rounded "kB" figure could be refused
    assert lines[1].split() == ["transformer.h.0", "c_attn", "1", "attn.c_proj", "2", "c_fc", "3", "mlp.c_proj", "4"]
    assert lines[2].split() == ["model.layers.0", "q_proj", "2", "up_proj", "1"]


def _both_tied_names_copy(src, dst):
    """A GPT-2 checkpoint folder that stores its tied weight under both names (``lm_head.weight`` too)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_both_stored_names_of_a_tied_weight_keep_one_plane_count(store, model_dirs, tmp_path, caplog):
    """Copies of one tied weight must get the same planes, at the compress budget and at every smaller
    --max-size read: otherwise the output holds two different tensors and loads untied. Their role is
    the one measured (no fallback to the Fisher)."""
    import logging

    caplog.set_level(logging.WARNING, logger="deltahub")
    base = _both_tied_names_copy(model_dirs["gpt2"]["base"], tmp_path / "base")
    ft = _both_tied_names_copy(model_dirs["gpt2"]["ft"], tmp_path / "ft")
    store.add(base, name="g")
    for i, bits in enumerate((2.0, 2.6, 3.4)):
        store.compress(ft, base="g", name=f"t{i}", avg_bits=bits, calibration=_cal())
        man = _manifest(store, f"t{i}")
        planes = man.planes_of()
        assert planes["lm_head.weight"] == planes["transformer.wte.weight"], (bits, planes)
        sizes = man.prefix_sizes()
        for size in sorted({sizes[0], *sizes[:: max(1, len(sizes) // 7)], sizes[-1]}):
            cut = man.at_size(size).planes_of()
            assert cut["lm_head.weight"] == cut["transformer.wte.weight"] and man.at_size(size).tensor_nbytes() <= size
    assert "without a usable KL measurement" not in caplog.text
    store.materialize("t1", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert store.verify().ok
