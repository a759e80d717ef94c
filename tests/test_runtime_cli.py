"""`deltahub generate`: one model (materialize or delta mode) and the multi-tenant form."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import deltahub
from deltahub.cli import cli


def _run(home, *args, expect=0):
    result = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False, env={"DELTAHUB_DEBUG": None})
    assert result.exit_code == expect, (args, result.exit_code, result.output)
    return result


@pytest.fixture
def filled(home, model_dirs):
    with deltahub.Store(home) as store:
        store.add(model_dirs["llama"]["base"], name="base")
        store.compress(model_dirs["llama"]["ft"], base="base", name="ft")
    return home


def test_generate_one_model_both_modes(filled):
    full = json.loads(_run(filled, "generate", "ft", "w1 w2 w3", "--max-new-tokens", "5", "--json").stdout)
    delta = json.loads(
        _run(filled, "generate", "ft", "w1 w2 w3", "--max-new-tokens", "5", "--mode", "delta", "--json").stdout
    )
    [r] = full["results"]
    assert r["name"] == "ft" and r["prompt"] == "w1 w2 w3" and 1 <= len(r["tokens"]) <= 5
    assert delta["results"][0]["tokens"] == r["tokens"]
    text = _run(filled, "generate", "ft", "w1 w2 w3", "--max-new-tokens", "5").stdout
    assert text.strip() == r["text"]


def test_generate_several_tenants_in_one_batch(filled):
    out = json.loads(
        _run(
            filled, "generate", "--tenant", "ft", "w1 w2 w3", "--tenant", "base", "w9",
            "--tenant", "ft", "w7", "--max-new-tokens", "4", "--json",
        ).stdout
    )
    results = out["results"]
    assert [r["name"] for r in results] == ["ft", "base", "ft"]
    for r in results:
        alone = json.loads(
            _run(filled, "generate", r["name"], r["prompt"], "--max-new-tokens", "4", "--json").stdout
        )["results"][0]
        assert r["tokens"] == alone["tokens"], r
    text = _run(filled, "generate", "ft", "w1 w2 w3", "--tenant", "base", "w9", "--max-new-tokens", "4").stdout
    lines = text.strip().splitlines()
    assert lines[0].startswith("ft: ") and lines[1].startswith("base: ")


def test_generate_errors(filled):
    r = _run(filled, "generate", expect=2)
    assert "give NAME PROMPT" in r.output
    r = _run(filled, "generate", "ft", expect=2)
    assert "PROMPT" in r.output
    r = _run(filled, "generate", "nope", "w1", expect=3)
    assert r.stderr.startswith("Error: no model named 'nope'") and r.stdout == ""
    _run(filled, "generate", "ft", "w1", "--mode", "packed", expect=2)
    _run(filled, "generate", "ft", "w1", "--max-new-tokens", "0", expect=2)
