"""The ``deltahub`` command line: help, docs coverage, --json outputs, errors and exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from deltahub.cli import ERROR_EXIT_CODES, cli, exit_code_for
from deltahub.errors import (
    CorruptObjectError,
    IncompatibleBaseError,
    InputError,
    InUseError,
    InvalidNameError,
    NameExistsError,
    NameNotFoundError,
    OutputExistsError,
    StoreError,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "usage.md"
COMMANDS = sorted(cli.commands)


# ---------------------------------------------------------------------------------------- helpers
def _no_constants(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json(text: str):
    """Parse JSON as any consumer would (NaN/Infinity are not JSON)."""
    return json.loads(text, parse_constant=_no_constants)


def run(home: Path | None, *args: str, env: dict | None = None, expect: int | None = 0):
    runner = CliRunner()
    argv = (["--home", str(home)] if home is not None else []) + [str(a) for a in args]
    env = {"DELTAHUB_DEBUG": None, **(env or {})}  # None: unset while the command runs
    result = runner.invoke(cli, argv, env=env, catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, (argv, result.exit_code, result.output)
    return result


def run_json(home: Path, *args: str, expect: int = 0):
    result = run(home, *args, "--json", expect=expect)
    return strict_json(result.stdout)


def section(text: str, command: str) -> str:
    """The text of ``## deltahub <command>`` up to the next level-2 heading."""
    m = re.search(rf"^## deltahub {re.escape(command)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/usage.md has no '## deltahub {command}' section"
    return m.group(1)


def assert_clean_error(result, code: int, fragment: str | None = None) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("Error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    assert result.stdout == ""
    if fragment:
        assert fragment in err, err


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory, model_dirs):
    """A store filled through the CLI itself (read-only for the tests that use it)."""
    home = tmp_path_factory.mktemp("cli-store") / "store"
    for arch, dirs in model_dirs.items():
        run(home, "add", dirs["base"], "--name", f"{arch}-base")
        run(home, "compress", dirs["ft"], "--base", f"{arch}-base", "--name", f"{arch}-ft")
    return home


@pytest.fixture(scope="module")
def template(tmp_path_factory, model_dirs):
    """A store with the gpt2 base ("base") and fine-tune ("ft"), added through the CLI once."""
    home = tmp_path_factory.mktemp("cli-template") / "store"
    dirs = model_dirs["gpt2"]
    run(home, "add", dirs["base"], "--name", "base")
    run(home, "compress", dirs["ft"], "--base", "base", "--name", "ft")
    return home


@pytest.fixture
def fresh(tmp_path, template):
    """A private copy of ``template`` that a test may change."""
    home = tmp_path / "store"
    shutil.copytree(template, home)
    return home


# ---------------------------------------------------------------------------------------- help
def test_group_help():
    result = run(None, "--help")
    assert "1-bit deltas" in result.stdout
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), name
    assert run(None, "-h").stdout == result.stdout
    version = run(None, "--version").stdout
    assert re.match(r"deltahub, version \d+\.\d+", version)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    cmd = cli.commands[command]
    assert cmd.help and cmd.help.strip(), f"{command} has no docstring"
    result = run(None, command, "--help")
    assert f"Usage: cli {command}" in result.stdout or f"Usage: deltahub {command}" in result.stdout
    first = cmd.help.strip().splitlines()[0].strip()
    assert " ".join(first.split()) in " ".join(result.stdout.split())
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{command} {param.opts} has no help text"
            assert any(o in result.stdout for o in param.opts)


def test_commands_exist():
    assert {"add", "compress", "materialize", "ls", "show", "du", "rm", "gc", "verify"} <= set(COMMANDS)


# ---------------------------------------------------------------------------------------- docs
def test_every_command_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    for name in COMMANDS:
        body = section(text, name)
        assert f"deltahub {name}" in body, f"no example of deltahub {name}"
        assert "```" in body, f"no code block in the {name} section"
        cmd = cli.commands[name]
        for param in cmd.params:
            if isinstance(param, click.Option):
                long = [o for o in param.opts if o.startswith("--")]
                assert any(o in body for o in long), f"{name}: {long} undocumented"
            elif isinstance(param, click.Argument):
                assert param.human_readable_name.upper() in body, f"{name}: argument {param.name} undocumented"
    # No section for a command that does not exist.
    documented = set(re.findall(r"^## deltahub (\S+)\s*$", text, re.M))
    assert documented == set(COMMANDS)


