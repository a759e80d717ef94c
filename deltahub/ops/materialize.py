"""``materialize``: write a stored model as an ordinary Hugging Face checkpoint.

The checkpoint is written into a temporary sibling directory of ``out_dir`` and renamed into place
at the end, so ``out_dir`` is never half-written. A non-empty ``out_dir`` is refused unless
``force``. Same store content and options give the same bytes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from deltahub.errors import InputError, OutputExistsError
from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES, write_sharded
from deltahub.formats.paths import join_inside
from deltahub.formats.safetensors_io import dtype_name
from deltahub.ops.context import StoreContext
from deltahub.ops.reconstruct import ModelSource
from deltahub.progress import progress_bar
from deltahub.store import fsync_dir

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class MaterializeResult:
    name: str
    out_dir: Path
    dtype: str
    files: list[str]
    bytes_written: int


def parse_output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise InputError(
            f"unsupported output dtype {dtype!r}", f"use one of {', '.join(OUTPUT_DTYPES)}"
        ) from None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def write_checkpoint(
    source: ModelSource,
    out: Path,
    specs: list,
    desc: str,
    max_shard_bytes: int,
    config: bytes | None = None,
) -> list[str]:
    """Write ``source`` into folder ``out`` as an HF checkpoint: its carried files (``config.json``
    replaced by ``config`` when given, else byte for byte) and ``specs`` in safetensors shards, one
    tensor at a time. Returns the files written."""
    files = []
    for rel in sorted(source.manifest.files):
        target = join_inside(out, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(config if rel == "config.json" and config is not None else source.file_bytes(rel))
        files.append(rel)
    inputs = source.iter_inputs(specs)
    with progress_bar(sum(spec.nbytes for spec in specs), desc, unit="B", unit_scale=True) as bar:
        files += write_sharded(
            out,
            specs,
            lambda spec, dst: source.fill(spec.name, next(inputs), dst),
            max_shard_bytes=max_shard_bytes,
            on_tensor=lambda spec: bar.update(spec.nbytes),
        )
    return files


def materialize(
    ctx: StoreContext,
    name: str,
    out_dir: Path,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    verify: bool = True,
) -> MaterializeResult:
    """Write model ``name`` to ``out_dir`` as safetensors shards + config + tokenizer files."""
    out_dir = Path(os.path.abspath(out_dir))
    out_dtype = parse_output_dtype(dtype)
    home = ctx.home.resolve()
    if out_dir == Path(out_dir.anchor) or out_dir.resolve() == home or home in out_dir.resolve().parents or (
        out_dir.resolve() in home.parents
    ):
        raise OutputExistsError(
            f"refusing to write into {out_dir}", "choose an output directory outside the store and not containing it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a directory", "choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(
            f"{out_dir} is not empty", "choose an empty or new directory, or pass --force to replace it"
        )
    source = ModelSource.open(ctx, name, verify=verify)
    specs = source.specs(out_dtype)  # None: every tensor keeps its stored dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.deltahub-tmp-", dir=out_dir.parent))
    try:
        config = json.dumps(source.config(out_dtype), indent=2, sort_keys=True) + "\n"
        files = write_checkpoint(source, tmp, specs, f"materialize {name}", max_shard_bytes, config.encode())
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        if force and out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.deltahub-old-", dir=out_dir.parent))
            os.replace(out_dir, old / "old")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                # Replaces only a missing or empty directory: a directory filled meanwhile by
                # someone else makes this fail instead of being overwritten.
                os.rename(tmp, out_dir)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise OutputExistsError(
                        f"{out_dir} was filled while materializing", "choose another directory or pass --force"
                    ) from None
                raise
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bytes_written = sum((out_dir / f).stat().st_size for f in files)
    logger.info("materialized %s into %s", name, out_dir)
    shown = dtype_name(out_dtype) if out_dtype is not None else source.manifest.dtype
    return MaterializeResult(name, out_dir, shown, sorted(files), bytes_written)
