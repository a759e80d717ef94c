"""Reading a local Hugging Face checkpoint directory (inputs of ``add`` and ``compress``).

A checkpoint is ``config.json``, weights as safetensors (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), and the tokenizer / generation / chat-template files listed in
:data:`AUX_FILES`. Pickle checkpoints are never loaded: a directory that has only those is refused
with the command that converts it.
"""

from __future__ import annotations

import errno

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub.config import hf_hub_cache
from deltahub.errors import InputError, PickleCheckpointError
from deltahub.formats import safe_json
from deltahub.formats.paths import TENSOR_NAME_RULE, is_tensor_name, safe_relpath
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

#: A pushed deltahub delta (deltahub.hub.layout.HUB_MANIFEST_FILE): never a checkpoint to add.
DELTA_MANIFEST_FILE = "deltahub.json"
PULL_HINT = "a delta is stored with `deltahub pull REPO_ID[@REVISION]` (it needs its base), not added or compressed"

_MiB = 1 << 20
#: Largest carried file accepted, by name (others: :data:`DEFAULT_CARRIED_MAX_BYTES`). The largest
#: real tokenizer.json files are tens of MB (Gemma 3: 33 MB).
CARRIED_MAX_BYTES = {
    "tokenizer.json": 512 * _MiB,
    "vocab.json": 256 * _MiB,
    "vocab.txt": 256 * _MiB,
    "merges.txt": 256 * _MiB,
    "added_tokens.json": 256 * _MiB,
    "tokenizer.model": 256 * _MiB,
    "spiece.model": 256 * _MiB,
    "sentencepiece.bpe.model": 256 * _MiB,
}
DEFAULT_CARRIED_MAX_BYTES = 64 * _MiB
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")

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
    #: relative name -> sha256 of the bytes checked by :func:`carried_file_problem` at open time;
    #: the bytes stored later must be these (``deltahub.ops.files.store_files``).
    file_sha256: dict[str, str] = field(default_factory=dict)

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


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _is_protobuf_of_messages(data: bytes) -> bool:
    """``data`` is a protobuf message whose top-level fields are all length-delimited, as a
    sentencepiece ``ModelProto`` is (pieces, trainer/normalizer specs), ending exactly at EOF."""
    pos = fields = 0
    while pos < len(data):
        tag = _varint(data, pos)
        if tag is None or tag[0] >> 3 == 0 or tag[0] & 7 != 2:
            return False
        length = _varint(data, tag[1])
        if length is None or length[1] + length[0] > len(data):
            return False
        pos = length[1] + length[0]
        fields += 1
    return fields > 0


