"""Storing a checkpoint's non-weight files (config, tokenizer, ...) as objects."""

from __future__ import annotations

from deltahub.formats.checkpoint import Checkpoint
from deltahub.ops.context import StoreContext
from deltahub.store import Compression, ObjectInfo


def store_files(ctx: StoreContext, checkpoint: Checkpoint) -> tuple[dict[str, str], dict[str, ObjectInfo]]:
    """Put every carried file of ``checkpoint``; returns (file name -> object id, object infos)."""
    files: dict[str, str] = {}
    infos: dict[str, ObjectInfo] = {}
    for rel, path in sorted(checkpoint.files.items()):
        info = ctx.put(path.read_bytes(), Compression.AUTO)
        files[rel] = info.sha256
        infos[info.sha256] = info
    return files, infos
