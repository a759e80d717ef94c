"""The CLI's one error table: every exception a command can raise is one line and a known exit code.

Also: ``deltahub --help`` and ``deltahub ls`` import no torch (the CLI goes through the API only, and
the API imports the operations on first use).
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import deltahub.api
import deltahub.errors
from deltahub.cli import ERROR_EXIT_CODES, ERROR_TABLE, cli, error_message, exit_code_for
from deltahub.errors import DeltaHubError, InputError, InvalidSizeError

REPO = Path(__file__).resolve().parents[1]


def _foreign_errors() -> dict[str, tuple[BaseException, int, str]]:
    """Real instances of the errors that are no DeltaHubError: the exit code each must get and a
    fragment of its one-line message."""
    from sqlalchemy.exc import OperationalError

    from deltahub.codec import CodecError, NonFiniteDeltaError
    from deltahub.kernels import KernelInputError, TritonUnavailableError
    from deltahub.runtime.multi_tenant import TenantError

    return {
        "codec": (CodecError("packed signs [2, 1] do not fit a [3, 4] weight"), 1, "do not fit a [3, 4] weight"),
        "codec-nonfinite": (NonFiniteDeltaError("non-finite delta: nan at [0, 1]"), 1, "nan at [0, 1]"),
        "tenant": (TenantError("tenant ids must be in [-1, 2), got [5]"), 5, "got [5]"),
        "kernel-input": (KernelInputError("packed must be int32", "pack it"), 5, "packed must be int32 (pack it)"),
        "triton": (TritonUnavailableError("triton is not installed", "use cpu"), 16, "not installed (use cpu)"),
        "sqlalchemy": (OperationalError("select 1", {}, Exception("database is locked")), 9, "index failed"),
        "disk-full": (OSError(errno.ENOSPC, "No space left on device", "/tmp/x/f"), 10, "the disk is full"),
        "permission": (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 10, "Permission denied: /root/x"),
        "memory": (MemoryError(), 11, "out of memory"),
        "bug": (ZeroDivisionError("division by zero\nsecond line"), 70, "ZeroDivisionError: division by zero ("),
        "multi-line": (TenantError("tenant ids\n  do not match"), 5, "tenant ids do not match"),
        "plain-value-error": (ValueError("expected REPO_ID, got 'a b'"), 70, "ValueError: expected REPO_ID"),
    }


FOREIGN = sorted(_foreign_errors())


# ---------------------------------------------------------------------------------------- the table
def test_the_exit_codes_are_the_table():
    assert ERROR_EXIT_CODES == [(cls, code) for cls, code, _ in ERROR_TABLE]


def test_every_deltahub_error_class_has_its_own_row():
    """Every DeltaHubError subclass is named in the table (not only caught by a parent's row)."""
    classes = [
        obj
        for obj in vars(deltahub.errors).values()
        if isinstance(obj, type) and issubclass(obj, DeltaHubError)
    ]
    assert len(classes) > 15
    rows = [cls for cls, _code, _message in ERROR_TABLE]
    missing = [cls.__name__ for cls in classes if cls not in rows]
    assert not missing, missing
    for cls in classes:  # a subclass's row comes before its parents' (first match wins)
        own = rows.index(cls)
        assert all(rows.index(parent) > own for parent in cls.__mro__[1:] if parent in rows), cls
        assert exit_code_for(cls("x")) == dict(ERROR_EXIT_CODES)[cls]


def test_existing_exit_codes_are_kept():
    codes = {cls.__name__: code for cls, code in ERROR_EXIT_CODES if issubclass(cls, DeltaHubError)}
    assert codes == {
        "InvalidNameError": 2, "NameNotFoundError": 3, "NameExistsError": 4, "OutputExistsError": 4,
        "InUseError": 4, "PickleCheckpointError": 5, "MalformedSafetensorsError": 5, "InvalidSizeError": 5,
        "InputError": 5, "IncompatibleBaseError": 6, "WrongBaseError": 6, "CorruptObjectError": 7,
        "UnsupportedFormatError": 8, "HubAuthError": 12, "HubNotFoundError": 13, "HubConnectionError": 14,
        "HubError": 15, "CodecError": 1, "DiskFullError": 10, "StoreError": 9, "DeltaHubError": 1,
        # added with the index API: their parents' codes
        "NameChangedError": 4, "DanglingNameError": 9,
        # added with `deltahub serve`: a new code (it never had one)
        "CapacityError": 17,
    }


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_errors_are_in_the_table(case):
    exc, code, fragment = _foreign_errors()[case]
    assert exit_code_for(exc) == code
    line = error_message(exc)
    assert len(line.splitlines()) == 1 and fragment in line, line
    if code == 70:
        assert "DELTAHUB_DEBUG=1" in line


def test_stand_ins_match_subclasses_but_not_lookalikes():
    from deltahub.cli import CodecValueError, TenantError

    from deltahub.codec import CodecError, NonFiniteDeltaError

    assert issubclass(NonFiniteDeltaError, CodecValueError) and isinstance(CodecError("x"), CodecValueError)
    assert issubclass(CodecValueError, CodecValueError) and exit_code_for(CodecValueError("x")) == 1

    class CodecError(ValueError):  # same name, another package: not the codec's
        pass

    assert not isinstance(CodecError("x"), CodecValueError)
    assert not isinstance(ValueError("x"), TenantError) and not isinstance(DeltaHubError("x"), TenantError)


# ---------------------------------------------------------------------------------------- through the CLI
def _invoke(home: Path, *args: str, debug: bool = False):
    env = {"DELTAHUB_DEBUG": "1" if debug else None}
    return CliRunner().invoke(cli, ["--home", str(home), *args], env=env, catch_exceptions=False)


def _assert_one_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", FOREIGN)
def test_a_command_raising_any_error_prints_one_line(case, home, monkeypatch):
    exc, code, fragment = _foreign_errors()[case]

    def failing_list(self):
        raise exc

    monkeypatch.setattr(deltahub.api.Store, "list", failing_list)
    _assert_one_line(_invoke(home, "ls"), code, fragment)
    debug = _invoke(home, "ls", debug=True)
    assert debug.exit_code == code and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_failing_commands_one_line_and_exit_code(home, tmp_path, model_dirs):
    dirs = model_dirs["llama"]
    _assert_one_line(_invoke(home, "show", "missing"), 3, "no model named 'missing'")
    _assert_one_line(
        _invoke(home, "compress", str(dirs["ft"]), "--base", "b", "--name", "f", "--codec", "bogus"), 5, "codec 'bogus'"
    )
    _assert_one_line(_invoke(home, "add", str(tmp_path / "nowhere"), "--name", "b"), 5)
    _assert_one_line(_invoke(home, "rm", "../etc"), 2)
    usage = _invoke(home, "materialize", "b", str(tmp_path / "out"), "--max-shard-size", "5XB")
    assert usage.exit_code == 2 and "--max-shard-size" in usage.stderr and "cannot parse size '5XB'" in usage.stderr
    assert not (tmp_path / "out").exists()


def test_ctx_exit_and_usage_errors_are_not_swallowed(home):
    """click's own exits (usage errors, ``ctx.exit``) pass the table untouched."""
    result = _invoke(home, "generate")
    assert result.exit_code == 2 and "give NAME PROMPT" in result.output
    result = _invoke(home, "verify", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"] is True


# ---------------------------------------------------------------------------------------- sizes and codecs
def test_parse_size_raises_a_deltahub_input_error():
    assert deltahub.api.parse_size("5GB") == 5 * 10**9
    for bad in ("abc", "0", "-1", "５GB"):
        with pytest.raises(InvalidSizeError) as info:
            deltahub.api.parse_size(bad)
        assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)  # as before: a ValueError
        assert "examples: 5GB" in str(info.value)
    # decimal sizes are exact, and a fraction of a byte is refused instead of rounded down
    assert deltahub.api.parse_size("1.1GB") == 1_100_000_000 and deltahub.api.parse_size("0.5kB") == 500
    for bad in ("1.5B", "0.0001kB", "1.0000000001GB", "1.0000000000000000000000000001B", "4611686018427387903.5B"):
        with pytest.raises(InvalidSizeError, match="not a whole number of bytes"):
            deltahub.api.parse_size(bad)
    # (int() refuses 4300+ digits: a usage error, not an internal one)
    with pytest.raises(InvalidSizeError, match="too large"):
        deltahub.api.parse_size("1" * 4301)
    with pytest.raises(InvalidSizeError, match="too many digits"):
        deltahub.api.parse_size("1." + "0" * 100000 + "kB")
    from deltahub.formats.hf_writer import parse_size  # its former home still works

    assert parse_size is deltahub.api.parse_size


def test_store_refuses_a_bad_shard_size_with_an_input_error(store, tmp_path):
    with pytest.raises(InvalidSizeError, match="cannot parse size 'lots'"):
        store.materialize("anything", tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists()


def test_compress_takes_a_codec(based, model_dirs):
    store, _home, _snap = based
    assert inspect.signature(deltahub.api.Store.compress).parameters["codec"].default == "sign1"
    result = store.compress(model_dirs["llama"]["ft"], base="base", name="ft", codec="sign1")
    assert result.codecs.get("sign1", 0) > 0
    with pytest.raises(InputError, match="codec 'nope'"):
        store.compress(model_dirs["llama"]["ft"], base="base", name="ft2", codec="nope")
    assert [r["name"] for r in store.list()] == ["base", "ft"]


# ---------------------------------------------------------------------------------------- no torch at start-up

_PROBE = """
import json, sys
from deltahub.cli import cli
out = {}
for args in (["--help"], ["ls"], ["ls", "--json"]):
    try:
        cli(args, prog_name="deltahub", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, exc
    out[" ".join(args)] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "triton", "numpy")
                                 or m == "safetensors.torch")
print("\\nPROBE " + json.dumps(out))
"""


def _probe(home: Path) -> dict[str, list[str]]:
    env = dict(os.environ, DELTAHUB_HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("DELTAHUB_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):])


def test_help_and_ls_import_no_torch(tmp_path):
    loaded = _probe(tmp_path / "store")  # an empty store, created by the first `ls`
    assert loaded == {"--help": [], "ls": [], "ls --json": []}, loaded


def test_ls_of_a_filled_store_imports_no_torch(based):
    _store, home, _snap = based
    assert _probe(home) == {"--help": [], "ls": [], "ls --json": []}


def test_the_api_module_imports_no_torch():
    code = "import sys, deltahub.api as a; a.Store; a.defaults; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_api_names_load_lazily():
    from deltahub.ops.calibrate import CalibrationOptions
    from deltahub.ops.compress import EmbeddingsMode
    from deltahub.ops.evaluate import EvalOptions

    assert deltahub.api.CalibrationOptions is CalibrationOptions
    assert deltahub.api.EvalOptions is EvalOptions and deltahub.api.EmbeddingsMode is EmbeddingsMode
    assert {"Store", "load_model", "CalibrationOptions"} <= set(dir(deltahub.api))
    with pytest.raises(AttributeError):
        deltahub.api.NoSuchName  # noqa: B018
