"""The ``deltahub`` command line: a thin layer over :mod:`deltahub.api`.

Results go to stdout (``--json`` for scripts), messages and progress bars to stderr. Every
exception is mapped to a one-line message and an exit code by one table, :data:`ERROR_TABLE`;
``DELTAHUB_DEBUG=1`` adds the traceback.

This module imports :mod:`deltahub.api` and :mod:`deltahub.errors` only, and neither imports torch
until a command needs it: ``deltahub --help`` and ``deltahub ls`` stay fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from deltahub import api
from deltahub.errors import (
    CapacityError,
    CodecError,
    CorruptObjectError,
    DanglingNameError,
    DeltaHubError,
    DiskFullError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    IncompatibleBaseError,
    InputError,
    InUseError,
    InvalidNameError,
    InvalidSizeError,
    MalformedSafetensorsError,
    NameChangedError,
    NameExistsError,
    NameNotFoundError,
    OutputExistsError,
    PickleCheckpointError,
    StoreError,
    UnsupportedFormatError,
    WrongBaseError,
)


class _ByName(type):
    """Metaclass of :func:`foreign` stand-ins: ``isinstance``/``issubclass`` match by the class's name
    and package, so the CLI names error classes of modules it must not import (they import torch, or
    lie outside the API). No import is needed to match: an instance exists only once its module is."""

    package: str

    def __instancecheck__(cls, obj: object) -> bool:
        return cls.__subclasscheck__(type(obj))

    def __subclasscheck__(cls, sub: type) -> bool:
        return any(
            k.__name__ == cls.__name__ and (k.__module__ == cls.package or k.__module__.startswith(cls.package + "."))
            for k in getattr(sub, "__mro__", ())
        )


def foreign(package: str, name: str) -> type[Exception]:
    """A stand-in for exception class ``name`` defined in ``package`` (or a module under it)."""
    return _ByName(name, (Exception,), {"package": package, "__module__": package, "__qualname__": name})


#: Errors of deltahub's lower layers that import nothing of deltahub (so are no DeltaHubError), of
#: the runtime, and of libraries: matched by name (see :func:`foreign`).
CodecValueError = foreign("deltahub.codec", "CodecError")  # a ValueError: bad shapes, packed bits, layouts
TenantError = foreign("deltahub.runtime", "TenantError")  # a ValueError: bad tenant ids for a batch
KernelInputError = foreign("deltahub.kernels", "KernelInputError")  # a ValueError: bad kernel arguments
TritonUnavailableError = foreign("deltahub.kernels", "TritonUnavailableError")  # a RuntimeError
SQLAlchemyError = foreign("sqlalchemy", "SQLAlchemyError")

#: The library's user-facing defaults (:mod:`deltahub.defaults`); options show them, never retype them.
defaults = api.defaults


def _os_error(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    if api.is_disk_full(exc):  # a write site that did not say what it was writing
        folder = Path(exc.filename).parent if exc.filename else Path.cwd()
        return str(api.disk_full_error(exc, folder, f"writing {exc.filename or 'a file'}"))
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where} (check free disk space and permissions)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


#: THE error table: exception type -> (exit code, one-line message). The first matching row (in
#: order) wins; an exception no row matches is a bug, reported on one line too. ``DELTAHUB_DEBUG=1``
#: adds the traceback. docs/usage.md lists every row.
ERROR_TABLE: list[tuple[type[BaseException], int, Callable[[BaseException], str]]] = [
    (InvalidNameError, 2, str),
    (NameNotFoundError, 3, str),
    (NameChangedError, 4, str),  # a compare-and-set name move lost the race
    (NameExistsError, 4, str),
    (OutputExistsError, 4, str),
    (InUseError, 4, str),
    (PickleCheckpointError, 5, str),
    (MalformedSafetensorsError, 5, str),
    (InvalidSizeError, 5, str),
    (InputError, 5, str),
    (IncompatibleBaseError, 6, str),
    (WrongBaseError, 6, str),
    (CorruptObjectError, 7, str),
    (UnsupportedFormatError, 8, str),
    (HubAuthError, 12, str),
    (HubNotFoundError, 13, str),
    (HubConnectionError, 14, str),
    (HubError, 15, str),
    (CodecError, 1, str),
    (CapacityError, 17, str),  # a server is full for now (retry later)
    (DiskFullError, 10, str),  # like OSError: the file system refused
    (DanglingNameError, 9, str),
    (StoreError, 9, str),
    (DeltaHubError, 1, str),
    # Not DeltaHubErrors: the codec, kernels and runtime import nothing of deltahub's errors.
    (CodecValueError, 1, lambda e: f"{e} (the codec refused this tensor data; `deltahub verify` checks the store)"),
    (TenantError, 5, str),
    (KernelInputError, 5, lambda e: f"a kernel refused its input: {e}"),
    (TritonUnavailableError, 16, str),
    # the index failed (locked for too long, disk full, damaged file)
    (SQLAlchemyError, 9, lambda e: f"the store's index failed: {type(e).__name__}: {_first_line(e)}"),
    (OSError, 10, _os_error),  # the file system refused (disk full, permissions, a file in the way)
    (MemoryError, 11, lambda e: "out of memory (close other programs or use a machine with more memory)"),
    (
        Exception,
        70,
        lambda e: f"internal error: {type(e).__name__}: {_first_line(e)} "
        "(a bug in deltahub: run again with DELTAHUB_DEBUG=1 for the traceback and report it)",
    ),
]

#: Exception type -> exit code: the codes of :data:`ERROR_TABLE`, in its order.
ERROR_EXIT_CODES: list[tuple[type[BaseException], int]] = [(cls, code) for cls, code, _ in ERROR_TABLE]


def _row(exc: BaseException) -> tuple[type[BaseException], int, Callable[[BaseException], str]] | None:
    return next((row for row in ERROR_TABLE if isinstance(exc, row[0])), None)


def error_message(exc: BaseException) -> str:
    """One line for any exception: its row's message, line breaks folded."""
    row = _row(exc)
    text = str(exc) if row is None else row[2](exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def exit_code_for(exc: BaseException) -> int:
    row = _row(exc)
    return 1 if row is None else row[1]


def _human(n: float | None) -> str:
    return api.human_bytes(n, unknown="-")


def _json_safe(data: Any) -> Any:
    """Replace NaN/Infinity (not valid JSON) by null, recursively."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_safe(v) for v in data]
    return data


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(_json_safe(data), indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def _store(ctx: click.Context) -> api.Store:
    obj = ctx.find_root().obj
    if obj.get("store") is None:
        obj["store"] = api.Store(obj.get("home"))
        ctx.find_root().call_on_close(obj["store"].close)
    return obj["store"]


def _size(value: str | None, option: str) -> int | None:
    """A size option in bytes (``40MB``, ``1.5GiB``, ``123456``), or None; a bad one is a usage error."""
    if value is None:
        return None
    try:
        return api.parse_size(value)
    except InvalidSizeError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _max_size(value: str | None) -> int | None:
    """``--max-size`` in bytes, or None."""
    return _size(value, "--max-size")


def _shard_size(value: str) -> int:
    try:
        return api.parse_size(value)
    except InvalidSizeError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None


def _home_path(value: str | None) -> Path | None:
    if value is None:
        return None
    if not value.strip():  # Path("") would be the current folder, silently made a store
        raise click.BadParameter("is empty: give the store folder, or leave --home out for the default", param_hint="--home")
    return Path(value)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
allow_nonfinite_option = click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Store tensors holding NaN or Inf as they are (refused by default); a matrix whose delta is not "
    "finite is then stored dense.",
)


class DeltaHubGroup(click.Group):
    """Runs commands with the error table applied."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors and ctx.exit(): click prints and exits as usual
        except Exception as exc:  # noqa: BLE001 - every exception goes through ERROR_TABLE
            if api.debug_enabled():
                traceback.print_exc()
            click.echo(f"Error: {error_message(exc)}", err=True)
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was left half-written.", err=True)
            ctx.exit(130)


@click.group(cls=DeltaHubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(api.__version__, prog_name="deltahub")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="DELTAHUB_HOME",
    callback=lambda ctx, param, value: _home_path(value),
    help="The store folder (default: $DELTAHUB_HOME, else ~/.cache/deltahub).",
)
@click.option("-v", "--verbose", count=True, help="More log messages on stderr (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, verbose: int) -> None:
    """deltahub keeps fine-tuned LLMs as one shared base plus 1-bit deltas.

    Add a base, compress fine-tunes against it, and materialize any of them back as an ordinary
    Hugging Face checkpoint:

    \b
      deltahub add ./llama-base --name llama
      deltahub compress ./llama-chat --base llama --name llama-chat
      deltahub show llama-chat
      deltahub materialize llama-chat ./out --dtype bfloat16
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


@cli.command()
@click.argument("src", type=click.Path(path_type=str))  # as typed: ./x is a folder, not a Hub id
@click.option("--name", help="Name for the base (default: the folder's or repo's name).")
@click.option("--force", is_flag=True, help="Re-point NAME if it already exists.")
@click.option(
    "--copy",
    is_flag=True,
    help="Copy weights that are in the Hugging Face cache into the store instead of referencing "
    "them there (then deleting the HF cache entry cannot break the base).",
)
@allow_nonfinite_option
@json_option
@click.pass_context
def add(
    ctx: click.Context, src: str, name: str | None, force: bool, copy: bool, allow_nonfinite: bool, as_json: bool
) -> None:
    """Add a base model from a local Hugging Face checkpoint folder SRC, or from the Hub.

    SRC holds config.json, safetensors weights (model.safetensors or shards with
    model.safetensors.index.json) and optionally tokenizer, generation-config and chat-template
    files. Tensors keep their dtype (fp32, fp16 or bf16). Pickle checkpoints are refused.

    SRC that is no local folder but looks like REPO_ID[@REVISION] is downloaded from the Hub at
    that revision (pinned to its commit id; only config, safetensors and tokenizer files, into
    your HF cache, reused when already there, HF_HUB_OFFLINE=1 included). The Hub id and commit
    are remembered, so `deltahub push` of deltas on this base needs no --base-repo.

    Weights already in the HF cache (a Hub download, or a SRC folder inside the cache) are not
    copied: the store references their bytes there and re-hashes them on every read. Use --copy
    to keep an independent copy instead.
    """
    result = _store(ctx).add(src, name=name, force=force, copy=copy, allow_nonfinite=allow_nonfinite)
    linked = f", {_human(result.referenced_bytes)} left in the HF cache" if result.referenced_bytes else ""
    _emit(
        result.__dict__,
        as_json,
        f"added base {result.name}: {result.n_tensors} tensors, {_human(result.stored_bytes)} "
        f"stored{linked} (manifest {result.manifest_id[:12]})",
    )


def calibration_options(func: Any) -> Any:
    """The ``--calib-*``, ``--device`` and ``--seed`` options of ``compress`` and ``calibrate``
    (defaults: :mod:`deltahub.defaults`, as :class:`deltahub.api.CalibrationOptions` has them)."""
    options = [
        click.option(
            "--calib-data",
            type=click.Path(path_type=Path),
            default=None,
            help="Calibration text: a UTF-8 text file, or JSONL of {\"text\": ...} or {\"messages\": [...]} "
            "(rendered with the chat template). Default: a bundled public-domain corpus.",
        ),
        click.option("--calib-samples", type=int, default=defaults.CALIB_SAMPLES, show_default=True,
                     help="Number of token sequences to calibrate on."),
        click.option("--calib-seq-len", type=int, default=defaults.CALIB_SEQ_LEN, show_default=True,
                     help="Tokens per calibration sequence."),
        click.option("--calib-steps", type=int, default=defaults.CALIB_STEPS, show_default=True,
                     help=f"Optimizer steps (batches of {defaults.CALIB_BATCH_SIZE} sequences)."),
        click.option("--calib-lr", type=float, default=defaults.CALIB_LR, show_default=True,
                     help="Adam learning rate, relative to each scale (0.01: steps of about 1% of it)."),
        click.option("--device", default=defaults.DEFAULT_DEVICE, show_default=True,
                     help="Torch device for the teacher and the student, e.g. cuda."),
        click.option("--seed", type=int, default=defaults.CALIB_SEED, show_default=True,
                     help="Seed of the sample choice and batch order (same seed, same scales)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _calibration(calib_data, calib_samples, calib_seq_len, calib_steps, calib_lr, device, seed):
    return api.CalibrationOptions(
        data=calib_data, samples=calib_samples, seq_len=calib_seq_len, steps=calib_steps, lr=calib_lr,
        device=device, seed=seed,
    )


def _calibration_text(cal: Any) -> str:
    if cal.reverted:
        return (
            f"calibration of {cal.name} did not lower the loss ({cal.loss_before:.4g}); "
            f"its scales were kept (manifest {cal.manifest_id[:12]})"
        )
    return (
        f"calibrated {cal.name}: {cal.n_scales} scales, distillation loss {cal.loss_before:.4g} -> "
        f"{cal.loss_after:.4g} (KL, nats/token) in {cal.steps} steps, {cal.seconds:.1f} s "
        f"(manifest {cal.previous_manifest_id[:12]} -> {cal.manifest_id[:12]})"
    )


@cli.command()
@click.argument("src", type=click.Path(path_type=str))  # as typed: ./x is a folder, not a Hub id
@click.option("--base", "base", required=True, help="Name of the stored base it was fine-tuned from.")
@click.option("--name", required=True, help="Name for the compressed fine-tune.")
@click.option(
    "--embeddings",
    type=click.Choice(defaults.EMBEDDINGS_MODES),
    default=defaults.DEFAULT_EMBEDDINGS,
    show_default=True,
    help="Store embeddings and the LM head as 1-bit deltas (sign1: much smaller), only their changed "
    "rows (rowsparse: 1 bit + a scale per changed row, unchanged rows free, added tokens exact) or "
    "dense (exact, keeps slightly more of the fine-tune's quality).",
)
@click.option(
    "--codec",
    metavar="NAME",
    default=defaults.DEFAULT_CODEC,
    show_default=True,
    help="Codec of the 2-D weight matrices.",
)
@click.option("--bits", type=click.IntRange(1, 8), default=None,
              help="Sign planes per matrix (codec planes; implies --codec planes). 1 with --scales matrix is sign1.")
@click.option("--scales", type=click.Choice(defaults.SCALE_GRANULARITIES), default=None,
              help="Scale granularity of each plane (codec planes): one per matrix, per output row, or per group of --group-size columns.")
@click.option("--group-size", type=int, default=None, help="Columns per scale with --scales group (a multiple of 32; default 128).")
@click.option("--avg-bits", type=float, default=None,
              help="Size budget in bits per parameter of the model (e.g. 1.5): each matrix gets the sign planes "
              "(up to --bits, default 4) that lose the least of the model's output on the --calib-data text; "
              "smaller budgets are then prefixes of the stored delta (materialize/pull --max-size).")
@click.option("--max-size", "max_size", default=None, metavar="SIZE",
              help="Size budget in bytes of tensor data (e.g. 40MB), as --avg-bits.")
@click.option("--lossless", is_flag=True,
              help="Store the exact fine-tune (bit for bit) as a delta: XOR with the base, bytes split by significance, zstd (--codec lossless).")
@click.option("--force", is_flag=True, help="Re-point NAME if it already exists.")
@click.option(
    "--calibrate",
    "calibrate_",
    is_flag=True,
    help="Then calibrate the scales by distillation, with the fine-tune at SRC as the teacher.",
)
@allow_nonfinite_option
@calibration_options
@json_option
@click.pass_context
def compress(
    ctx: click.Context,
    src: str,
    base: str,
    name: str,
    embeddings: str,
    codec: str,
    bits: int | None,
    scales: str | None,
    group_size: int | None,
    avg_bits: float | None,
    max_size: str | None,
    lossless: bool,
    force: bool,
    calibrate_: bool,
    allow_nonfinite: bool,
    as_json: bool,
    **calib: Any,
) -> None:
    """Compress the fine-tune in folder SRC into a 1-bit delta against BASE.

    2-D weight matrices become packed sign bits plus one fp32 scale (mean |delta|); 1-D tensors are
    stored dense; tensors identical to the base cost nothing. The fine-tune must have every tensor
    of the base with the same shapes (a resized vocabulary is stored dense).

    SRC that is no local folder but looks like REPO_ID[@REVISION] is downloaded from the Hub like
    `deltahub add` does (pinned to its commit id; config, safetensors and tokenizer files only,
    into your HF cache, reused when already there, HF_HUB_OFFLINE=1 included).
    """
    options = _calibration(**calib) if calibrate_ else None
    planes = {k: v for k, v in (("planes", bits), ("scales", scales), ("group_size", group_size)) if v is not None}
    explicit = ctx.get_parameter_source("codec") is not click.core.ParameterSource.DEFAULT
    if lossless and (planes or explicit):
        raise click.UsageError("--lossless stores the exact fine-tune: it takes no --codec, --bits, --scales or --group-size")
    if lossless:
        codec = defaults.LOSSLESS_CODEC
    if planes and explicit and codec != defaults.PLANES_CODEC:
        raise click.UsageError(f"--bits, --scales and --group-size set codec {defaults.PLANES_CODEC}, not {codec}")
    if planes:
        codec = defaults.PLANES_CODEC
    budgeted = avg_bits is not None or max_size is not None
    if avg_bits is not None and max_size is not None:
        raise click.UsageError("--avg-bits and --max-size are two ways to give one budget: give one")
    if budgeted and lossless:
        raise click.UsageError("--lossless stores the exact fine-tune: it takes no size budget")
    if budgeted and explicit and codec != defaults.PLANES_CODEC:
        raise click.UsageError(f"a size budget chooses sign planes (codec {defaults.PLANES_CODEC}), not --codec {codec}")
    if budgeted and options is None:
        options = _calibration(**calib)  # the text the sensitivity is measured on
    result = _store(ctx).compress(
        src, base=base, name=name, embeddings=embeddings, force=force, calibrate=calibrate_, calibration=options,
        allow_nonfinite=allow_nonfinite, codec=codec, codec_options=planes or None,
        avg_bits=avg_bits, max_size=_max_size(max_size),
    )
    data = dict(result.__dict__, ratio=result.ratio)
    codecs = ", ".join(f"{n} {c}" for c, n in sorted(result.codecs.items()))
    text = (
        f"compressed {result.name} against {result.base_name}: {codecs}; "
        f"{_human(result.stored_bytes)} on disk vs {_human(result.fp16_bytes)} in fp16 "
        f"({result.ratio:.1f}x smaller)"
    )
    if result.calibration is not None:
        data["calibration"] = result.calibration.to_json()
        text += "\n" + _calibration_text(result.calibration)
    else:
        data.pop("calibration", None)
    _emit(data, as_json, text)


@cli.command()
@click.argument("name")
@click.option(
    "--finetune",
    required=True,
    metavar="PATH_OR_ID",
    help="The fine-tune NAME was compressed from (the teacher): its checkpoint folder, a Hub "
    "REPO_ID[@REVISION], or the name of a stored dense copy.",
)
@calibration_options
@json_option
@click.pass_context
def calibrate(ctx: click.Context, name: str, finetune: str, as_json: bool, **calib: Any) -> None:
    """Calibrate the scales of stored delta NAME by distillation from its fine-tune.

    The fine-tune's next-token distributions on the calibration text are computed first and the
    fine-tune freed; then only the scales of the 1-bit tensors of NAME are trained (Adam) so that
    its distributions match (KL divergence). Signs, embeddings, norms and every other tensor stay
    as they are. NAME then points at a new manifest that shares every object but the scales; the
    loss before and after, the settings and the data are recorded (see `deltahub show NAME`).
    """
    result = _store(ctx).calibrate(name, finetune, _calibration(**calib))
    _emit(result.to_json(), as_json, _calibration_text(result))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _eval_lines(e: dict[str, Any]) -> list[str]:
    lines = [
        f"perplexity:  base {_num(e['ppl_base'])}, fine-tune {_num(e['ppl_finetune'])}, "
        f"delta {_num(e['ppl_delta'])}  ({e['samples']} x {e['seq_len']} tokens of {e['data']})",
    ]
    if e["finetune"] is not None:
        lines.append(f"KL(ft||delta): {_num(e['kl_mean'])} nats/token  (fine-tune: {e['finetune']})")
        lines.append(
            f"kept:        {_pct(e['kept_logppl'])} of the fine-tune's improvement (log-perplexity), "
            f"{_pct(e['kept_ppl'])} (perplexity)"
        )
    return lines


@cli.command("eval")
@click.argument("name")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out text (text file or JSONL, as for calibration). Default: the part of the bundled "
    "corpus that calibration does not use.",
)
@click.option(
    "--finetune",
    default=None,
    metavar="PATH_OR_ID",
    help="The fine-tune to compare with: checkpoint folder, Hub REPO_ID[@REVISION] or stored dense copy. "
    "Without it only the base's and the delta's perplexities are measured.",
)
@click.option("--samples", type=int, default=defaults.EVAL_SAMPLES, show_default=True, help="Number of token sequences.")
@click.option("--seq-len", type=int, default=defaults.EVAL_SEQ_LEN, show_default=True, help="Tokens per sequence.")
@click.option("--device", default=defaults.DEFAULT_DEVICE, show_default=True, help="Torch device, e.g. cuda.")
@json_option
@click.pass_context
def eval_(
    ctx: click.Context, name: str, data: Path | None, finetune: str | None, samples: int, seq_len: int,
    device: str, as_json: bool,
) -> None:
    """Measure how faithful stored delta NAME is, on held-out text, and record it.

    Perplexity of the base, of the fine-tune (with --finetune) and of the delta, the mean KL
    divergence of the delta's next-token distributions from the fine-tune's, and the share of the
    fine-tune's improvement over the base that the delta keeps. Models are loaded one at a time.
    The figures are stored in the index; `deltahub show NAME` prints the latest.
    """
    result = _store(ctx).evaluate(
        name, finetune, api.EvalOptions(data=data, samples=samples, seq_len=seq_len, device=device)
    )
    data_out = result.to_json()
    _emit(data_out, as_json, "\n".join([f"evaluated {name} ({result.n_tokens} tokens scored)"] + _eval_lines(data_out)))


@cli.command()
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(defaults.DTYPE_CHOICES),
    default=None,
    help="Dtype of the floating tensors (default: each tensor keeps its own dtype).",
)
@click.option("--max-shard-size", default=defaults.DEFAULT_MAX_SHARD_SIZE, show_default=True, help="Largest safetensors shard.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--bits", type=int, default=None,
              help="Rebuild from the first BITS sign planes of each matrix only (a delta stored with --bits K ≥ BITS).")
@click.option("--max-size", "max_size", default=None, metavar="SIZE",
              help="Rebuild from the best prefix of the stored planes whose tensor data fits SIZE (e.g. 30MB; "
              "a delta compressed with --avg-bits/--max-size stores the order planes pay in).")
@json_option
@click.pass_context
def materialize(
    ctx: click.Context, name: str, out_dir: Path, dtype: str | None, max_shard_size: str, force: bool,
    bits: int | None, max_size: str | None, as_json: bool
) -> None:
    """Write stored model NAME as an ordinary Hugging Face checkpoint in OUT_DIR.

    The result loads with transformers' from_pretrained. It is written to a temporary folder and
    renamed at the end; the same store content always gives the same bytes.
    """
    shard = _shard_size(max_shard_size)
    result = _store(ctx).materialize(name, out_dir, dtype=dtype, force=force, max_shard_size=shard, bits=bits,
                                     max_size=_max_size(max_size))
    data = {
        "name": result.name,
        "out_dir": str(result.out_dir),
        "dtype": result.dtype,
        "files": result.files,
        "bytes_written": result.bytes_written,
    }
    _emit(data, as_json, f"wrote {name} ({result.dtype}, {_human(result.bytes_written)}) to {result.out_dir}")


@cli.command("vllm-prepare")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(defaults.DTYPE_CHOICES), default=None,
              help="Dtype vLLM runs the model in (default: the stored model's).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--bits", type=int, default=None, help="Serve the first BITS sign planes of each matrix only.")
@click.option("--max-size", "max_size", default=None, metavar="SIZE",
              help="Serve the best prefix of the stored planes whose tensor data fits SIZE (e.g. 30MB).")
@click.option("--adapter-planes", type=click.IntRange(1, 8), default=defaults.VLLM_ADAPTER_PLANES, show_default=True,
              help="For a base served with --enable-lora: the most sign planes a fine-tune served as its adapter may have.")
@click.option("--adapter-group", type=int, default=None,
              help="For a base served with --enable-lora: the scale group (columns) of adapters with per-group scales.")
@click.option("--apply", "apply_mode", type=click.Choice(defaults.VLLM_APPLY_MODES), default=defaults.VLLM_APPLY,
              show_default=True, help="How vLLM applies the deltas: auto = merged into the weights once on a CPU, "
              "on the fly with the Triton kernels on a GPU.")
@json_option
@click.pass_context
def vllm_prepare(ctx: click.Context, name: str, out_dir: Path, dtype: str | None, force: bool, bits: int | None,
                 max_size: str | None, adapter_planes: int, adapter_group: int | None, apply_mode: str,
                 as_json: bool) -> None:
    """Write the folder vLLM serves stored model NAME from: config, tokenizer and a pointer to this
    store; no weights.

    Needs vLLM and deltahub in one environment (deltahub registers itself as a vLLM plug-in):

    \b
        deltahub vllm-prepare my-ft ./my-ft-vllm
        python -m vllm.entrypoints.openai.api_server --model ./my-ft-vllm --load-format deltahub

    vLLM then reads the base weights and the delta's sign planes from the store and applies the delta
    on the fly. The folder serves the model NAME named when it was written, even if NAME is re-pointed.
    """
    result = _store(ctx).vllm_prepare(name, out_dir, dtype=dtype, force=force, bits=bits, max_size=_max_size(max_size),
                                      adapter_planes=adapter_planes, adapter_group=adapter_group, apply=apply_mode)
    _emit(result.to_json(), as_json, f"prepared {name} ({result.dtype}, {result.delta_tensors} delta tensor(s) as sign "
          f"planes) in {result.out_dir}\nserve it: python -m vllm.entrypoints.openai.api_server --model "
          f"{result.out_dir} --load-format deltahub")


@cli.command()
@click.argument("name")
@click.argument("repo_id")
@click.option(
    "--revision", default=None, help=f"Branch to push to (created if missing; default: {defaults.DEFAULT_REVISION})."
)
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--message", default=None, help="Commit message (default: 'Push deltahub delta NAME').")
@click.option(
    "--base-repo",
    default=None,
    metavar="REPO_ID[@REVISION]",
    help="Hub repo (and revision) of the base, when the store does not know where the base lives; "
    "with --with-base, the repo (and branch) to push the base to.",
)
@click.option(
    "--with-base",
    is_flag=True,
    help="Push the delta's base too, as an ordinary checkpoint, to --base-repo (default REPO_ID-base).",
)
@click.option("--max-shard-size", default=defaults.DEFAULT_MAX_SHARD_SIZE, show_default=True, help="Largest safetensors file.")
@json_option
@click.pass_context
def push(
    ctx: click.Context,
    name: str,
    repo_id: str,
    revision: str | None,
    private: bool,
    message: str | None,
    base_repo: str | None,
    with_base: bool,
    max_shard_size: str,
    as_json: bool,
) -> None:
    """Publish stored model NAME as Hub model repo REPO_ID, in one commit.

    A delta's repo holds deltahub.json (the manifest), delta*.safetensors (packed signs and dense
    tensors), the fine-tune's config and tokenizer files, and a README.md model card naming the
    base. A base is pushed as an ordinary checkpoint (its Hub id and commit are then remembered).
    Pushing the same content again makes no commit. Uses your Hugging Face login (HF_TOKEN,
    HF_ENDPOINT).
    """
    shard = _shard_size(max_shard_size)
    result = _store(ctx).push(
        name,
        repo_id,
        revision=revision,
        private=private,
        message=message,
        base_repo=base_repo,
        max_shard_size=shard,
        with_base=with_base,
    )
    data = {k: getattr(result, k) for k in ("repo_id", "revision", "commit", "uploaded", "files", "bytes")}
    if result.base is not None:
        b = result.base
        data["base"] = {k: getattr(b, k) for k in ("repo_id", "revision", "commit", "uploaded", "files", "bytes")}
        data["base"]["commit"] = b.base_commit
    base_line = ""
    if result.base is not None:
        state = "pushed" if result.base.uploaded else "already there"
        base_line = f"base {state}: {result.base.repo_id}@{result.base.revision} (commit {result.base.base_commit[:12]})\n"
    if result.uploaded:
        text = (
            f"pushed {name} to {result.repo_id}@{result.revision} (commit {result.commit[:12]}, "
            f"{len(result.changed)} of {len(result.files)} files changed, {_human(result.bytes)})"
        )
    else:
        text = f"{result.repo_id}@{result.revision} already holds {name}; nothing pushed"
    _emit(data, as_json, base_line + text)


@cli.command()
@click.argument("repo", metavar="REPO_ID[@REVISION]")
@click.option("--name", default=None, help="Local name (default: the repo's name part).")
@click.option("--force", is_flag=True, help="Re-point NAME if it already names another model.")
@click.option("--bits", type=int, default=None,
              help="Fetch only the first BITS sign planes of each matrix (a delta pushed with --bits K ≥ BITS).")
@click.option("--max-size", "max_size", default=None, metavar="SIZE",
              help="Fetch only the best prefix of the planes whose tensor data fits SIZE (e.g. 30MB), ending at a "
              "file boundary of the repo (no file is fetched for a plane that is not kept).")
@json_option
@click.pass_context
def pull(ctx: click.Context, repo: str, name: str | None, force: bool, bits: int | None, max_size: str | None,
         as_json: bool) -> None:
    """Fetch the delta in Hub repo REPO_ID (at REVISION: a branch, tag or commit id) into the store.

    The revision is pinned to a commit id, every file and tensor is checked against deltahub.json
    before it is stored. A base the store lacks is added from the Hub repo and revision that
    deltahub.json names (and must match the recorded base tensors). Pulling a delta the store
    already holds downloads only deltahub.json. Uses your Hugging Face login (HF_TOKEN, HF_ENDPOINT).
    """
    result = _store(ctx).pull(repo, name=name, force=force, bits=bits, max_size=_max_size(max_size))
    data = {
        k: getattr(result, k)
        for k in ("repo_id", "revision", "commit", "name", "manifest_id", "already_stored", "downloaded", "bytes")
    }
    if result.already_stored:
        text = f"{result.repo_id}@{result.commit[:12]} is already stored; named it {result.name}"
    else:
        text = (
            f"pulled {result.repo_id}@{result.revision} (commit {result.commit[:12]}, "
            f"{len(result.downloaded)} files, {_human(result.bytes)}) as {result.name}"
        )
    if result.base_fetched:
        data["base_fetched"] = result.base_fetched
        text += f"; its base was added from the Hub as {result.base_fetched}"
    _emit(data, as_json, text)


@cli.command("ls")
@json_option
@click.pass_context
def ls_(ctx: click.Context, as_json: bool) -> None:
    """List stored models: name, kind, base, size on disk and ratio to fp16."""
    rows = _store(ctx).list()
    lines = [f"{'NAME':<28} {'KIND':<6} {'BASE':<24} {'ON DISK':>10} {'FP16':>10} {'RATIO':>7}"]
    for r in rows:
        lines.append(
            f"{r['name']:<28} {r['kind']:<6} {r['base'] or '-':<24} {_human(r['stored_bytes']):>10} "
            f"{_human(r['fp16_bytes']):>10} {(str(r['ratio']) + 'x') if r['ratio'] else '-':>7}"
        )
    _emit(rows, as_json, "\n".join(lines) if rows else "no models stored")


@cli.command()
@click.argument("name")
@click.option("--tensors", is_flag=True, help="Also list every tensor with its codec and statistics.")
@json_option
@click.pass_context
def show(ctx: click.Context, name: str, tensors: bool, as_json: bool) -> None:
    """Show a stored model: kind, base, tensors per codec, bytes on disk, ratio, statistics."""
    info = _store(ctx).show(name, tensors=tensors)
    lines = [
        f"name:        {info['name']}",
        f"kind:        {info['kind']}",
        f"manifest:    {info['manifest_id']}",
        f"model:       {info['model_type']} {', '.join(info['architectures'])} ({info['dtype']})",
    ]
    if info["kind"] == "delta":
        base = info["base"]
        lines.append(f"base:        {', '.join(base['names']) or '(unnamed)'} ({base['manifest_id'][:12]})")
    lines.append(f"parameters:  {info['params']:,}")
    lines.append(
        f"on disk:     {_human(info['stored_bytes'])}  (fp16 size {_human(info['fp16_bytes'])}, "
        f"ratio {info['ratio']}x)"
    )
    for codec, c in sorted(info["codecs"].items()):
        lines.append(
            f"  {codec:<6} {c['tensors']:>5} tensors {c['params']:>14,} params {_human(c['stored_bytes']):>10}"
        )
    if "statistics" in info:
        s = info["statistics"]
        lines.append(
            f"delta norm:  mean {s['mean_rel_delta_norm']:.4g}, max {s['max_rel_delta_norm']:.4g} (|dW|/|W|)"
        )
        lines.append(
            f"recon error: mean {s['mean_rel_recon_error']:.4g}, max {s['max_rel_recon_error']:.4g} "
            "(|dW - s*sign(dW)|/|dW|)"
        )
    cal = info.get("calibration")
    if cal is not None:
        lines.append(
            f"calibration: loss {cal['loss_before']:.4g} -> {cal['loss_after']:.4g} (KL, nats/token), "
            f"{cal['n_scales']} scales, {cal['steps']} steps, lr {cal['lr']:g}, {cal['samples']} x "
            f"{cal['seq_len']} tokens of {cal['data']}, seed {cal['seed']}, {cal['created_at'][:19]} "
            f"(from manifest {cal['previous_manifest_id'][:12]})"
        )
    elif info["kind"] == "delta":
        lines.append("calibration: none (scales are mean |dW|; see `deltahub calibrate`)")
    ev = info.get("evaluation")
    if ev is not None:
        lines.append(f"evaluation:  {ev['created_at'][:19]}")
        lines.extend("  " + line for line in _eval_lines(ev))
    alloc = info.get("allocation")
    if alloc is not None:
        lines.extend(_allocation_lines(alloc))
    if tensors:
        lines.append(
            f"{'TENSOR':<52} {'CODEC':<6} {'SCALE':>10} {'INITIAL':>10} {'|dW|/|W|':>9} {'ERR':>7}"
        )
        for t in info["tensors"]:
            scale = f"{t['scale']:.3e}" if t["scale"] is not None else "-"
            initial = f"{t['initial_scale']:.3e}" if t.get("initial_scale") is not None else "-"
            norm = f"{t['rel_delta_norm']:.3g}" if t["rel_delta_norm"] is not None else "-"
            err = f"{t['rel_recon_error']:.3f}" if t["rel_recon_error"] is not None else "-"
            lines.append(f"{t['name']:<52} {t['codec']:<6} {scale:>10} {initial:>10} {norm:>9} {err:>7}")
    _emit(info, as_json, "\n".join(lines))


def _allocation_lines(alloc: dict[str, Any]) -> list[str]:
    """``show``'s planes per matrix, one line per layer (``q_proj 2  k_proj 1 ...``)."""
    how = "chosen by sensitivity for a budget" if alloc["ordered"] else "uniform"
    lines = [
        f"planes:      {sum(alloc['planes'].values())} over {len(alloc['planes'])} matrices ({how}); tensor data "
        f"{_human(alloc['tensor_bytes'])} = {alloc['avg_bits']:.3f} bits/param (--max-size down to "
        f"{alloc['min_tensor_bytes']} bytes = {alloc['min_avg_bits']:.3f})"
    ]
    for entry in alloc["by_layer"]:
        labels = _short_labels(list(entry["planes"]))
        parts = "  ".join(f"{labels[rest]} {k}" for rest, k in entry["planes"].items())
        lines.append(f"  {entry['layer']:<28} {parts}")
    return lines


def _short_labels(names: list[str]) -> dict[str, str]:
    """Each dotted name's shortest suffix that no other name of the list shares
    (``attn.c_proj`` and ``mlp.c_proj`` stay apart; ``self_attn.q_proj`` is ``q_proj``)."""
    out: dict[str, str] = {}
    for name in names:
        parts = name.split(".") if name else ["-"]
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != name and (o == label or o.endswith("." + label)) for o in names):
                break
        out[name] = label
    return out


