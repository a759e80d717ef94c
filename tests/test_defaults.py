"""Every user-facing default lives once, in deltahub.defaults: the library uses it, the CLI shows it."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import deltahub.api as api
from deltahub import defaults
from deltahub.cli import cli

REPO = Path(__file__).resolve().parents[1]


def test_defaults_module_imports_nothing():
    tree = ast.parse((REPO / "deltahub" / "defaults.py").read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports), imports
    assert api.defaults is defaults


def test_the_library_takes_its_defaults_from_there():
    from deltahub import config
    from deltahub.calibrate.targets import DEFAULT_TOP_K
    from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES
    from deltahub.ops import compress, serve
    from deltahub.ops.load import LoadMode
    from deltahub.ops.materialize import OUTPUT_DTYPES

    assert defaults.DEFAULT_MAX_SHARD_BYTES == api.parse_size(defaults.DEFAULT_MAX_SHARD_SIZE) == DEFAULT_MAX_SHARD_BYTES
    assert compress.DEFAULT_EMBEDDINGS.value == defaults.DEFAULT_EMBEDDINGS
    assert tuple(m.value for m in compress.EmbeddingsMode) == tuple(sorted(defaults.EMBEDDINGS_MODES))
    assert tuple(m.value for m in LoadMode) == defaults.LOAD_MODES and defaults.DEFAULT_LOAD_MODE in defaults.LOAD_MODES
    assert tuple(OUTPUT_DTYPES) == defaults.DTYPE_CHOICES
    assert serve.DEFAULT_MAX_NEW_TOKENS == defaults.DEFAULT_MAX_NEW_TOKENS
    assert config.DEFAULT_RESERVE_BYTES == defaults.DEFAULT_RESERVE_BYTES
    assert DEFAULT_TOP_K == defaults.DEFAULT_TOP_K
    assert inspect.signature(compress.compress_finetune).parameters["codec"].default == defaults.DEFAULT_CODEC


def test_options_dataclasses_use_the_defaults():
    import torch

    cal = api.CalibrationOptions()
    assert (cal.samples, cal.seq_len, cal.steps, cal.lr, cal.device, cal.seed, cal.batch_size, cal.top_k) == (
        defaults.CALIB_SAMPLES, defaults.CALIB_SEQ_LEN, defaults.CALIB_STEPS, defaults.CALIB_LR,
        defaults.DEFAULT_DEVICE, defaults.CALIB_SEED, defaults.CALIB_BATCH_SIZE, defaults.DEFAULT_TOP_K,
    )
    ev = api.EvalOptions()
    assert (ev.samples, ev.seq_len, ev.device, ev.batch_size, ev.top_k) == (
        defaults.EVAL_SAMPLES, defaults.EVAL_SEQ_LEN, defaults.DEFAULT_DEVICE, defaults.EVAL_BATCH_SIZE, defaults.DEFAULT_TOP_K,
    )
    assert cal.dtype == ev.dtype == getattr(torch, defaults.COMPUTE_DTYPE) == torch.float32


def test_the_documented_values():
    """The values themselves (changing one is a decision: update docs/usage.md too)."""
    assert (defaults.DEFAULT_CODEC, defaults.DEFAULT_EMBEDDINGS, defaults.DEFAULT_MAX_SHARD_SIZE) == ("sign1", "sign1", "5GB")
    assert (defaults.CALIB_SAMPLES, defaults.CALIB_SEQ_LEN, defaults.CALIB_STEPS, defaults.CALIB_LR) == (64, 128, 100, 0.01)
    assert (defaults.EVAL_SAMPLES, defaults.EVAL_SEQ_LEN, defaults.DEFAULT_MAX_NEW_TOKENS) == (64, 128, 32)
    assert (defaults.DEFAULT_DEVICE, defaults.DEFAULT_RESERVE_BYTES, defaults.DEFAULT_REVISION) == ("cpu", 4 << 20, "main")


def _param_default(func, name):
    return inspect.signature(func).parameters[name].default


def test_api_signatures_use_the_defaults():
    S = api.Store
    assert _param_default(S.compress, "embeddings") == defaults.DEFAULT_EMBEDDINGS
    assert _param_default(S.compress, "codec") == defaults.DEFAULT_CODEC
    for method in (S.materialize, S.push):
        assert _param_default(method, "max_shard_size") == defaults.DEFAULT_MAX_SHARD_BYTES
    for func in (S.load_model, S.load_multi_tenant, S.generate, api.load_model, api.load_multi_tenant):
        assert _param_default(func, "device") == defaults.DEFAULT_DEVICE, func
    for func in (S.load_model, api.load_model):
        assert _param_default(func, "mode") == defaults.DEFAULT_LOAD_MODE
    assert _param_default(S.generate, "max_new_tokens") == defaults.DEFAULT_MAX_NEW_TOKENS


#: (command, option) -> the default it must show, from deltahub.defaults.
CLI_DEFAULTS = {
    ("compress", "--embeddings"): defaults.DEFAULT_EMBEDDINGS,
    ("compress", "--codec"): defaults.DEFAULT_CODEC,
    ("compress", "--calib-samples"): defaults.CALIB_SAMPLES,
    ("compress", "--calib-seq-len"): defaults.CALIB_SEQ_LEN,
    ("compress", "--calib-steps"): defaults.CALIB_STEPS,
    ("compress", "--calib-lr"): defaults.CALIB_LR,
    ("compress", "--device"): defaults.DEFAULT_DEVICE,
    ("compress", "--seed"): defaults.CALIB_SEED,
    ("calibrate", "--calib-samples"): defaults.CALIB_SAMPLES,
    ("calibrate", "--calib-steps"): defaults.CALIB_STEPS,
    ("calibrate", "--device"): defaults.DEFAULT_DEVICE,
    ("eval", "--samples"): defaults.EVAL_SAMPLES,
    ("eval", "--seq-len"): defaults.EVAL_SEQ_LEN,
    ("eval", "--device"): defaults.DEFAULT_DEVICE,
    ("materialize", "--max-shard-size"): defaults.DEFAULT_MAX_SHARD_SIZE,
    ("push", "--max-shard-size"): defaults.DEFAULT_MAX_SHARD_SIZE,
    ("generate", "--max-new-tokens"): defaults.DEFAULT_MAX_NEW_TOKENS,
    ("generate", "--device"): defaults.DEFAULT_DEVICE,
}


def _option(command: str, flag: str) -> click.Option:
    return next(p for p in cli.commands[command].params if isinstance(p, click.Option) and flag in p.opts)


@pytest.mark.parametrize("command,flag", sorted(CLI_DEFAULTS))
def test_cli_options_show_the_library_defaults(command, flag):
    option = _option(command, flag)
    assert option.default == CLI_DEFAULTS[command, flag] and option.show_default
    help_text = " ".join(CliRunner().invoke(cli, [command, "--help"]).stdout.split())
    assert re.search(rf"{re.escape(flag)} .*?\[default:\s*{re.escape(str(CLI_DEFAULTS[command, flag]))}[;\]]", help_text)


def test_cli_choices_come_from_the_defaults():
    assert tuple(_option("compress", "--embeddings").type.choices) == defaults.EMBEDDINGS_MODES
    assert tuple(_option("generate", "--mode").type.choices) == defaults.LOAD_MODES
    for command in ("materialize", "generate"):
        assert tuple(_option(command, "--dtype").type.choices) == defaults.DTYPE_CHOICES


def test_no_cli_option_retypes_a_literal_default():
    """In cli.py, an option's ``default=`` is ``None`` or a name from the defaults module, never a literal."""
    tree = ast.parse((REPO / "deltahub" / "cli.py").read_text(encoding="utf-8"))
    given = [
        kw.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("click.option", "click.argument")
        for kw in node.keywords
        if kw.arg == "default"
    ]
    assert len([v for v in given if isinstance(v, ast.Attribute)]) >= len(CLI_DEFAULTS) - 3  # the checker sees them
    literals = [
        f"line {value.lineno}: default={ast.unparse(value)}"
        for value in given
        if not (isinstance(value, ast.Constant) and value.value is None)
        and not (isinstance(value, ast.Attribute) and ast.unparse(value).startswith("defaults."))
    ]
    assert not literals, literals
