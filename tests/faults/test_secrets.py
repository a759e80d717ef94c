"""Secrets: the Hugging Face token never shows up in deltahub's output, logs, index, objects, or in
any file deltahub (or huggingface_hub on its behalf) writes to the store or the HF cache.

A distinctive fake token (a valid login on the test Hub) goes in ``HF_TOKEN``; every command of the
CLI runs with it (``-vv`` and ``DELTAHUB_DEBUG=1`` in some runs, failing pushes and pulls for the
error paths, one failing Xet upload), in-process and as real subprocesses; then every captured
stream, every log record and every byte of every file under the stores, the output folder and the
HF home (hub cache, Xet cache) is searched for the token."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402

from deltahub.cli import cli  # noqa: E402
from fault_report import record  # noqa: E402
from hub_fixtures import FAKE_USER, hub_server  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = f"{FAKE_USER}/secret-base"
DELTA = f"{FAKE_USER}/secret-delta"


def _needles(token: str) -> list[bytes]:
    """The token as bytes, in UTF-8 and UTF-16 (SQLite text), and its random core alone (a token
    printed partly masked, e.g. ``hf_***<core>``, still leaks the core)."""
    core = token.removeprefix("hf_")
    return [token.encode(), token.encode("utf-16-le"), core.encode(), core.encode("utf-16-le")]


def _files_holding(root: Path, needles: list[bytes]) -> tuple[list[str], int, int]:
    """(files under ``root`` holding a needle, files scanned, bytes scanned); symlinks (the HF
    cache's snapshots) are followed through their blobs, which are scanned as files."""
    hits, n_files, n_bytes = [], 0, 0
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        n_files += 1
        n_bytes += len(data)
        if any(n in data for n in needles):
            hits.append(str(path.relative_to(root)))
    return hits, n_files, n_bytes


def test_the_scanner_finds_a_planted_token(tmp_path):
    """The check below can fail: a token written anywhere, in any of the forms, is found."""
    token = "hf_" + secrets.token_hex(16)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "index.sqlite-wal").write_bytes(b"\0" * 100 + token.encode("utf-16-le") + b"\0")
    (tmp_path / "clean").write_bytes(b"nothing here")
    (tmp_path / "masked.log").write_text(f"token hf_***{token[3:]}")
    hits, n_files, _ = _files_holding(tmp_path, _needles(token))
    assert hits == ["a/b/index.sqlite-wal", "masked.log"] and n_files == 3