@cli.command()
@json_option
@click.pass_context
def du(ctx: click.Context, as_json: bool) -> None:
    """Disk usage of the store: objects, index, unreferenced bytes, and per model."""
    info = _store(ctx).du()
    lines = [
        f"store:        {info['home']}",
        f"objects:      {info['objects']} ({_human(info['object_bytes'])})",
        f"unreferenced: {info['unreferenced_objects']} ({_human(info['unreferenced_bytes'])}; `deltahub gc` frees them)",
        f"index:        {_human(info['index_bytes'])}",
        f"tmp:          {info['tmp_entries']} ({_human(info['tmp_bytes'])}; "
        f"{info['stale_tmp_entries']} left by dead processes, `deltahub gc` frees them)",
        f"reserve:      {_human(info['reserve_bytes'])} (given back when the disk is nearly full)",
        f"total:        {_human(info['total_bytes'])}",
    ]
    if info["hf_cache_references"]:
        lines.append(
            f"in HF cache:  {_human(info['hf_cache_referenced_bytes'])} referenced by "
            f"{info['hf_cache_references']} objects (not counted above)"
        )
    for m in info["models"]:
        lines.append(f"  {m['name']:<28} {m['kind']:<6} {_human(m['stored_bytes']):>10}")
    _emit(info, as_json, "\n".join(lines))


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove a base's name even if stored deltas use it.")
@json_option
@click.pass_context
def rm(ctx: click.Context, name: str, force: bool, as_json: bool) -> None:
    """Remove the name NAME. Its objects are freed by the next `deltahub gc`."""
    result = _store(ctx).rm(name, force=force)
    _emit(result, as_json, f"removed {name}; run `deltahub gc` to free its space")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@json_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Delete objects no stored model references (and temp files of dead processes)."""
    report = _store(ctx).gc(dry_run=dry_run)
    verb = "would free" if dry_run else "freed"
    _emit(
        report.to_json(),
        as_json,
        f"{verb} {len(report.objects)} objects ({_human(report.bytes)}) and {len(report.temp_files)} temp "
        f"files ({_human(report.temp_bytes)})",
    )


@cli.command()
@json_option
@click.pass_context
def verify(ctx: click.Context, as_json: bool) -> None:
    """Re-hash every object and check every manifest and name. Exits 1 on any problem.

    verify reports; it never repairs. Re-add or re-pull a damaged model, then run gc.
    """
    report = _store(ctx).verify()
    lines = [f"checked {report.objects_checked} objects and {report.manifests_checked} manifests"]
    for p in report.problems:
        lines.append(f"{p['kind']}: {p['subject']}: {p['detail']}")
    lines.append("ok" if report.ok else f"{len(report.problems)} problem(s) found")
    _emit(report.to_json(), as_json, "\n".join(lines))
    if not report.ok:
        ctx.exit(1)


@cli.command()
@click.argument("name", required=False)
@click.argument("prompt", required=False)
@click.option(
    "--tenant",
    "tenants",
    nargs=2,
    multiple=True,
    metavar="NAME PROMPT",
    help="A (fine-tune, prompt) pair; repeat it to serve several fine-tunes of one base in one batch.",
)
@click.option(
    "--mode",
    type=click.Choice(defaults.LOAD_MODES),
    default=None,
    help="materialize: rebuild each model in full; delta: keep the deltas packed and apply them at "
    "inference (default: materialize for one pair, delta for several).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=defaults.DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    help="Tokens to generate.",
)
@click.option(
    "--dtype",
    type=click.Choice(defaults.DTYPE_CHOICES),
    default=None,
    help="Dtype to run the model in (default: the model's own).",
)
@click.option("--device", default=defaults.DEFAULT_DEVICE, show_default=True, help="Torch device to run on, e.g. cuda.")
@json_option
@click.pass_context
def generate(
    ctx: click.Context,
    name: str | None,
    prompt: str | None,
    tenants: tuple[tuple[str, str], ...],
    mode: str | None,
    max_new_tokens: int,
    dtype: str | None,
    device: str,
    as_json: bool,
) -> None:
    """Generate text with stored models: NAME PROMPT, and/or --tenant NAME PROMPT pairs.

    Decoding is greedy. With several pairs in delta mode, one base model is loaded and every pair is
    a row of one batch using its own fine-tune (a base's name gives a base row).
    """
    if name is not None and prompt is None:
        raise click.UsageError("give a PROMPT after NAME (or use --tenant NAME PROMPT)")
    pairs = ([(name, prompt)] if name is not None and prompt is not None else []) + list(tenants)
    if not pairs:
        raise click.UsageError("give NAME PROMPT or at least one --tenant NAME PROMPT")
    results = _store(ctx).generate(pairs, mode=mode, max_new_tokens=max_new_tokens, dtype=dtype, device=device)
    if len(results) == 1:
        text = results[0].text
    else:
        text = "\n".join(f"{r.name}: {r.text}" for r in results)
    _emit({"results": [r.to_json() for r in results]}, as_json, text)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "serve_all", is_flag=True, help="Serve every stored model (loaded on first request).")
@click.option("--host", default=defaults.SERVE_HOST, show_default=True,
              help="Address to bind. The default answers this machine only; 0.0.0.0 answers every network.")
@click.option("--port", type=click.IntRange(0, 65535), default=defaults.SERVE_PORT, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--device", default=defaults.SERVE_DEVICE, show_default=True,
              help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(defaults.DTYPE_CHOICES), default=None,
              help="Dtype to run the models in (default: each base's own).")
@click.option("--max-batch", type=click.IntRange(min=1), default=defaults.SERVE_MAX_BATCH, show_default=True,
              help="Most requests decoded together per base; each holds its own KV cache.")
@click.option("--max-waiting", type=click.IntRange(min=0), default=defaults.SERVE_MAX_WAITING, show_default=True,
              help="Requests admitted beyond --max-batch (waiting for a row); more get 429 with Retry-After.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Cap on prompt plus generated tokens per request (default: the model's context length).")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Most memory for resident bases and deltas, e.g. 4GB; the least recently used model is "
              "evicted to load another (default: no limit).")
@click.option("--api-key", envvar="DELTAHUB_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (or set DELTAHUB_API_KEY).")
@click.option("--pull", "pull", is_flag=True,
              help="A requested model the store lacks is pulled from the Hub (the model is the repo id).")
@click.option("--grace", type=click.FloatRange(min=0, max=defaults.SERVE_MAX_GRACE_SECONDS), default=defaults.SERVE_GRACE_SECONDS, show_default=True,
              help="Seconds SIGTERM/Ctrl-C leaves requests in flight to finish before cancelling them.")
@click.option("--json-logs", is_flag=True, help="Log JSON lines on stderr (startup, one line per request).")
@click.option("--engine", type=click.Choice(defaults.SERVE_ENGINES), default=defaults.SERVE_ENGINE, show_default=True,
              help="builtin: deltahub's own server. vllm: vLLM's OpenAI server with deltahub's plug-in (one base per "
              "server; its fine-tunes as adapters; needs vLLM installed).")
@click.option("--engine-arg", "engine_args", multiple=True, metavar="ARG",
              help="An option passed to vLLM as it is (repeatable), e.g. --engine-arg=--gpu-memory-utilization=0.5.")
@click.pass_context
def serve(
    ctx: click.Context,
    names: tuple[str, ...],
    serve_all: bool,
    host: str,
    port: int,
    device: str,
    dtype: str | None,
    max_batch: int,
    max_waiting: int,
    max_context: int | None,
    memory_budget: str | None,
    api_key: str | None,
    pull: bool,
    grace: float,
    json_logs: bool,
    engine: str,
    engine_args: tuple[str, ...],
) -> None:
    """Serve stored models over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health), with the fine-tune chosen by each request's "model".

    Requests for different fine-tunes of one base share every decode step (continuous batching); the
    base's own name serves the base. NAMES are loaded at start; with --all or --pull, other models load
    on the first request for them. Stop with Ctrl-C or SIGTERM: requests in flight get --grace seconds.

    \b
    deltahub serve chat code --port 8000
    curl localhost:8000/v1/completions -d '{"model": "chat", "prompt": "Hello", "max_tokens": 20}'

    With --engine vllm, vLLM serves them instead (the same API): one fine-tune alone exactly, or a base
    and fine-tunes of it in one engine, each fine-tune a LoRA adapter (Linear deltas only).
    """
    if not names and not serve_all:
        raise click.UsageError("name the models to serve, or pass --all")
    if api_key is None and os.environ.get("DELTAHUB_API_KEY") == "":
        raise click.UsageError("DELTAHUB_API_KEY is set but empty: give a key, or unset it")
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("is empty: give a key, or leave --api-key out", param_hint="--api-key")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise click.BadParameter("must be printable ASCII (HTTP headers carry nothing else)", param_hint="--api-key")
    rc = api.serve(list(names), serve_all=serve_all, home=ctx.find_root().obj.get("home"), host=host, port=port,
                   device=device, dtype=dtype, max_batch=max_batch, memory_budget=_size(memory_budget, "--memory-budget"),
                   api_key=api_key, pull=pull, max_context=max_context, max_waiting=max_waiting, grace=grace,
                   json_logs=json_logs, engine=engine, engine_args=engine_args)
    if rc:
        ctx.exit(rc)


def main() -> None:
    cli(prog_name="deltahub")


if __name__ == "__main__":
    main()
