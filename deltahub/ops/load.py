"""Loading a stored model into transformers without writing a checkpoint."""

from __future__ import annotations

import enum
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deltahub import defaults
from deltahub.errors import DeltaHubError, InputError
from deltahub.fileio import disk_full_as, write_file
from deltahub.formats.checkpoint import AUX_FILES
from deltahub.formats.paths import join_inside
from deltahub.ops.context import StoreContext
from deltahub.ops.materialize import parse_output_dtype
from deltahub.ops.reconstruct import ModelSource
from deltahub.progress import progress_bar
from deltahub.runtime import DeltaEmbedding, DeltaLinear, choose_backend
from deltahub.codec import DeltaOperator
from deltahub.runtime.patch import install_deltas

logger = logging.getLogger(__name__)

#: The carried files a tokenizer is loaded from (everything but the generation/processor configs).
TOKENIZER_FILES = tuple(f for f in AUX_FILES if f not in ("generation_config.json", "preprocessor_config.json"))


def model_class(architectures: list[str]) -> Any:
    """The transformers class named by ``config.architectures`` (never remote code)."""
    import transformers

    for arch in architectures:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForCausalLM


class LoadMode(str, enum.Enum):
    """How :func:`load_model` builds a stored fine-tune."""

    MATERIALIZE = "materialize"
    """Every tensor rebuilt in full (``W_base + scale·S``): an ordinary transformers model."""

    DELTA = "delta"
    """The base's tensors plus the packed deltas, applied at inference (``DeltaLinear``)."""


def parse_mode(mode: str | LoadMode) -> LoadMode:
    try:
        return LoadMode(mode)
    except ValueError:
        raise InputError(
            f"unknown load mode {mode!r}", f"use one of {', '.join(m.value for m in LoadMode)}"
        ) from None


def load_model(
    ctx: StoreContext,
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = defaults.DEFAULT_DEVICE,
    verify: bool = True,
    mode: str | LoadMode = LoadMode.MATERIALIZE,
    trainable_scales: bool = False,
    bits: int | None = None,
    max_size: int | None = None,
) -> Any:
    """Build the transformers model for ``name`` straight from the store (``bits``: from the first
    ``bits`` planes of each progressive tensor only; ``max_size``: from the best prefix of the stored
    plane order whose tensor data fits that many bytes).

    ``mode="materialize"``: tensors are rebuilt one at a time into the state dict handed to
    ``from_pretrained``; no checkpoint is written.

    ``mode="delta"``: the model is built with the *base's* tensors; every ``Linear`` (and GPT-2
    ``Conv1D``) weight stored as ``sign1`` becomes a :class:`~deltahub.runtime.DeltaLinear` and every
    ``sign1`` embedding a :class:`~deltahub.runtime.DeltaEmbedding` (tied LM heads share the
    embedding's base weight, signs and scale); dense tensors of the delta are installed as they are.
    The model then holds about the base plus the packed bits: no fp16 delta is built. A ``sign1``
    tensor of any other kind of module is materialized (that tensor only). ``trainable_scales`` gives
    the delta modules' scales ``requires_grad=True`` (for calibration); every other parameter of a
delta-mode model is frozen. A base model loads normally.

    ``dtype`` defaults to the model's stored dtype.
    """
    mode = parse_mode(mode)
    out_dtype = parse_output_dtype(dtype)
    with ctx.reading():  # gc waits until every object is read
        source = ModelSource.open(ctx, name, verify=verify, bits=bits, max_size=max_size)
        out_dtype = out_dtype or source.default_dtype()
        if mode is LoadMode.DELTA and source.base is not None:
            model = _load_delta_mode(source, name, out_dtype, trainable_scales)
            choose_backend(torch.device(device))
        else:
            model = materialized_model(source, name, out_dtype)
    return model.to(device)


def materialized_model(source: ModelSource, name: str, out_dtype: torch.dtype) -> Any:
    """``source``'s transformers model with every tensor rebuilt in full, one at a time, into the
    state dict handed to :func:`build_model` (no checkpoint is written; eval mode, on the CPU)."""
    specs = source.specs(out_dtype)
    state_dict: dict[str, torch.Tensor] = {}
    with progress_bar(len(specs), f"load {name}", unit="tensor") as bar:
        for spec, tensor in zip(specs, source.iter_tensors(specs)):
            state_dict[spec.name] = tensor
            bar.update(1)
    return build_model(source, name, out_dtype, state_dict)