def test_token_appears_nowhere(tmp_path, model_dirs, hub_server, monkeypatch, caplog):
    token = "hf_dHsEcReT" + secrets.token_hex(16)
    hub_server.state.tokens[token] = FAKE_USER  # a real login on the test Hub
    monkeypatch.setenv("HF_TOKEN", token)
    caplog.set_level(logging.DEBUG)  # every logger: deltahub, huggingface_hub, httpx2, httpcore2
    dirs = model_dirs["llama"]
    a, b = tmp_path / "store_a", tmp_path / "store_b"
    outputs: list[tuple[str, str]] = []  # (what, text): every stdout and stderr
    exit_codes: dict[str, int] = {}

    def run(home: Path, *args: str, debug: bool = False, expect_ok: bool = True) -> None:
        if debug:
            monkeypatch.setenv("DELTAHUB_DEBUG", "1")
        try:
            res = CliRunner().invoke(cli, ["--home", str(home), *args])
        finally:
            monkeypatch.delenv("DELTAHUB_DEBUG", raising=False)
        what = " ".join(args)
        outputs.extend([(f"{what} [stdout]", res.stdout), (f"{what} [stderr]", res.stderr)])
        exit_codes[what] = res.exit_code
        assert (res.exit_code == 0) == expect_ok, f"{what}: {res.stdout}{res.stderr}"

    def run_process(home: Path, *args: str, env_extra: dict[str, str], expect_ok: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(PYTHONPATH=str(REPO_ROOT), **env_extra)
        proc = subprocess.run(
            [sys.executable, "-m", "deltahub.cli", "--home", str(home), *args],
            env=env, capture_output=True, text=True, timeout=180,
        )
        what = "process: " + " ".join(args)
        outputs.extend([(f"{what} [stdout]", proc.stdout), (f"{what} [stderr]", proc.stderr)])
        exit_codes[what] = proc.returncode
        assert (proc.returncode == 0) == expect_ok, f"{what}: {proc.stdout}{proc.stderr}"

    # store A: add, compress, push (base and delta), with and without -vv / DELTAHUB_DEBUG
    run(a, "-vv", "add", str(dirs["base"]), "--name", "base")
    run(a, "-vv", "compress", str(dirs["ft"]), "--base", "base", "--name", "ft")
    run(a, "-vv", "push", "base", BASE, debug=True)
    run(a, "push", "ft", DELTA, "--json")
    # failing pushes: another account's namespace (403), a --base-repo that does not exist (404)
    run(a, "-vv", "push", "ft", "someone-else/not-mine", debug=True, expect_ok=False)
    run(a, "-vv", "push", "ft", f"{FAKE_USER}/other", "--base-repo", f"{FAKE_USER}/missing-base", debug=True,
        expect_ok=False)
    # store B: pull (fetches the base too), add from the Hub, a failing pull
    run(b, "-vv", "pull", DELTA, debug=True)
    run(b, "-vv", "add", f"{BASE}@main", "--name", "again")
    run(b, "-vv", "pull", f"{FAKE_USER}/no-such-delta", debug=True, expect_ok=False)
    # everything else, on the pulled delta
    run(b, "-vv", "materialize", "secret-delta", str(tmp_path / "out"))
    for args in (("ls",), ("ls", "--json"), ("show", "secret-delta", "--json"), ("show", "secret-base"),
                 ("du",), ("du", "--json"), ("verify",), ("gc",)):
        run(b, "-vv", *args)
    # real processes (logging set up by the CLI itself): a failing push with -vv and DELTAHUB_DEBUG,
    # one through Xet (enabled; the test Hub has none), and a pull
    run_process(a, "-vv", "push", "ft", "someone-else/not-mine", env_extra={"DELTAHUB_DEBUG": "1"}, expect_ok=False)
    env_xet = {"DELTAHUB_DEBUG": "1", "HF_HUB_DISABLE_XET": ""}
    run_process(a, "-vv", "push", "ft", f"{FAKE_USER}/via-xet", env_extra=env_xet, expect_ok=False)
    run_process(tmp_path / "store_c", "-vv", "pull", DELTA, env_extra={"DELTAHUB_DISABLE_PROGRESS_BARS": "1"},
                expect_ok=True)
    assert any("Traceback" in text for _, text in outputs)  # the debug error paths did run
    assert any("Xet" in text for what, text in outputs if "via-xet" in what)
    assert hub_server.count("GET", r"/resolve/") > 0 and hub_server.count("POST", r"/commit/") >= 2

    needles = _needles(token)
    leaks = [what for what, text in outputs if any(n.decode("utf-8", "replace") in text for n in needles[::2])]
    records = caplog.records
    log_text = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in records
    )
    if any(n.decode() in log_text for n in needles[::2]):
        leaks.append("log records")
    places = {"store A": a, "store B": b, "store C": tmp_path / "store_c", "materialized": tmp_path / "out",
              "HF home (hub cache, xet)": Path(hf_constants.HF_HOME)}
    n_files = n_bytes = 0
    for label, root in places.items():
        assert root.is_dir(), label
        hits, files, size = _files_holding(root, needles)
        leaks += [f"{label}: {h}" for h in hits]
        n_files += files
        n_bytes += size
    index_files = [p.name for p in a.glob("index.sqlite*")]
    assert "index.sqlite" in index_files and n_files > 50
    assert not leaks, f"the token leaked into: {leaks}"
    record(
        "secrets/token",
        commands=len(exit_codes),
        failing_commands=sum(1 for c in exit_codes.values() if c),
        streams_scanned=len(outputs),
        log_records_scanned=len(records),
        files_scanned=n_files,
        bytes_scanned=n_bytes,
        places=sorted(places),
    )
