"""Storing a checkpoint's non-weight files (config, tokenizer, ...) as objects."""

from __future__ import annotations

from deltahub.errors import InputError
from deltahub.formats.checkpoint import Checkpoint
from deltahub.ops.context import StoreContext
from deltahub.store import Compression, ObjectInfo


def store_files(ctx: StoreContext, checkpoint: Checkpoint) -> tuple[dict[str, str], dict[str, ObjectInfo]]:
    """Put every carried file of ``checkpoint``; returns (file name -> object id, object infos).

    The bytes stored must be the ones :func:`~deltahub.formats.checkpoint.open_checkpoint` checked
    (same sha256): a file changed or swapped for a link since is refused (the writer's rollback then
    removes what this call stored).
    """
    files: dict[str, str] = {}
    infos: dict[str, ObjectInfo] = {}
    for rel, path in sorted(checkpoint.files.items()):
        info = ctx.put(path.read_bytes(), Compression.AUTO)
        checked = checkpoint.file_sha256.get(rel)
        if checked is not None and info.sha256 != checked:
            raise InputError(
                f"{rel} in {checkpoint.root} changed while it was being stored",
                "run the command again once nothing writes to the checkpoint folder",
            )
        files[rel] = info.sha256
        infos[info.sha256] = info
    return files, infos
