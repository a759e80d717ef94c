"""The ``deltahub`` command line: a thin layer over :mod:`deltahub.api`.

Results go to stdout (``--json`` for scripts), messages and progress bars to stderr. Errors are
mapped to one-line messages and exit codes by :data:`ERROR_EXIT_CODES`; ``DELTAHUB_DEBUG=1`` adds
the traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from deltahub import __version__
from deltahub.config import debug_enabled
from deltahub.errors import (
    CorruptObjectError,
    DeltaHubError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    IncompatibleBaseError,
    InputError,
    InUseError,
    InvalidNameError,
    NameExistsError,
    NameNotFoundError,
    OutputExistsError,
    StoreError,
    UnsupportedFormatError,
    WrongBaseError,
)

#: Exception type -> exit code. The first matching entry (in order) wins.
ERROR_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (InvalidNameError, 2),
    (NameNotFoundError, 3),
    (NameExistsError, 4),
    (OutputExistsError, 4),
    (InUseError, 4),
    (InputError, 5),
    (IncompatibleBaseError, 6),
    (WrongBaseError, 6),
    (CorruptObjectError, 7),
    (UnsupportedFormatError, 8),
    (HubAuthError, 12),
    (HubNotFoundError, 13),
    (HubConnectionError, 14),
    (HubError, 15),
    (StoreError, 9),
    (DeltaHubError, 1),
    (SQLAlchemyError, 9),  # the index failed (locked for too long, disk full, damaged file)
    (OSError, 10),  # the file system refused (disk full, permissions, a file in the way)
    (MemoryError, 11),
]

#: Exceptions the CLI turns into a one-line message instead of a traceback.
HANDLED: tuple[type[BaseException], ...] = tuple(cls for cls, _code in ERROR_EXIT_CODES)


def error_message(exc: BaseException) -> str:
    """One line for any handled exception."""
    if isinstance(exc, DeltaHubError):
        return str(exc)
    if isinstance(exc, SQLAlchemyError):
        return f"the store's index failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where} (check free disk space and permissions)"
    return "out of memory (close other programs or use a machine with more memory)"


def exit_code_for(exc: BaseException) -> int:
    for cls, code in ERROR_EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


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


def _store(ctx: click.Context):
    from deltahub.api import Store

    obj = ctx.find_root().obj
    if obj.get("store") is None:
        obj["store"] = Store(obj.get("home"))
        ctx.find_root().call_on_close(obj["store"].close)
    return obj["store"]


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


class DeltaHubGroup(click.Group):
    """Runs commands with the error table applied."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HANDLED as exc:
            if debug_enabled():
                traceback.print_exc()
            click.echo(f"Error: {error_message(exc)}", err=True)
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was left half-written.", err=True)
            ctx.exit(130)


