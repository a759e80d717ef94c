"""The folder vLLM is pointed at to serve a stored model: config, tokenizer and a pointer, no weights.

``deltahub vllm-prepare NAME DIR`` writes (format ``deltahub-vllm-stub`` version 1)::

    DIR/config.json        the model's config, dtype written in, plus ``quantization_config``:
                           {"quant_method": "deltahub", "version": 1,
                            "planes": {tensor name: [P, C, G or null], ...},
                            "manifest": <manifest id>, "base_manifest": <its base's, or null>,
                            "home": <the store>, "apply": "auto" | "merged" | "on-the-fly",
                            "adapter_planes": P, "adapter_group": G or null}
    DIR/deltahub.json      {"format": "deltahub-vllm-stub", "version": 1, "home": ..., "name": ...,
                            "manifest": <manifest id>, "bits": null, "max_size": null}
    DIR/<tokenizer files>  as stored (tokenizer.json, tokenizer_config.json, ...)

``vllm serve DIR --load-format deltahub`` then builds the model from ``config.json`` and deltahub's
plug-in (:mod:`deltahub.integrations.vllm`) streams its weights from the store named in the pointer:
base weights, and each Linear delta kept as sign planes (``planes``: the layout of each such tensor,
:class:`~deltahub.codec.base.PlanesLayout`, which the plug-in needs before any weight is read). The
pointer names the exact manifest: re-pointing ``NAME`` later does not change what ``DIR`` serves.

A base's folder can also serve many fine-tunes of it as vLLM LoRA adapters, each a stub folder of
its own (:mod:`deltahub.integrations.vllm.lora`): ``adapter_planes`` / ``adapter_group`` size the
engine's adapter slots (the most sign planes, and the scale group, an adapter may bring).

Reading a stub (:func:`read_stub`) treats it as input: size, JSON depth, types and the store folder
are checked; a stub never makes deltahub read outside the store it names.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltahub import defaults
from deltahub.errors import InputError, NameNotFoundError, StoreError
from deltahub.fileio import OUTPUT_HINT, disk_full_as, write_file
from deltahub.formats import safe_json
from deltahub.formats.manifest import ModelKind
from deltahub.formats.paths import join_inside
from deltahub.formats.safetensors_io import dtype_name
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.load import TOKENIZER_FILES
from deltahub.ops.materialize import check_output_dir, parse_output_dtype, publish_dir
from deltahub.ops.reconstruct import ModelSource

__all__ = ["STUB_FORMAT", "STUB_VERSION", "POINTER_FILE", "QUANT_METHOD", "Stub", "PrepareResult",
           "prepare", "read_stub", "open_stub", "planes_plan", "adapter_problems", "source_of", "folder_name"]

logger = logging.getLogger(__name__)

STUB_FORMAT = "deltahub-vllm-stub"
STUB_VERSION = 1
POINTER_FILE = "deltahub.json"
QUANT_METHOD = "deltahub"
QUANT_VERSION = 1
MAX_POINTER_BYTES = 64 << 10


@dataclass(frozen=True)
class Stub:
    """A parsed ``deltahub.json``: which store, which model, which planes."""

    home: Path
    name: str
    manifest: str
    bits: int | None = None
    max_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": STUB_FORMAT, "version": STUB_VERSION, "home": str(self.home), "name": self.name,
                "manifest": self.manifest, "bits": self.bits, "max_size": self.max_size}


@dataclass(frozen=True)
class PrepareResult:
    name: str
    out_dir: Path
    manifest: str
    dtype: str
    delta_tensors: int
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dir": str(self.out_dir), "manifest": self.manifest, "dtype": self.dtype,
                "delta_tensors": self.delta_tensors, "files": self.files}


def _linear_weights(config: dict[str, Any], architectures: list[str]) -> set[str] | None:
    """The ``[out, in]`` Linear weights of the model ``config`` describes (built on the meta device:
    no memory), or None when transformers cannot build it. Neither GPT-2's ``Conv1D`` weights
    (``[in, out]``: engines transpose those, and a delta's planes would not follow) nor the LM head
    (engines hold it as a vocabulary table) are among them."""
    try:
        from transformers import AutoConfig

        from deltahub.ops.load import model_class
        from deltahub.runtime.patch import is_conv1d

        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = model_class(architectures)(cfg)
    except Exception as exc:  # noqa: BLE001 (an architecture transformers cannot build here)
        logger.warning("cannot build the model to find its Linear layers (%s); every tensor is served decoded", exc)
        return None
    head = model.get_output_embeddings()  # the LM head: a vocabulary table to engines, not a Linear
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not is_conv1d(m) and m is not head}


def planes_plan(source: ModelSource) -> dict[str, list[Any]]:
    """Tensor name → ``[P, C, G]`` for every Linear weight (``[out, in]``) whose delta is sign planes
    (sorted by name). Any other changed tensor is served decoded (or refused as an adapter)."""
    plan: dict[str, list[Any]] = {}
    if source.manifest.kind is not ModelKind.DELTA:
        return plan
    linear = _linear_weights(source.config(None), source.manifest.architectures)
    if linear is None:
        return plan
    for tname, rec in sorted(source.manifest.tensors.items()):
        if len(rec.shape) != 2 or not rec.parts or tname not in linear:
            continue
        layout = rec.impl.planes_layout(tuple(rec.shape), rec.params)
        if layout is not None:
            plan[tname] = [layout.planes, layout.columns, layout.group]
    return plan


#: files that shape what a model answers besides its weights: an adapter is served with the base's
ANSWER_FILES = (*TOKENIZER_FILES, "generation_config.json")


def adapter_problems(source: ModelSource, plan: dict[str, list[Any]]) -> list[str]:
    """Why fine-tune ``source`` cannot be an adapter of its base in an engine that serves the base
    (empty: it can). An adapter carries the Linear deltas of ``plan`` only; every other changed
    tensor (embeddings, LM head, norms, biases, GPT-2 ``Conv1D``) and any tokenizer, chat template or
    generation config of its own would be silently dropped, so each is a problem."""
    m = source.manifest
    if m.kind is not ModelKind.DELTA or source.base is None:
        return ["it is not a fine-tune (a delta) of a stored base"]
    tensors = [n for n, rec in sorted(m.tensors.items()) if rec.parts and n not in plan]
    files = [f for f in ANSWER_FILES if m.files.get(f) != source.base.files.get(f)]
    out = []
    if tensors:
        out.append(f"it changes {len(tensors)} tensor(s) a LoRA slot cannot carry (embeddings, LM head, norms, "
                   f"biases, Conv1D), e.g. {', '.join(tensors[:3])}")
    if files:
        out.append(f"its {', '.join(files)} differ(s) from the base's (an adapter is served with the base's)")
    return out


def prepare(ctx: StoreContext, name: str, out_dir: Path, dtype: str | torch.dtype | None = None,
            force: bool = False, bits: int | None = None, max_size: int | None = None,
            adapter_planes: int = 1, adapter_group: int | None = None, resolved: Resolved | None = None,
            apply: str = defaults.VLLM_APPLY) -> PrepareResult:
    """Write the vLLM stub folder of stored model ``name`` into ``out_dir`` (see the module docstring).
    ``resolved``: that exact version of it (already looked up), not whatever ``name`` points at now.
    ``apply``: how vLLM applies the deltas (``auto``: merged into the weights once on a CPU, on the
    fly with the kernels on a GPU; ``merged``; ``on-the-fly``).

    Raises:
        NameNotFoundError: no such name. OutputExistsError: ``out_dir`` is not an empty folder (and
        not ``force``) or lies in the store.
    """
    if apply not in defaults.VLLM_APPLY_MODES:
        raise InputError(f"apply must be one of {', '.join(defaults.VLLM_APPLY_MODES)}, got {apply!r}", "use auto")
    if isinstance(adapter_planes, bool) or not isinstance(adapter_planes, int) or not 1 <= adapter_planes <= 8:
        raise InputError(f"--adapter-planes must be 1 to 8, got {adapter_planes!r}", "e.g. --adapter-planes 2")
    if adapter_group is not None and (isinstance(adapter_group, bool) or not isinstance(adapter_group, int)
                                      or adapter_group < 32 or adapter_group % 32):
        raise InputError(f"--adapter-group must be a positive multiple of 32, got {adapter_group!r}",
                         "e.g. --adapter-group 128, or leave it out (one scale per row)")
    out_dtype = parse_output_dtype(dtype)
    out_dir = check_output_dir(ctx, out_dir, force)
    with ctx.reading():
        if resolved is None:
            resolved = ctx.resolve(name)
        source = source_of(ctx, resolved, bits, max_size)
        plan = planes_plan(source)
        config = source.config(out_dtype)
        planes_of([adapter_planes, 1 if adapter_group is None else 2, adapter_group], "the adapter slots")
        base_manifest = source.manifest.base.manifest if source.manifest.base is not None else None
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD, "version": QUANT_VERSION, "planes": plan, "manifest": resolved.manifest_id,
            "home": str(ctx.home.resolve()), "apply": apply,
            "base_manifest": base_manifest, "adapter_planes": adapter_planes, "adapter_group": adapter_group}
        stub = Stub(ctx.home.resolve(), name, resolved.manifest_id, bits, max_size)

        def fill(tmp: Path) -> list[str]:
            files = []
            for rel in sorted(source.manifest.files):
                target = join_inside(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode() if rel == "config.json" \
                    else source.file_bytes(rel)
                write_file(target, data)
                files.append(rel)
            write_file(tmp / POINTER_FILE, (json.dumps(stub.to_json(), indent=2) + "\n").encode())
            return [*files, POINTER_FILE]

        with disk_full_as(out_dir.parent, f"preparing {name} for vLLM", hint=OUTPUT_HINT):
            files = publish_dir(out_dir, force, fill)
    shown = dtype_name(out_dtype) if out_dtype is not None else source.manifest.dtype
    logger.info("prepared %s for vLLM in %s (%d delta tensor(s) as sign planes)", name, out_dir, len(plan))
    return PrepareResult(name, out_dir, resolved.manifest_id, shown, len(plan), sorted(files))


def folder_name(name: str, manifest_id: str | None = None) -> str:
    """A folder name for stored model ``name`` (a Hub repo id may hold ``/``); with ``manifest_id``,
    the version too: adapters are named after their manifest because vLLM keys adapters and its
    prefix cache by name and path."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return safe if manifest_id is None else f"{safe}-{manifest_id}"


def source_of(ctx: StoreContext, resolved: Resolved, bits: int | None = None, max_size: int | None = None) -> ModelSource:
    """The exact manifest of ``resolved`` (its plane prefix when ``bits``/``max_size``) with its base."""
    manifest = resolved.manifest
    base = ctx.base_of(manifest)[1] if manifest.kind is ModelKind.DELTA else None
    if bits is not None or max_size is not None:
        resolved = Resolved(resolved.name, resolved.manifest_id, manifest.select(bits, max_size, resolved.name))
    return ModelSource(ctx, resolved, base)


def _bad(folder: Path, what: str) -> InputError:
    return InputError(f"{folder / POINTER_FILE}: {what}", f"write the folder again with `deltahub vllm-prepare NAME {folder}`")


def read_stub(folder: str | Path) -> Stub:
    """The pointer of stub folder ``folder``, checked (never follows a symlinked pointer).

    Raises:
        InputError: missing, oversized, not JSON, another format or version, or wrong field types.
    """
    folder = Path(folder)
    path = folder / POINTER_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise InputError(f"{folder} has no {POINTER_FILE}: it is not a deltahub stub folder",
                         "write one with `deltahub vllm-prepare NAME DIR` and point vLLM at DIR") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _bad(folder, "is a symbolic link (deltahub does not follow it)") from None
        raise _bad(folder, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # (a folder, a FIFO or a device would fail, block or never end)
        os.close(fd)
        raise _bad(folder, "is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_POINTER_BYTES + 1)
    if len(raw) > MAX_POINTER_BYTES:
        raise _bad(folder, f"is larger than {MAX_POINTER_BYTES} bytes")
    try:
        data = safe_json.loads(raw, POINTER_FILE, max_depth=4, allow_nan=False, unique_keys=True)
    except safe_json.JSONInputError as exc:
        raise _bad(folder, str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != STUB_FORMAT:
        raise _bad(folder, f"is not a {STUB_FORMAT} pointer")
    version = data.get("version")
    if version != STUB_VERSION:
        raise InputError(f"{path}: stub version {version!r} is not supported (this deltahub reads {STUB_VERSION})",
                         "upgrade deltahub, or write the folder again with `deltahub vllm-prepare`")
    home, name, manifest = data.get("home"), data.get("name"), data.get("manifest")
    if not all(isinstance(v, str) and v for v in (home, name, manifest)) or not os.path.isabs(home):  # type: ignore[arg-type]
        raise _bad(folder, "needs 'home' (an absolute path), 'name' and 'manifest' strings")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest) or len(name) > 256:  # type: ignore[arg-type]
        raise _bad(folder, "'manifest' must be a manifest id (64 hex digits) and 'name' a stored name")
    for key in ("bits", "max_size"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _bad(folder, f"{key!r} must be a positive integer or null")
    return Stub(Path(home), name, manifest, data.get("bits"), data.get("max_size"))  # type: ignore[arg-type]


def open_stub(stub: Stub) -> tuple[StoreContext, ModelSource]:
    """The store context and a :class:`ModelSource` of the exact manifest ``stub`` names (the caller
    holds ``ctx.reading()`` while reading tensors and closes ``ctx``).

    Raises:
        StoreError: the store folder is missing. NameNotFoundError: the manifest is gone (collected
        after its name was removed or re-pointed).
    """
    if not (stub.home / "index.sqlite").is_file():
        raise StoreError(f"{stub.home} is not a deltahub store (named by the stub of {stub.name!r})",
                         "prepare the folder again from the store that holds the model")
    ctx = StoreContext(stub.home)
    try:
        if not ctx.objects.exists(stub.manifest):
            raise NameNotFoundError(
                f"the stored model {stub.name!r} this folder was prepared from (manifest {stub.manifest[:12]}) is "
                f"no longer in {stub.home}", f"run `deltahub vllm-prepare {stub.name} DIR --force` again")
        manifest = ctx.load_manifest(stub.manifest)
        current = ctx.index.get_name(stub.name)
        if current is None or current.manifest_id != stub.manifest:
            logger.warning("%r now names another model; this folder still serves the one it was prepared from",
                           stub.name)
        return ctx, source_of(ctx, Resolved(stub.name, stub.manifest, manifest), stub.bits, stub.max_size)
    except BaseException:
        ctx.close()
        raise


def planes_of(value: Any, what: str) -> tuple[int, int, int | None]:
    """``[P, C, G]`` of the quantization config checked: P in 1..8, C >= 1, G a multiple of 32 or null."""
    ok = isinstance(value, list) and len(value) == 3 and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value)
    if ok:
        p, c, g = value
        ok = isinstance(p, int) and 1 <= p <= 8 and isinstance(c, int) and 1 <= c <= 1 << 20 and (
            (c == 1 and g is None) or (isinstance(g, int) and g >= 32 and g % 32 == 0 and c > 1))
    if not ok:
        raise InputError(f"{what}: planes must be [P (1..8), C, G (a multiple of 32, or null)], got {value!r}",
                         "write the folder again with `deltahub vllm-prepare`")
    return value[0], value[1], value[2]


def expected_columns(k: int, group: int | None) -> int:
    return 1 if group is None else math.ceil(k / group)
