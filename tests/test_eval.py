"""``deltahub eval``: perplexities, KL and the improvement kept, stored in the index and shown."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from calibrate_fixtures import one_thread, stored_pair, trained  # noqa: F401
from click.testing import CliRunner
from conftest import snapshot_store
from transformers import AutoModelForCausalLM

from deltahub.calibrate.data import load_samples
from deltahub.calibrate.evaluate import improvement_kept
from deltahub.cli import cli
from deltahub.errors import IncompatibleBaseError, InputError

HELD = {"samples": 8, "seq_len": 32}


def _nll(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def test_eval_figures_match_an_independent_computation(store, trained):
    stored_pair(store, trained, "llama")
    dirs = trained["llama"]
    result = store.evaluate("ft", finetune=dirs["ft"], data=trained["heldout"], **HELD)
    tokens = load_samples(trained["heldout"], store.load_tokenizer("ft"), role="eval", **HELD).tokens
    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32).eval()
    ft = AutoModelForCausalLM.from_pretrained(dirs["ft"], dtype=torch.float32).eval()
    delta = store.load_model("ft", dtype=torch.float32).eval()  # materialized: W_base + s*S
    nll = {k: _nll(m, tokens) for k, m in (("base", base), ("ft", ft), ("delta", delta))}
    assert result.ppl_base == pytest.approx(math.exp(nll["base"]), rel=1e-4)
    assert result.ppl_finetune == pytest.approx(math.exp(nll["ft"]), rel=1e-4)
    assert result.ppl_delta == pytest.approx(math.exp(nll["delta"]), rel=1e-4)
    with torch.no_grad():
        logp = F.log_softmax(ft(input_ids=tokens).logits, -1)
        logq = F.log_softmax(delta(input_ids=tokens).logits, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert result.kl_mean == pytest.approx(kl, rel=1e-3)
    assert result.kept_logppl == pytest.approx((nll["base"] - nll["delta"]) / (nll["base"] - nll["ft"]), rel=1e-4)
    assert result.kept_ppl == pytest.approx(
        (result.ppl_base - result.ppl_delta) / (result.ppl_base - result.ppl_finetune), rel=1e-9
    )
    # The trained fine-tune is far better than the base; the 1-bit delta keeps most of it.
    assert result.ppl_finetune < 0.2 * result.ppl_base and 0.5 < result.kept_logppl <= 1.1
    assert (result.n_tokens, result.samples, result.seq_len, result.top_k) == (8 * 31, 8, 32, None)


def test_eval_is_stored_and_shown(store, trained):
    stored_pair(store, trained, "gpt2")
    assert store.show("ft")["evaluation"] is None
    first = store.evaluate("ft", data=trained["heldout"], **HELD)  # no fine-tune: base and delta only
    assert first.ppl_finetune is None and first.kl_mean is None and first.kept_logppl is None
    shown = store.show("ft")["evaluation"]
    assert shown["ppl_delta"] == first.ppl_delta and shown["finetune"] is None
    second = store.evaluate("ft", finetune=trained["gpt2"]["ft"], data=trained["heldout"], **HELD)
    shown = store.show("ft")["evaluation"]  # the latest one
    assert set(shown) == {
        "created_at", "data", "finetune", "samples", "seq_len", "n_tokens", "ppl_base", "ppl_finetune",
        "ppl_delta", "kl_mean", "kept_logppl", "kept_ppl", "top_k", "device", "seconds",
    }
    assert shown["seconds"] == second.seconds and shown["n_tokens"] == second.n_tokens
    assert shown["kl_mean"] == second.kl_mean and shown["finetune"] == str(trained["gpt2"]["ft"])
    assert shown["ppl_base"] == pytest.approx(first.ppl_base, rel=1e-9)
    con = sqlite3.connect(store.home / "index.sqlite")
    try:
        rows = con.execute("select manifest_id, data, samples, seq_len from evaluations").fetchall()
    finally:
        con.close()
    assert len(rows) == 2 and {r[0] for r in rows} == {second.manifest_id}
    assert rows[0][1] == f"text:{trained['heldout']}" and rows[0][2:] == (8, 32)
    # A calibrated manifest starts without evaluation; the old manifest's rows stay with it.
    store.calibrate("ft", trained["gpt2"]["ft"], data=trained["calib"], samples=16, seq_len=32, steps=5, lr=0.05)
    assert store.show("ft")["evaluation"] is None


def test_eval_with_the_bundled_corpus_by_default(store, model_dirs):
    """No --data: the held-out 20 % of the bundled corpus (mostly <unk> for this tiny vocabulary,
    but it runs end to end)."""
    store.add(model_dirs["llama"]["base"], name="base")
    store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    result = store.evaluate("ft", finetune=model_dirs["llama"]["ft"], samples=2, seq_len=16)
    assert result.data == "bundled:alice.txt[80%:]" and result.samples == 2
    assert result.kl_mean is not None and result.kl_mean >= 0


def test_eval_bad_input_changes_nothing(store, trained, tmp_path):
    stored_pair(store, trained, "llama")
    (tmp_path / "empty.txt").write_text("")
    before = snapshot_store(store.home)
    with pytest.raises(InputError, match="is empty"):
        store.evaluate("ft", data=tmp_path / "empty.txt", **HELD)
    with pytest.raises(IncompatibleBaseError):
        store.evaluate("ft", finetune=trained["llama"]["other"], data=trained["heldout"], **HELD)
    with pytest.raises(InputError, match="base model"):
        store.evaluate("base", data=trained["heldout"], **HELD)
    with pytest.raises(InputError, match="eval seq_len must be at least 2, got 1"):
        store.evaluate("ft", data=trained["heldout"], samples=8, seq_len=1)
    with pytest.raises(InputError, match="eval batch_size must be at least 1, got 0"):
        store.evaluate("ft", data=trained["heldout"], batch_size=0, **HELD)
    with pytest.raises(InputError, match="no CUDA device"):
        if torch.cuda.is_available():
            raise InputError("no CUDA device (skipped: this machine has one)")
        store.evaluate("ft", data=trained["heldout"], device="cuda", **HELD)
    assert snapshot_store(store.home) == before


def test_improvement_kept():
    assert improvement_kept(10.0, 5.0, 6.0) == pytest.approx(0.8)
    assert improvement_kept(10.0, 5.0, 4.0) == pytest.approx(1.2)
    assert improvement_kept(5.0, 5.0, 4.0) is None  # no improvement to keep
    assert improvement_kept(5.0, 6.0, 4.0) is None


def test_eval_command(home, trained):
    dirs = trained["llama"]

    def run(*args, expect=0):
        r = CliRunner().invoke(cli, ["--home", str(home), *map(str, args)], catch_exceptions=False)
        assert r.exit_code == expect, r.output
        return r

    run("add", dirs["base"], "--name", "base")
    run("compress", dirs["ft"], "--base", "base", "--name", "ft")
    args = ["eval", "ft", "--finetune", dirs["ft"], "--data", trained["heldout"], "--samples", 4, "--seq-len", 32]
    out = json.loads(run(*args, "--json").stdout)
    assert out["kl_mean"] > 0 and out["ppl_finetune"] < out["ppl_base"] and out["n_tokens"] == 4 * 31
    text = run(*args).stdout
    assert "perplexity:" in text and "KL(ft||delta)" in text and "kept:" in text
    shown = run("show", "ft").stdout
    assert "evaluation:" in shown and "kept:" in shown
    bad = run("eval", "ft", "--data", trained["heldout"], "--seq-len", 100000, expect=5)
    assert bad.stderr.startswith("Error: ") and "shorter than one sequence" in bad.stderr
