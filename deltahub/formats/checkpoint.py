"""Reading a local Hugging Face checkpoint directory (inputs of ``add`` and ``compress``).

A checkpoint is ``config.json``, weights as safetensors (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), and the tokenizer / generation / chat-template files listed in
:data:`AUX_FILES`. Pickle checkpoints are never loaded: a directory that has only those is refused
with the command that converts it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import InputError, PickleCheckpointError
from deltahub.formats.paths import safe_relpath
from deltahub.formats.safetensors_io import SafetensorsReader, TensorEntry

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: Non-weight files carried along with a model (when present), byte for byte.
AUX_FILES = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)

CONVERT_HINT = (
    "deltahub never unpickles. If you trust the file, convert it once with: python -c \"from "
    "transformers import AutoModel; AutoModel.from_pretrained('SRC').save_pretrained('OUT', "
    "safe_serialization=True)\" and pass OUT"
)


@dataclass
class Checkpoint:
    """An opened checkpoint: its parsed config, tensor locations and extra files."""

    root: Path
    config: dict
    files: dict[str, Path]  # relative name -> path, config.json included
    tensors: dict[str, tuple[SafetensorsReader, TensorEntry]] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][1].dtype

    def read(self, name: str, copy: bool = True) -> torch.Tensor:
        """Tensor ``name``; ``copy=False`` may return a read-only memory-mapped view."""
        reader, _entry = self.tensors[name]
        return reader.read(name, copy=copy)

    def main_dtype(self) -> torch.dtype:
        """The dtype holding most parameters among floating tensors (the checkpoint's dtype)."""
        counts: dict[torch.dtype, int] = {}
        for _reader, entry in self.tensors.values():
            if entry.dtype.is_floating_point:
                counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
        if not counts:
            return torch.float32
        return max(sorted(counts, key=str), key=lambda d: counts[d])

    def total_bytes(self) -> int:
        return sum(entry.nbytes for _r, entry in self.tensors.values())


def select_weight_files(names: set[str], where: str, load_index: Callable[[], Any]) -> list[str]:
    """Which of a checkpoint's top-level file ``names`` hold its safetensors weights.

    Shared by local folders and Hub repos (``where`` names the place in messages). With
    ``model.safetensors.index.json`` among ``names``, ``load_index()`` returns its parsed JSON and
    the shards it lists are returned (the index itself is not); else ``model.safetensors``; else the
    single ``*.safetensors`` file. A checkpoint with only pickle weights raises
    :class:`PickleCheckpointError`.
    """
    if WEIGHTS_INDEX in names:
        try:
            weight_map = load_index()["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
            shards = sorted({safe_relpath(str(f)) for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{WEIGHTS_INDEX} in {where} is not a valid safetensors index ({exc})",
                "re-save the checkpoint with save_pretrained",
            ) from None
        for shard in shards:
            if "/" in shard:
                raise InputError(f"{WEIGHTS_INDEX} points outside the checkpoint folder: {shard!r}")
            if shard not in names:
                raise InputError(
                    f"shard {shard} listed in {WEIGHTS_INDEX} is missing from {where}",
                    "download or copy the missing shard",
                )
        return shards
    if SINGLE_WEIGHTS in names:
        return [SINGLE_WEIGHTS]
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise InputError(
            f"{where} has several .safetensors files but no {WEIGHTS_INDEX}",
            "add the index file written by save_pretrained",
        )
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PickleCheckpointError(f"{where} holds only pickle checkpoints ({', '.join(pickles[:3])})", CONVERT_HINT)
    raise InputError(
        f"no safetensors weights in {where}",
        "expected model.safetensors or model.safetensors.index.json with its shards",
    )


def _weight_files(root: Path) -> list[Path]:
    names = {p.name for p in root.iterdir() if p.is_file()}
    load_index = lambda: json.loads((root / WEIGHTS_INDEX).read_text(encoding="utf-8"))  # noqa: E731
    return [root / name for name in select_weight_files(names, str(root), load_index)]


def open_checkpoint(src: Path) -> Checkpoint:
    """Open and validate a checkpoint directory; reads headers only, no tensor data."""
    root = Path(src)
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise PickleCheckpointError(f"{root} is a pickle checkpoint", CONVERT_HINT)
        raise InputError(
            f"{root} is a file, not a checkpoint directory",
            "pass the folder holding config.json and the safetensors weights",
        )
    if not root.is_dir():
        raise InputError(f"no such checkpoint directory: {root}", "check the path")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(
            f"{root} has no {CONFIG_FILE}",
            "a Hugging Face checkpoint needs config.json; write it with model.config.save_pretrained(DIR)",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc})", "fix or re-save config.json") from None

    checkpoint = Checkpoint(root=root, config=config, files={CONFIG_FILE: config_path})
    for name in AUX_FILES:
        path = root / name
        if path.is_file():
            checkpoint.files[name] = path
    for path in _weight_files(root):
        reader = SafetensorsReader(path)
        for name, entry in reader.entries.items():
            if name in checkpoint.tensors:
                raise InputError(f"tensor {name!r} appears in two weight files of {root}")
            checkpoint.tensors[name] = (reader, entry)
    if not checkpoint.tensors:
        raise InputError(f"the weights in {root} hold no tensors")
    logger.debug("opened %s: %d tensors, %d files", root, len(checkpoint.tensors), len(checkpoint.files))
    return checkpoint