def build_model(source: ModelSource, name: str, out_dtype: torch.dtype, state_dict: dict[str, torch.Tensor]) -> Any:
    """The transformers model of ``source``'s config with ``state_dict`` (in eval mode, on the CPU)."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="deltahub-config-") as tmp:
        with disk_full_as(Path(tmp).parent, f"loading {name}", hint=TMP_HINT):
            write_file(Path(tmp) / "config.json", json.dumps(source.config(out_dtype)).encode())
        config = AutoConfig.from_pretrained(tmp)
    cls = model_class(source.manifest.architectures)
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=out_dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DeltaHubError(
            f"{cls.__name__} expects {len(missing)} tensor(s) that {name!r} does not have: "
            f"{', '.join(missing[:3])}",
            "materialize the model and load it with the matching transformers class",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("loading %s: %d unused tensor(s): %s", name, len(unexpected), ", ".join(unexpected[:3]))
    model.eval()
    return model


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``dtype`` (inputs may be read-only views of memory-mapped objects)."""
    return t.to(dtype) if t.dtype != dtype else t.clone()


def _load_delta_mode(source: ModelSource, name: str, out_dtype: torch.dtype, trainable_scales: bool) -> Any:
    """A delta loaded in delta mode (see :func:`load_model`)."""
    manifest = source.manifest
    specs = source.specs(out_dtype)
    state_dict: dict[str, torch.Tensor] = {}
    deltas: dict[str, DeltaOperator] = {}
    with progress_bar(len(specs), f"load {name} (delta mode)", unit="tensor") as bar:
        for spec, inputs in zip(specs, source.iter_inputs(specs)):
            rec = manifest.tensors[spec.name]
            op = None
            if inputs.base is not None and inputs.parts:  # a codec with a delta to apply
                op = rec.impl.operator({p: t.clone() for p, t in inputs.parts.items()}, rec.params, rec.shape)
            if op is not None:
                deltas[spec.name] = op
                state_dict[spec.name] = _owned(inputs.base, spec.dtype)
            else:  # dense: the fine-tune's tensor; same: the base's
                state_dict[spec.name] = source.fill_new(spec.name, inputs, spec.dtype)
            bar.update(1)
    model = build_model(source, name, out_dtype, state_dict)
    del state_dict
    leftover = install_deltas(model, deltas, trainable_scales=trainable_scales)
    params = dict(model.named_parameters(remove_duplicate=False))
    for tname in leftover:
        target = params.get(tname)
        if target is None:
            raise DeltaHubError(
                f"cannot find tensor {tname!r} of {name!r} in the {type(model).__name__} model",
                "load it with mode='materialize'",
            )
        logger.info("delta mode: %s is not a Linear/Embedding weight; materializing that tensor", tname)
        with torch.no_grad():
            target.copy_(source.tensor(tname, target.dtype))
    trainable = {id(p) for m in model.modules() if isinstance(m, DeltaLinear | DeltaEmbedding) for p in m.delta.trainable().values()}
    for p in model.parameters():
        p.requires_grad_(trainable_scales and id(p) in trainable)
    n_modules = sum(isinstance(m, DeltaLinear | DeltaEmbedding) for m in model.modules())
    logger.info("loaded %s in delta mode: %d delta module(s), %d tensor(s) materialized", name, n_modules, len(leftover))
    return model


def load_tokenizer(ctx: StoreContext, name: str) -> Any:
    """The tokenizer stored with ``name`` (files written to a temporary folder, then loaded)."""
    with ctx.reading():
        return tokenizer_of(ModelSource.open(ctx, name), name)


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest sequence a model's ``config.json`` says it takes, or ``None`` if it names none."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def tokenizer_of(source: ModelSource, name: str) -> Any:
    """The tokenizer stored in ``source``'s manifest."""
    from transformers import AutoTokenizer

    present = [f for f in TOKENIZER_FILES if f in source.manifest.files]
    if not present:
        raise InputError(f"{name!r} was stored without tokenizer files", "add a checkpoint that has them")
    with tempfile.TemporaryDirectory(prefix="deltahub-tok-") as tmp:
        root = Path(tmp)
        with disk_full_as(Path(tmp).parent, f"loading the tokenizer of {name}", hint=TMP_HINT):
            for rel in present + ["config.json"]:
                write_file(join_inside(root, rel), source.file_bytes(rel))
        return AutoTokenizer.from_pretrained(tmp)


TMP_HINT = "free some space in the temporary folder or point TMPDIR elsewhere"