def test_docs_intro_and_exit_codes():
    text = DOCS.read_text(encoding="utf-8")
    for needle in ("DELTAHUB_HOME", "DELTAHUB_DISABLE_PROGRESS_BARS=1", "DELTAHUB_DEBUG", "--json", "--home"):
        assert needle in text, needle
    rows = [line for line in text.splitlines() if line.startswith("|")]
    for cls, code in ERROR_EXIT_CODES:
        assert any(cls.__name__ in r and re.search(rf"\|\s*`?{code}`?\s*\|", r) for r in rows), (cls, code)
    for name in ("Store", "load_model", "load_tokenizer", "materialize", "compress"):
        assert name in text
    for method in ("add", "compress", "materialize", "list", "show", "du", "rm", "gc", "verify"):
        assert f".{method}(" in text, method


# ---------------------------------------------------------------------------------------- --json
def test_add_and_compress_json(tmp_path, model_dirs):
    home = tmp_path / "store"
    dirs = model_dirs["llama"]
    result = run(home, "add", dirs["base"], "--name", "b", "--json")
    assert result.stderr == ""  # progress bars are off under pytest; no messages on success
    add = strict_json(result.stdout)
    assert add["name"] == "b" and add["n_tensors"] > 0 and add["stored_bytes"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", add["manifest_id"])
    comp = run_json(home, "compress", dirs["ft"], "--base", "b", "--name", "f")
    assert set(comp) >= {"name", "manifest_id", "base_name", "codecs", "stored_bytes", "fp16_bytes", "ratio"}
    assert comp["base_name"] == "b" and comp["ratio"] > 1
    assert set(comp["codecs"]) == {"same", "dense", "sign1"}
    comp2 = run_json(home, "compress", dirs["ft"], "--base", "b", "--name", "f2", "--embeddings", "dense")
    assert comp2["ratio"] < comp["ratio"]
    text = run(home, "add", dirs["base"], "--name", "b2").stdout
    assert text.startswith("added base b2:") and add["manifest_id"][:12] in text
    text = run(home, "compress", dirs["ft"], "--base", "b", "--name", "f3").stdout
    assert "compressed f3 against b" in text and "x smaller" in text


def test_show_ls_du_verify_json(cli_home):
    show = run_json(cli_home, "show", "llama-ft")
    assert show["kind"] == "delta" and show["base"]["names"] == ["llama-base"]
    assert set(show) >= {"codecs", "ratio", "statistics", "stored_bytes", "fp16_bytes", "params", "manifest_id"}
    assert "tensors" not in show
    detail = run_json(cli_home, "show", "llama-ft", "--tensors")
    assert len(detail["tensors"]) == detail["n_tensors"]
    assert {"name", "codec", "scale", "shape"} <= set(detail["tensors"][0])
    base = run_json(cli_home, "show", "gpt2-base")
    assert base["kind"] == "base"

    ls = run_json(cli_home, "ls")
    assert [r["name"] for r in ls] == ["gpt2-base", "gpt2-ft", "llama-base", "llama-ft"]
    for r in ls:
        assert set(r) >= {"name", "kind", "base", "stored_bytes", "fp16_bytes", "ratio", "manifest_id"}
    du = run_json(cli_home, "du")
    assert set(du) >= {"home", "objects", "object_bytes", "unreferenced_objects", "index_bytes", "total_bytes", "models"}
    assert du["home"] == str(cli_home) and du["unreferenced_objects"] == 0
    verify = run_json(cli_home, "verify")
    assert verify == {"ok": True, "objects_checked": du["objects"], "manifests_checked": 4, "problems": []}


def test_text_outputs(cli_home):
    ls = run(cli_home, "ls").stdout
    assert ls.splitlines()[0].split()[:3] == ["NAME", "KIND", "BASE"]
    assert re.search(r"^llama-ft\s+delta\s+llama-base\s", ls, re.M)
    show = run(cli_home, "show", "gpt2-ft", "--tensors").stdout
    assert re.search(r"^kind:\s+delta$", show, re.M) and "sign1" in show and "recon error" in show
    assert "transformer.h.0.attn.c_attn.weight" in show
    assert "ok" in run(cli_home, "verify").stdout.splitlines()[-1]
    assert "objects:" in run(cli_home, "du").stdout


def test_materialize_json(cli_home, tmp_path):
    out = tmp_path / "out"
    data = run_json(cli_home, "materialize", "gpt2-ft", out, "--dtype", "bfloat16", "--max-shard-size", "20KB")
    assert data["name"] == "gpt2-ft" and data["dtype"] == "bfloat16" and data["out_dir"] == str(out)
    assert data["files"] == sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in data["files"]
    assert data["bytes_written"] == sum((out / f).stat().st_size for f in data["files"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    text = run(cli_home, "materialize", "llama-ft", tmp_path / "out2").stdout
    assert text.startswith("wrote llama-ft (float32,")


def test_materialize_refuses_non_empty_output_then_force(cli_home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(cli_home, "materialize", "gpt2-ft", out, expect=None)
    assert_clean_error(result, 4, "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run(cli_home, "materialize", "gpt2-ft", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_option_values_are_usage_errors(cli_home, tmp_path):
    result = run(cli_home, "materialize", "gpt2-ft", tmp_path / "o", "--max-shard-size", "huge", expect=2)
    assert "max-shard-size" in result.stderr and "Traceback" not in result.output
    result = run(cli_home, "materialize", "gpt2-ft", tmp_path / "o", "--dtype", "int8", expect=2)
    assert "int8" in result.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- rm / gc
def test_rm_then_gc_frees_objects(fresh):
    before = run_json(fresh, "du")
    rm = run_json(fresh, "rm", "ft")
    assert rm["name"] == "ft" and rm["removed"] is True and re.fullmatch(r"[0-9a-f]{64}", rm["manifest_id"])
    mid = run_json(fresh, "du")
    assert mid["object_bytes"] == before["object_bytes"]  # rm frees nothing by itself
    assert mid["unreferenced_objects"] > 0
    dry = run_json(fresh, "gc", "--dry-run")
    assert dry["dry_run"] is True and dry["n_objects"] == mid["unreferenced_objects"]
    assert dry["pruned_manifests"] == [rm["manifest_id"]]
    assert run_json(fresh, "du")["object_bytes"] == before["object_bytes"]
    gc = run_json(fresh, "gc")
    assert set(gc) >= {"dry_run", "objects", "n_objects", "bytes", "temp_files", "pruned_manifests"}
    assert gc["pruned_manifests"] == [rm["manifest_id"]]
    assert gc["n_objects"] == dry["n_objects"] > 0 and gc["bytes"] == mid["unreferenced_bytes"] > 0
    after = run_json(fresh, "du")
    assert after["object_bytes"] == before["object_bytes"] - gc["bytes"]
    assert after["objects"] < before["objects"] and after["unreferenced_objects"] == 0
    assert run_json(fresh, "verify")["ok"] is True
    assert [r["name"] for r in run_json(fresh, "ls")] == ["base"]
    assert run_json(fresh, "gc")["n_objects"] == 0
    assert "run `deltahub gc`" in run(fresh, "rm", "base").stdout


def test_rm_of_a_base_in_use_needs_force(fresh, tmp_path):
    result = run(fresh, "rm", "base", expect=None)
    assert_clean_error(result, 4, "ft")
    assert {r["name"] for r in run_json(fresh, "ls")} == {"base", "ft"}
    run_json(fresh, "rm", "base", "--force")
    ls = run_json(fresh, "ls")
    assert [r["name"] for r in ls] == ["ft"]
    assert re.fullmatch(r"[0-9a-f]{12}", ls[0]["base"])  # the unnamed base, by manifest id
    assert run_json(fresh, "gc")["n_objects"] == 0  # the delta still needs every base object
    assert run_json(fresh, "verify")["ok"] is True
    run(fresh, "materialize", "ft", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_verify_reports_damage_with_exit_1(fresh):
    victim = next(p for p in sorted((fresh / "objects").rglob("*")) if p.is_file())
    os.chmod(victim, 0o644)
    victim.write_bytes(victim.read_bytes() + b"x")
    result = run(fresh, "verify", "--json", expect=1)
    report = strict_json(result.stdout)
    assert report["ok"] is False
    assert any(p["kind"] == "corrupt-object" and p["subject"] == victim.name for p in report["problems"])
    text = run(fresh, "verify", expect=1).stdout
    assert "problem(s) found" in text and victim.name in text


# ---------------------------------------------------------------------------------------- errors
def _pickle_only(tmp_path: Path, model_dirs) -> Path:
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(model_dirs["gpt2"]["base"] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return d


def _corrupt_all_but_manifests(home: Path) -> None:
    show = run_json(home, "show", "ft")
    keep = {show["manifest_id"], show["base"]["manifest_id"]}
    for p in (home / "objects").rglob("*"):
        if p.is_file() and p.name not in keep:
            os.chmod(p, 0o644)
            p.write_bytes(b"garbage")


ERROR_CASES = {
    "not-found": (NameNotFoundError, lambda h, t, m: ["show", "missing"], "missing"),
    "invalid-name": (InvalidNameError, lambda h, t, m: ["show", "../up"], "invalid model name"),
    "name-exists": (NameExistsError, lambda h, t, m: ["add", m["gpt2"]["base"], "--name", "ft"], "already taken"),
    "in-use": (InUseError, lambda h, t, m: ["rm", "base"], "base of"),
    "no-input": (InputError, lambda h, t, m: ["add", t / "nowhere", "--name", "x"], "nowhere"),
    "pickle": (InputError, lambda h, t, m: ["add", _pickle_only(t, m), "--name", "x"], "never unpickles"),
    "delta-as-base": (InputError, lambda h, t, m: ["compress", m["gpt2"]["ft"], "--base", "ft", "--name", "x"], None),
    "incompatible": (
        IncompatibleBaseError,
        lambda h, t, m: ["compress", m["llama"]["ft"], "--base", "base", "--name", "x"],
        "llama",
    ),
    "output-exists": (OutputExistsError, lambda h, t, m: ["materialize", "ft", _full_dir(t)], "not empty"),
    "output-is-store": (OutputExistsError, lambda h, t, m: ["materialize", "ft", h], "outside the store"),
    "corrupt": (
        CorruptObjectError,
        lambda h, t, m: (_corrupt_all_but_manifests(h), ["materialize", "ft", t / "out"])[1],
        None,
    ),
    "bad-store": (StoreError, None, "cannot use"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_with_the_table_exit_code(case, fresh, tmp_path, model_dirs):
    cls, make_args, fragment = ERROR_CASES[case]
    code = exit_code_for(cls("x"))
    assert code == next(c for k, c in ERROR_EXIT_CODES if issubclass(cls, k))
    if make_args is None:  # a store folder that cannot be created
        (tmp_path / "file").write_text("")
        result = run(tmp_path / "file" / "store", "ls", expect=None)
    else:
        result = run(fresh, *make_args(fresh, tmp_path, model_dirs), expect=None)
    assert_clean_error(result, code, fragment)
    assert not (tmp_path / "out").exists()


def _full_dir(tmp: Path) -> Path:
    full = tmp / "full"
    full.mkdir(exist_ok=True)
    (full / "keep.txt").write_text("mine")
    return full


def test_distinct_exit_codes_per_error_family():
    codes = dict((cls.__name__, code) for cls, code in ERROR_EXIT_CODES)
    names = [cls.__name__ for cls, _ in ERROR_EXIT_CODES]
    # DeltaHubError catches every deltahub error not listed before it; non-deltahub errors follow.
    assert codes["DeltaHubError"] == 1 and names.index("DeltaHubError") == names.index("StoreError") + 1
    assert len({codes["NameNotFoundError"], codes["InputError"], codes["CorruptObjectError"], 1, 2}) == 5


def test_debug_shows_the_traceback(fresh):
    result = run(fresh, "show", "missing", env={"DELTAHUB_DEBUG": "1"}, expect=3)
    assert "Traceback (most recent call last)" in result.stderr
    assert "NameNotFoundError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: no model named 'missing'")
    quiet = run(fresh, "show", "missing", env={"DELTAHUB_DEBUG": "0"}, expect=3)
    assert "Traceback" not in quiet.stderr


def test_progress_bars_show_on_a_terminal_unless_disabled(monkeypatch):
    import io

    from deltahub import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    for value, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("DELTAHUB_DISABLE_PROGRESS_BARS", value)
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        with progress.progress_bar(10, "materialize demo") as bar:
            bar.update(10)
        monkeypatch.undo()  # restores sys.stderr and the environment
        assert ("materialize demo" in term.getvalue()) is shown, (value, term.getvalue())
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    # Not a terminal: no bar even when not disabled.
    monkeypatch.setenv("DELTAHUB_DISABLE_PROGRESS_BARS", "0")
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with progress.progress_bar(10, "quiet") as bar:
        bar.update(10)
    monkeypatch.undo()
    assert plain.getvalue() == ""


# ---------------------------------------------------------------------------------------- console script
def _console_script() -> str:
    exe = Path(sys.executable).parent / "deltahub"
    return str(exe) if exe.exists() else shutil.which("deltahub") or "deltahub"


def test_console_script(tmp_path):
    """The installed ``deltahub`` script: honours DELTAHUB_HOME, one-line error, exit code from the table."""
    env = dict(os.environ, DELTAHUB_HOME=str(tmp_path / "store"), DELTAHUB_DISABLE_PROGRESS_BARS="1")
    env.pop("DELTAHUB_DEBUG", None)
    script = _console_script()
    version = subprocess.run([script, "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("deltahub, version ")
    bad = subprocess.run([script, "show", "missing"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == dict((c.__name__, v) for c, v in ERROR_EXIT_CODES)["NameNotFoundError"] == 3
    assert bad.stdout == ""
    assert bad.stderr.startswith("Error: no model named 'missing'"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert str(tmp_path / "store") in bad.stderr
    assert (tmp_path / "store" / "index.sqlite").is_file()  # DELTAHUB_HOME was honoured
