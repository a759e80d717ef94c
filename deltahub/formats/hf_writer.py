"""Writing an ordinary Hugging Face checkpoint: safetensors shards plus their index.

Shards follow ``save_pretrained``'s naming: one ``model.safetensors`` when everything fits in one
shard, else ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``. Tensors are
laid out in the order given; the output is deterministic for the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from deltahub.defaults import DEFAULT_MAX_SHARD_BYTES
from deltahub.fileio import parse_size, write_file  # noqa: F401 - parse_size: its former home
from deltahub.formats.checkpoint import SINGLE_WEIGHTS, WEIGHTS_INDEX
from deltahub.formats.safetensors_io import SafetensorsWriter, TensorSpec

def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors into shards in order, starting a new shard when the next would overflow."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_WEIGHTS]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    fill: Callable[[TensorSpec, torch.Tensor], None],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[str]:
    """Write ``specs`` into ``out_dir`` as HF safetensors shards; returns the files written.

    ``fill(spec, out)`` writes each tensor, in order, into ``out``: a writable tensor of the
    spec's dtype and shape mapped onto its place in the shard file (one tensor mapped at a time).
    """
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        with SafetensorsWriter(out_dir / file_name, shard, metadata={"format": "pt"}) as writer:
            for spec in shard:
                with writer.region(spec.name) as out:
                    fill(spec, out)
                weight_map[spec.name] = file_name
                if on_tensor is not None:
                    on_tensor(spec)
    written = list(names)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_file(out_dir / WEIGHTS_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        written.append(WEIGHTS_INDEX)
    return written
