"""Scale calibration by distillation: it helps, changes only scales, is exact, safe and deterministic."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from calibrate_fixtures import one_thread, stored_pair, trained  # noqa: F401
from click.testing import CliRunner
from conftest import snapshot_store

from deltahub.api import CalibrationOptions
from deltahub.cli import cli
from deltahub.codec import Codec, packed_shape
from deltahub.errors import DanglingNameError, IncompatibleBaseError, InputError, NameChangedError, NameExistsError
from deltahub.formats.safetensors_io import SafetensorsReader
from deltahub.ops.calibrate import recon_error_at

FAST = {"samples": 32, "seq_len": 32, "steps": 30, "lr": 0.05}


def _opts(trained, **kw) -> CalibrationOptions:
    return CalibrationOptions(**{"data": trained["calib"], **FAST, **kw})


def _manifest(store, name: str):
    return store._ctx.resolve(name).manifest


def _rows(home: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(home / "index.sqlite")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibration_lowers_the_loss_and_the_heldout_kl(store, trained, arch):
    stored_pair(store, trained, arch)
    ft = trained[arch]["ft"]
    held = {"data": trained["heldout"], "samples": 16, "seq_len": 32}
    before = store.evaluate("ft", finetune=ft, **held)
    result = store.calibrate("ft", ft, _opts(trained))
    after = store.evaluate("ft", finetune=ft, **held)

    assert not result.reverted
    assert result.loss_after < 0.8 * result.loss_before, (result.loss_before, result.loss_after)
    assert after.kl_mean < 0.8 * before.kl_mean, (before.kl_mean, after.kl_mean)
    # Closer to the fine-tune's perplexity, and the base / fine-tune figures did not move.
    assert abs(after.ppl_delta - after.ppl_finetune) < abs(before.ppl_delta - before.ppl_finetune)
    assert after.ppl_base == pytest.approx(before.ppl_base, rel=1e-6)
    assert after.ppl_finetune == pytest.approx(before.ppl_finetune, rel=1e-6)
    assert after.kept_logppl > before.kept_logppl
    n_sign1 = sum(rec.codec == "sign1" for rec in _manifest(store, "ft").tensors.values())
    assert result.n_scales == n_sign1  # every sign1 tensor of these models is a Linear/Conv1D/Embedding
    assert result.top_k is None  # tiny vocabulary: the full teacher distribution is kept


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_scales_change(store, trained, arch):
    old_id = stored_pair(store, trained, arch)
    old = _manifest(store, "ft")
    objects_before = set(store._ctx.objects.iter_ids())
    result = store.calibrate("ft", trained[arch]["ft"], _opts(trained, steps=10))
    new = _manifest(store, "ft")
    assert result.previous_manifest_id == old_id and result.manifest_id != old_id
    assert store._ctx.resolve("ft").manifest_id == result.manifest_id

    assert new.files == old.files and new.base == old.base and new.packing == old.packing
    assert (new.kind, new.model_type, new.architectures, new.dtype) == (old.kind, old.model_type, old.architectures, old.dtype)
    assert new.tensors.keys() == old.tensors.keys()
    assert new.object_ids() == old.object_ids()  # every tensor and file object shared, bit-identical
    changed = 0
    for tname, rec in new.tensors.items():
        prev = old.tensors[tname]
        assert (rec.codec, rec.dtype, rec.shape, rec.object) == (prev.codec, prev.dtype, prev.shape, prev.object)
        if rec.codec == "sign1":
            assert rec.scale == result.scales[tname]["calibrated"]
            assert prev.scale == result.scales[tname]["initial"]
            changed += rec.scale != prev.scale
        else:
            assert rec.scale is None
    assert changed >= len(result.scales) // 2
    # Only the new manifest object was written.
    assert set(store._ctx.objects.iter_ids()) - objects_before == {result.manifest_id}
    assert store.verify().ok


def test_tensor_stats_keep_the_initial_scale(store, trained):
    stored_pair(store, trained, "llama")
    shown = {t["name"]: t for t in store.show("ft", tensors=True)["tensors"]}
    assert all(t["initial_scale"] == t["scale"] for t in shown.values() if t["codec"] == "sign1")
    result = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10))
    again = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10, seed=1))
    after = {t["name"]: t for t in store.show("ft", tensors=True)["tensors"]}
    for tname, t in after.items():
        if t["codec"] != "sign1":
            assert t["initial_scale"] is None and t["scale"] is None
            assert t["rel_recon_error"] == shown[tname]["rel_recon_error"]
            continue
        # The initial scale survives two calibrations; the scale is the latest one.
        assert t["initial_scale"] == shown[tname]["scale"] == result.scales[tname]["initial"]
        assert t["scale"] == again.scales[tname]["calibrated"]
        assert t["rel_delta_norm"] == shown[tname]["rel_delta_norm"]
        # The reconstruction error is the one of the stored scale (>= the L2-optimal initial one).
        expect = recon_error_at(t["scale"], t["initial_scale"], t["initial_scale"], shown[tname]["rel_recon_error"])
        assert t["rel_recon_error"] == pytest.approx(expect, rel=1e-9)
        assert t["rel_recon_error"] >= shown[tname]["rel_recon_error"] - 1e-6


def test_recon_error_formula_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 96, generator=gen, dtype=torch.float64)
    s0 = float(delta.abs().mean())
    sign = torch.where(delta >= 0, 1.0, -1.0).double()

    def err(s: float) -> float:
        return float((delta - s * sign).norm() / delta.norm())

    for new in (0.5 * s0, s0, 1.3 * s0, 2.5 * s0):
        assert recon_error_at(new, s0, s0, err(s0)) == pytest.approx(err(new), rel=1e-9)
        assert recon_error_at(new, s0, 1.7 * s0, err(1.7 * s0)) == pytest.approx(err(new), rel=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibrated_delta_materializes_to_base_plus_new_scale_times_signs(store, trained, arch, tmp_path):
    stored_pair(store, trained, arch)
    store.calibrate("ft", trained[arch]["ft"], _opts(trained, steps=10))
    man = _manifest(store, "ft")
    out = tmp_path / "out"
    store.materialize("ft", out)
    got = SafetensorsReader(out / "model.safetensors")
    base = SafetensorsReader(Path(trained[arch]["base"]) / "model.safetensors")
    n_sign1 = 0
    for tname, rec in man.tensors.items():
        if rec.codec != "sign1":
            continue
        n_sign1 += 1
        n, k = rec.shape
        raw = store._ctx.objects.read(rec.object)
        packed = np.frombuffer(bytes(raw), dtype="<u4").reshape(packed_shape(n, k))
        bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :k]
        signs = torch.from_numpy(np.where(bits == 1, 1.0, -1.0).astype(np.float32))
        expect = (base.read(tname).to(torch.float32) + torch.tensor(rec.scale, dtype=torch.float32) * signs)
        expect = expect.to(getattr(torch, rec.dtype))
        assert torch.equal(got.read(tname).view(torch.uint8), expect.contiguous().view(torch.uint8)), tname
    assert n_sign1 > 0


def test_same_seed_same_scales(store, trained):
    stored_pair(store, trained, "llama", name="a")
    store.compress(trained["llama"]["ft"], base="base", name="b")  # the same delta, a second name
    ra = store.calibrate("a", trained["llama"]["ft"], _opts(trained, steps=10, seed=3))
    rb = store.calibrate("b", trained["llama"]["ft"], _opts(trained, steps=10, seed=3))
    assert ra.manifest_id == rb.manifest_id and ra.scales == rb.scales and ra.loss_after == rb.loss_after
    rc = store.calibrate("b", trained["llama"]["ft"], _opts(trained, steps=10, seed=4))
    assert rc.manifest_id != rb.manifest_id  # another seed draws other samples and batches
    assert rc.previous_manifest_id == rb.manifest_id
    rows = _rows(store.home, "select manifest_id, previous_manifest_id, seed, steps, samples, seq_len from calibrations")
    assert len(rows) == 3 and {r[2] for r in rows} == {3, 4}


def test_the_new_manifest_is_on_disk_before_its_index_rows_and_name(store, trained, monkeypatch):
    """Invariant 2: objects -> index rows -> name. The calibrated manifest is written inside a batch,
    so it must be flushed into objects/ before the first index write that follows it."""
    stored_pair(store, trained, "llama")
    ctx = store._ctx
    on_disk_at_writes: list[set[str]] = []
    put, session = ctx.put, ctx.index.session

    def spy_put(*args, **kwargs):
        info = put(*args, **kwargs)
        on_disk_at_writes.clear()  # only the writes after the last object count
        return info

    def spy_session(*args, **kwargs):
        if kwargs.get("write", True):
            on_disk_at_writes.append(set(ctx.objects.iter_ids()))
        return session(*args, **kwargs)

    monkeypatch.setattr(ctx, "put", spy_put)
    monkeypatch.setattr(ctx.index, "session", spy_session)
    result = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=2))
    assert len(on_disk_at_writes) >= 2  # the index rows, then the name
    assert all(result.manifest_id in ids for ids in on_disk_at_writes)


def test_calibration_is_recorded_and_shown(store, trained):
    old_id = stored_pair(store, trained, "llama")
    result = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=10))
    info = store.show("ft")
    cal = info["calibration"]
    assert set(cal) == {
        "previous_manifest_id", "created_at", "teacher", "data", "samples", "seq_len", "steps", "lr", "seed",
        "device", "top_k", "n_scales", "loss_before", "loss_after", "seconds",
    }
    assert cal["previous_manifest_id"] == old_id
    assert cal["loss_before"] == result.loss_before and cal["loss_after"] == result.loss_after
    assert (cal["steps"], cal["lr"], cal["samples"], cal["seq_len"], cal["seed"]) == (10, 0.05, 32, 32, 0)
    assert cal["data"] == f"text:{trained['calib']}" and cal["teacher"] == str(trained["llama"]["ft"])
    assert cal["n_scales"] == result.n_scales and cal["device"] == "cpu" and cal["seconds"] > 0
    assert info["evaluation"] is None


# --------------------------------------------------------------------------- bad input
def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


BAD_DATA = {
    "empty": ("calib.txt", "  \n\n", "is empty"),
    "binary": ("calib.txt", b"\x00\x01\x02w1 w2", "not a text file"),
    "not-utf8": ("calib.txt", b"w1 w2 \xff\xfe w3", "not UTF-8"),
    "invalid-json": ("calib.jsonl", '{"text": "w1 w2"}\n{"text": oops}\n', "line 2 is not valid JSON"),
    "wrong-keys": ("calib.jsonl", '{"prompt": "w1 w2"}\n', 'neither "text" nor "messages"'),
    "no-chat-template": ("calib.jsonl", '{"messages": [{"role": "user", "content": "w1"}]}\n', "chat template"),
    "too-short": ("calib.txt", "w1 w2 w3 w4 w5\n", "shorter than one sequence of 32"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_calibration_data_is_refused_and_changes_nothing(store, trained, tmp_path, case):
    stored_pair(store, trained, "llama")
    fname, content, fragment = BAD_DATA[case]
    before = snapshot_store(store.home)
    with pytest.raises(InputError) as exc:
        store.calibrate("ft", trained["llama"]["ft"], _opts(trained, data=_write(tmp_path, fname, content)))
    assert fragment in str(exc.value) and exc.value.hint
    assert snapshot_store(store.home) == before


def test_a_fine_tune_that_does_not_match_is_refused(store, trained):
    stored_pair(store, trained, "llama")
    before = snapshot_store(store.home)
    with pytest.raises(IncompatibleBaseError, match="is not the one 'ft' was compressed from"):
        store.calibrate("ft", trained["llama"]["other"], _opts(trained))
    with pytest.raises(IncompatibleBaseError, match="gpt2"):
        store.calibrate("ft", trained["gpt2"]["ft"], _opts(trained))
    with pytest.raises(InputError, match="neither a checkpoint folder"):
        store.calibrate("ft", "no-such-thing", _opts(trained))
    with pytest.raises(InputError, match="is a stored delta"):
        store.calibrate("ft", "ft", _opts(trained))
    with pytest.raises(InputError, match="base model"):
        store.calibrate("base", trained["llama"]["ft"], _opts(trained))
    with pytest.raises(InputError, match="at least 1"):
        store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=0))
    assert snapshot_store(store.home) == before


def _dangle(home: Path, name: str, manifest_id: str) -> None:
    """A name pointing at a manifest the index does not hold (a damaged index, as `verify` reports)."""
    con = sqlite3.connect(home / "index.sqlite")
    try:
        con.execute("PRAGMA foreign_keys=OFF")
        con.execute(
            "insert into names (name, manifest_id, created_at, updated_at) values (?, ?, datetime('now'), datetime('now'))",
            (name, manifest_id),
        )
        con.commit()
    finally:
        con.close()


def test_a_dangling_name_is_a_clear_error(store, trained):
    """Regression: a stored name whose manifest is gone, given as the fine-tune, was an AttributeError
    (``None.kind``); as the delta it failed only when publishing, after the training."""
    stored_pair(store, trained, "llama")
    _dangle(store.home, "gone", "f" * 64)
    before = snapshot_store(store.home)
    with pytest.raises(DanglingNameError, match="'gone' points at manifest ffffffffffff") as err:
        store.calibrate("ft", "gone", _opts(trained))
    assert "deltahub rm gone" in err.value.hint and "verify" in err.value.hint
    with pytest.raises(DanglingNameError, match="'gone' points at manifest"):
        store.calibrate("gone", trained["llama"]["ft"], _opts(trained))
    assert snapshot_store(store.home) == before
    assert {p["kind"] for p in store.verify().problems} == {"dangling-name"}


def test_the_name_moves_only_if_it_still_points_at_the_calibrated_manifest(store, trained, monkeypatch):
    """Compare-and-set: a name re-pointed by another process during the calibration is not moved."""
    stored_pair(store, trained, "llama")
    other = store.compress(trained["llama"]["other"], base="base", name="other").manifest_id
    ctx = store._ctx
    real = ctx.index.add_manifest

    def repoint_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        ctx.set_name("ft", other, force=True)  # another process, between the rows and the name

    monkeypatch.setattr(ctx.index, "add_manifest", repoint_meanwhile)
    with pytest.raises(NameChangedError, match="'ft' was changed by another process during the calibration") as err:
        store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=2))
    assert isinstance(err.value, NameExistsError) and err.value.hint == "run the calibration again"
    monkeypatch.undo()
    assert store.show("ft")["manifest_id"] == other
    store.gc()
    assert store.verify().ok


def test_a_stored_dense_copy_of_the_fine_tune_is_a_teacher(store, trained):
    stored_pair(store, trained, "llama")
    store.add(trained["llama"]["ft"], name="ft-dense")
    by_folder = store.calibrate("ft", trained["llama"]["ft"], _opts(trained, steps=5))
    store.compress(trained["llama"]["ft"], base="base", name="ft2")
    by_name = store.calibrate("ft2", "ft-dense", _opts(trained, steps=5))
    assert by_name.manifest_id == by_folder.manifest_id and by_name.teacher == "stored:ft-dense"


# --------------------------------------------------------------------------- CLI
def _cli(home: Path, *args, expect: int = 0):
    result = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def test_compress_calibrate_and_calibrate_commands(home, trained, tmp_path):
    dirs = trained["llama"]
    _cli(home, "add", dirs["base"], "--name", "base")
    fast = ["--calib-data", trained["calib"], "--calib-samples", 16, "--calib-seq-len", 32, "--calib-steps", 5,
            "--calib-lr", 0.05, "--seed", 1, "--device", "cpu"]
    out = json.loads(_cli(home, "compress", dirs["ft"], "--base", "base", "--name", "ft", "--calibrate", *fast, "--json").stdout)
    cal = out["calibration"]
    assert cal["loss_after"] < cal["loss_before"] and cal["steps"] == 5 and cal["seed"] == 1
    assert out["manifest_id"] == cal["manifest_id"] != cal["previous_manifest_id"]
    shown = json.loads(_cli(home, "show", "ft", "--json").stdout)
    assert shown["manifest_id"] == cal["manifest_id"] and shown["calibration"]["loss_after"] == cal["loss_after"]

    text = _cli(home, "calibrate", "ft", "--finetune", dirs["ft"], *fast).stdout
    assert "calibrated ft" in text and "loss" in text
    again = json.loads(_cli(home, "calibrate", "ft", "--finetune", dirs["ft"], *fast, "--json").stdout)
    assert again["previous_manifest_id"] != cal["previous_manifest_id"]

    shown_text = _cli(home, "show", "ft").stdout
    assert "calibration:" in shown_text and "loss" in shown_text
    table = _cli(home, "show", "ft", "--tensors").stdout
    assert "INITIAL" in table

    # Bad input: one-line error, exit code of InputError, nothing changed.
    empty = _write(tmp_path, "empty.txt", "")
    before = snapshot_store(home)
    result = _cli(home, "calibrate", "ft", "--finetune", dirs["ft"], "--calib-data", empty, expect=5)
    assert result.stderr.startswith("Error: ") and "is empty" in result.stderr and len(result.stderr.splitlines()) == 1
    result = _cli(home, "compress", dirs["ft"], "--base", "base", "--name", "ft3", "--calibrate",
                  "--calib-data", empty, expect=5)
    assert "is empty" in result.stderr
    assert snapshot_store(home) == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_trainer_touches_nothing_but_the_scales(store, trained, arch):
    """On the student itself: every parameter and buffer but the scales is bit-identical after
    training, and nothing else ever requires a gradient (norms, dense tensors, biases, heads)."""
    from deltahub.calibrate.distill import DistillConfig, calibrate_scales, delta_scales
    from deltahub.calibrate.targets import run_pass
    from deltahub.ops.load import load_model

    stored_pair(store, trained, arch)
    tok = store.load_tokenizer("ft")
    from deltahub.calibrate.data import load_samples

    tokens = load_samples(trained["calib"], tok, 8, 32).tokens
    teacher = store.load_model("base", dtype=torch.float32)  # any teacher will do here
    targets = run_pass(teacher, tokens, keep_targets=True).targets
    student = load_model(store._ctx, "ft", dtype=torch.float32, mode="delta", trainable_scales=True)
    for p in student.parameters():
        p.requires_grad_(True)  # even if everything asks for gradients, only the scales get trained
    sign1 = {n for n, rec in _manifest(store, "ft").tensors.items() if rec.codec == "sign1"}
    scales = delta_scales(student, sign1)
    assert set(scales) == sign1
    scale_ids = {id(p) for p in scales.values()}
    before = {n: t.detach().clone() for n, t in student.state_dict(keep_vars=True).items() if id(t) not in scale_ids}
    seen_grad: set[str] = set()
    hooks = [
        p.register_hook(lambda g, n=n: seen_grad.add(n))
        for n, p in student.named_parameters()
        if id(p) not in scale_ids
    ]
    run = calibrate_scales(student, scales, tokens, targets, DistillConfig(steps=3, lr=0.05))
    for h in hooks:
        h.remove()
    assert not seen_grad, sorted(seen_grad)[:5]
    after = student.state_dict(keep_vars=True)
    for n, t in before.items():
        a = after[n].detach()
        assert a.dtype == t.dtype and torch.equal(a.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), n
    assert any(run.final[n] != run.initial[n] for n in run.final)
    assert [n for n, p in student.named_parameters() if p.requires_grad] == []