@click.group(cls=DeltaHubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltahub")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DELTAHUB_HOME",
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
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--name", help="Name for the base (default: the folder's or repo's name).")
@click.option("--force", is_flag=True, help="Re-point NAME if it already exists.")
@json_option
@click.pass_context
def add(ctx: click.Context, src: Path, name: str | None, force: bool, as_json: bool) -> None:
    """Add a base model from a local Hugging Face checkpoint folder SRC, or from the Hub.

    SRC holds config.json, safetensors weights (model.safetensors or shards with
    model.safetensors.index.json) and optionally tokenizer, generation-config and chat-template
    files. Tensors keep their dtype (fp32, fp16 or bf16). Pickle checkpoints are refused.

    SRC that is no local folder but looks like REPO_ID[@REVISION] is downloaded from the Hub at
    that revision (pinned to its commit id; only config, safetensors and tokenizer files, into
    your HF cache, reused when already there, HF_HUB_OFFLINE=1 included). The Hub id and commit
    are remembered, so `deltahub push` of deltas on this base needs no --base-repo.
    """
    result = _store(ctx).add(src, name=name, force=force)
    _emit(
        result.__dict__,
        as_json,
        f"added base {result.name}: {result.n_tensors} tensors, {_human(result.stored_bytes)} "
        f"(manifest {result.manifest_id[:12]})",
    )


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--base", "base", required=True, help="Name of the stored base it was fine-tuned from.")
@click.option("--name", required=True, help="Name for the compressed fine-tune.")
@click.option(
    "--embeddings",
    type=click.Choice(["sign1", "dense"]),
    default="sign1",
    show_default=True,
    help="Store embeddings and the LM head as 1-bit deltas (default; much smaller) or dense (exact, "
    "keeps slightly more of the fine-tune's quality).",
)
@click.option("--force", is_flag=True, help="Re-point NAME if it already exists.")
@json_option
@click.pass_context
def compress(ctx: click.Context, src: Path, base: str, name: str, embeddings: str, force: bool, as_json: bool) -> None:
    """Compress the fine-tune in folder SRC into a 1-bit delta against BASE.

    2-D weight matrices become packed sign bits plus one fp32 scale (mean |delta|); 1-D tensors are
    stored dense; tensors identical to the base cost nothing. The fine-tune must have every tensor
    of the base with the same shapes (a resized vocabulary is stored dense).

    SRC that is no local folder but looks like REPO_ID[@REVISION] is downloaded from the Hub like
    `deltahub add` does (pinned to its commit id; config, safetensors and tokenizer files only,
    into your HF cache, reused when already there, HF_HUB_OFFLINE=1 included).
    """
    result = _store(ctx).compress(src, base=base, name=name, embeddings=embeddings, force=force)
    data = dict(result.__dict__, ratio=result.ratio)
    codecs = ", ".join(f"{n} {c}" for c, n in sorted(result.codecs.items()))
    _emit(
        data,
        as_json,
        f"compressed {result.name} against {result.base_name}: {codecs}; "
        f"{_human(result.stored_bytes)} on disk vs {_human(result.fp16_bytes)} in fp16 "
        f"({result.ratio:.1f}x smaller)",
    )


@cli.command()
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default=None,
    help="Dtype of the floating tensors (default: each tensor keeps its own dtype).",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@json_option
@click.pass_context
def materialize(
    ctx: click.Context, name: str, out_dir: Path, dtype: str | None, max_shard_size: str, force: bool, as_json: bool
) -> None:
    """Write stored model NAME as an ordinary Hugging Face checkpoint in OUT_DIR.

    The result loads with transformers' from_pretrained. It is written to a temporary folder and
    renamed at the end; the same store content always gives the same bytes.
    """
    try:
        from deltahub.formats.hf_writer import parse_size

        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
    result = _store(ctx).materialize(name, out_dir, dtype=dtype, force=force, max_shard_size=shard)
    data = {
        "name": result.name,
        "out_dir": str(result.out_dir),
        "dtype": result.dtype,
        "files": result.files,
        "bytes_written": result.bytes_written,
    }
    _emit(data, as_json, f"wrote {name} ({result.dtype}, {_human(result.bytes_written)}) to {result.out_dir}")


@cli.command()
@click.argument("name")
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to push to (created if missing; default: main).")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--message", default=None, help="Commit message (default: 'Push deltahub delta NAME').")
@click.option(
    "--base-repo",
    default=None,
    metavar="REPO_ID[@REVISION]",
    help="Hub repo (and revision) of the base, when the store does not know where the base lives.",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest delta safetensors file.")
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
    max_shard_size: str,
    as_json: bool,
) -> None:
    """Publish stored delta NAME as Hub model repo REPO_ID, in one commit.

    The repo holds deltahub.json (the manifest), delta*.safetensors (packed signs and dense
    tensors), the fine-tune's config and tokenizer files, and a README.md model card naming the
    base. Pushing the same delta again makes no commit. Uses your Hugging Face login (HF_TOKEN,
    HF_ENDPOINT).
    """
    try:
        from deltahub.formats.hf_writer import parse_size

        shard = parse_size(max_shard_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
    result = _store(ctx).push(
        name, repo_id, revision=revision, private=private, message=message, base_repo=base_repo, max_shard_size=shard
    )
    data = {k: getattr(result, k) for k in ("repo_id", "revision", "commit", "uploaded", "files", "bytes")}
    if result.uploaded:
        text = (
            f"pushed {name} to {result.repo_id}@{result.revision} (commit {result.commit[:12]}, "
            f"{len(result.changed)} of {len(result.files)} files changed, {_human(result.bytes)})"
        )
    else:
        text = f"{result.repo_id}@{result.revision} already holds {name}; nothing pushed"
    _emit(data, as_json, text)


@cli.command()
@click.argument("repo", metavar="REPO_ID[@REVISION]")
@click.option("--name", default=None, help="Local name (default: the repo's name part).")
@click.option("--force", is_flag=True, help="Re-point NAME if it already names another model.")
@json_option
@click.pass_context
def pull(ctx: click.Context, repo: str, name: str | None, force: bool, as_json: bool) -> None:
    """Fetch the delta in Hub repo REPO_ID (at REVISION: a branch, tag or commit id) into the store.

    The revision is pinned to a commit id, every file and tensor is checked against deltahub.json
    before it is stored. A base the store lacks is added from the Hub repo and revision that
    deltahub.json names (and must match the recorded base tensors). Pulling a delta the store
    already holds downloads only deltahub.json. Uses your Hugging Face login (HF_TOKEN, HF_ENDPOINT).
    """
    result = _store(ctx).pull(repo, name=name, force=force)
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
    if tensors:
        lines.append(f"{'TENSOR':<52} {'CODEC':<6} {'SCALE':>10} {'|dW|/|W|':>9} {'ERR':>7}")
        for t in info["tensors"]:
            scale = f"{t['scale']:.3e}" if t["scale"] is not None else "-"
            norm = f"{t['rel_delta_norm']:.3g}" if t["rel_delta_norm"] is not None else "-"
            err = f"{t['rel_recon_error']:.3f}" if t["rel_recon_error"] is not None else "-"
            lines.append(f"{t['name']:<52} {t['codec']:<6} {scale:>10} {norm:>9} {err:>7}")
    _emit(info, as_json, "\n".join(lines))


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
        f"total:        {_human(info['total_bytes'])}",
    ]
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
        f"{verb} {len(report.objects)} objects ({_human(report.bytes)}) and {len(report.temp_files)} temp files",
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


def main() -> None:
    cli(prog_name="deltahub")


if __name__ == "__main__":
    main()