def _is_tiktoken_ranks(data: bytes) -> bool:
    """``data`` is a tiktoken BPE rank file (``<base64 token> <rank>`` per line), which some models
    ship as ``tokenizer.model``."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    return bool(lines) and all(_TIKTOKEN_LINE.fullmatch(line.rstrip(b"\r")) for line in lines)


def carried_file_problem(name: str, data: bytes) -> str | None:
    """What is wrong with ``data`` as the carried file ``name`` (``config.json`` or one of
    :data:`AUX_FILES`), or None: JSON files must be JSON objects (nested at most
    :data:`safe_json.MAX_DEPTH` levels), text files UTF-8, tokenizer models sentencepiece protobufs
    or tiktoken rank files; none may pass its size cap (:data:`CARRIED_MAX_BYTES`)."""
    limit = CARRIED_MAX_BYTES.get(name, DEFAULT_CARRIED_MAX_BYTES)
    if len(data) > limit:
        return f"is too large ({len(data):,} bytes; at most {limit:,} are accepted for {name})"
    if name.endswith(".json"):
        if not data.strip():
            return "is empty, not a JSON object"
        try:
            obj = safe_json.loads(data, name)
        except safe_json.JSONInputError as exc:
            return f"is not usable: {exc}"
        if not isinstance(obj, dict):
            return "is not a JSON object"
        return None
    if name.endswith(".model"):
        if not data:
            return "is empty"
        if not (_is_protobuf_of_messages(data) or _is_tiktoken_ranks(data)):
            return "is not a tokenizer model (neither a sentencepiece protobuf nor a tiktoken rank file)"
        return None
    try:  # .txt, .jinja
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    return None


def _link_scope(root_real: Path) -> Path | None:
    """Where links of a folder inside the Hugging Face hub cache may point: its own cache repo
    folder (``models--ORG--NAME``, whose ``snapshots/REV/`` files link to ``../../blobs/HASH``)."""
    try:
        cache = hf_hub_cache().resolve()
    except OSError:  # pragma: no cover
        return None
    if not root_real.is_relative_to(cache) or root_real == cache:
        return None
    top = root_real.relative_to(cache).parts[0]
    if not top.startswith(("models--", "datasets--", "spaces--")):
        return None
    return cache / top


def _resolved(root: Path, path: Path, label: str) -> Path:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # a dangling link, a link loop (RuntimeError on 3.11)
        raise InputError(
            f"{label} in {root} cannot be read: {getattr(exc, 'strerror', None) or exc}",
            "replace it with the real file (no dangling or looping symbolic links)",
        ) from None


def _refuse_outside(root: Path, root_real: Path, real: Path, label: str) -> None:
    if real.is_relative_to(root_real):
        return
    scope = _link_scope(root_real)
    if scope is not None and real.is_relative_to(scope):
        return
    raise InputError(
        f"{label} in {root} is a symbolic link to {real}, outside the checkpoint folder",
        "deltahub never follows links out of a checkpoint (it could store and push a private file); "
        "copy the real file into the folder instead of linking it",
    )


def _check_inside(root: Path, root_real: Path, path: Path, label: str) -> None:
    """Refuse ``path`` (a file deltahub will read from ``root``) when it resolves, through symbolic
    links, outside ``root`` (and, for an HF cache snapshot, outside its cache repo folder), or does
    not resolve at all (a dangling link or a link loop)."""
    _refuse_outside(root, root_real, _resolved(root, path, label), label)


def _read_carried(root: Path, root_real: Path, name: str, path: Path) -> bytes:
    """Read carried file ``name`` after checking it. The check is made on the file actually opened
    (``/proc/self/fd``), so a link swapped in between the check and the read cannot leak a file."""
    _check_inside(root, root_real, path, name)
    limit = CARRIED_MAX_BYTES.get(name, DEFAULT_CARRIED_MAX_BYTES)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{name} in {root} cannot be read: {exc.strerror}", "check its permissions") from None
    with os.fdopen(fd, "rb") as fh:
        opened = Path(f"/proc/self/fd/{fd}")
        if opened.is_symlink():  # Linux: where the open file really is
            _refuse_outside(root, root_real, Path(os.readlink(opened)), name)
        size = os.fstat(fd).st_size
        problem = f"is too large ({size:,} bytes; at most {limit:,} are accepted for {name})" if size > limit else None
        data = b"" if problem else fh.read()
    problem = problem or carried_file_problem(name, data)
    if problem:
        raise InputError(f"{name} in {root} {problem}", f"fix or remove {name} (re-save it with save_pretrained)")
    return data


def _weight_files(root: Path) -> list[Path]:
    # weight files that are dangling or looping links, or folders, are listed too: they then fail
    # with their own name and cause, not as "no safetensors weights"
    names = {p.name for p in root.iterdir() if p.is_file() or p.is_symlink() or p.name.endswith(".safetensors")}
    index_path = root / WEIGHTS_INDEX

    def load_index() -> Any:
        _check_inside(root, root.resolve(), index_path, WEIGHTS_INDEX)
        return safe_json.loads(index_path.read_bytes(), WEIGHTS_INDEX)

    return [root / name for name in select_weight_files(names, str(root), load_index)]


def open_checkpoint(src: Path) -> Checkpoint:
    """Open and validate a checkpoint directory; reads headers only, no tensor data.

    Every file it uses (config.json, the weights and their index, the carried files) must lie inside
    the folder once symbolic links are resolved; a folder inside the Hugging Face hub cache may link
    into its own cache repo (``blobs/``). Carried files are checked for their kind
    (:func:`carried_file_problem`). A pushed deltahub delta (``deltahub.json``) is refused.
    """
    root = Path(src)
    try:
        root.stat()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            shown = str(root) if len(str(root)) <= 80 else f"{str(root)[:60]}… ({len(str(root))} characters)"
            raise InputError(f"no such checkpoint directory: {shown} (the name is too long)", "check the path") from None
    if root.is_file():
        if root.suffix in PICKLE_SUFFIXES:
            raise PickleCheckpointError(f"{root} is a pickle checkpoint", CONVERT_HINT)
        raise InputError(
            f"{root} is a file, not a checkpoint directory",
            "pass the folder holding config.json and the safetensors weights",
        )
    if not root.is_dir():
        raise InputError(f"no such checkpoint directory: {root}", "check the path")
    root_real = root.resolve()
    if (root / DELTA_MANIFEST_FILE).exists():
        raise InputError(f"{root} holds {DELTA_MANIFEST_FILE}: it is a deltahub delta, not a checkpoint", PULL_HINT)
    config_path = root / CONFIG_FILE
    if config_path.is_symlink():
        _check_inside(root, root_real, config_path, CONFIG_FILE)  # a dangling or looping link: say so
    if not config_path.is_file():
        raise InputError(
            f"{root} has no {CONFIG_FILE}",
            "a Hugging Face checkpoint needs config.json; write it with model.config.save_pretrained(DIR)",
        )
    data = _read_carried(root, root_real, CONFIG_FILE, config_path)
    config = safe_json.loads(data, CONFIG_FILE)
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if not (model_type is None or isinstance(model_type, str)) or not (
        architectures is None or (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures))
    ):
        raise InputError(
            f"{config_path}: model_type must be a string and architectures a list of strings",
            "fix or re-save config.json",
        )

    checkpoint = Checkpoint(root=root, config=config, files={CONFIG_FILE: config_path})
    checkpoint.file_sha256[CONFIG_FILE] = hashlib.sha256(data).hexdigest()
    for name in AUX_FILES:
        path = root / name
        if path.is_symlink():
            _check_inside(root, root_real, path, name)
        if path.is_file():
            data = _read_carried(root, root_real, name, path)
            checkpoint.files[name] = path
            checkpoint.file_sha256[name] = hashlib.sha256(data).hexdigest()
    for path in _weight_files(root):
        _check_inside(root, root_real, path, path.name)
        reader = SafetensorsReader(path)
        for name, entry in reader.entries.items():
            if not is_tensor_name(name):
                raise InputError(f"invalid tensor name {name[:80]!r} in {path.name} of {root}", TENSOR_NAME_RULE)
            if name in checkpoint.tensors:
                raise InputError(f"tensor {name!r} appears in two weight files of {root}")
            checkpoint.tensors[name] = (reader, entry)
    if not checkpoint.tensors:
        raise InputError(f"the weights in {root} hold no tensors")
    logger.debug("opened %s: %d tensors, %d files", root, len(checkpoint.tensors), len(checkpoint.files))
    return checkpoint
