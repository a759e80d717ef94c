"""Loading a stored model into transformers without writing a checkpoint."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import DeltaHubError, InputError
from deltahub.formats.checkpoint import AUX_FILES
from deltahub.formats.paths import join_inside
from deltahub.ops.context import StoreContext
from deltahub.ops.materialize import parse_output_dtype
from deltahub.ops.reconstruct import ModelSource
from deltahub.progress import progress_bar

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


def load_model(
    ctx: StoreContext,
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> Any:
    """Build the transformers model for ``name`` straight from the store.

    Tensors are rebuilt one at a time into the state dict handed to ``from_pretrained``; no
    checkpoint is written. ``dtype`` defaults to the model's stored dtype.
    """
    from transformers import AutoConfig

    out_dtype = parse_output_dtype(dtype)
    source = ModelSource.open(ctx, name, verify=verify)
    out_dtype = out_dtype or source.default_dtype()
    with tempfile.TemporaryDirectory(prefix="deltahub-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(source.config(out_dtype)))
        config = AutoConfig.from_pretrained(tmp)
    state_dict: dict[str, torch.Tensor] = {}
    specs = source.specs(out_dtype)
    with progress_bar(len(specs), f"load {name}", unit="tensor") as bar:
        for spec, tensor in zip(specs, source.iter_tensors(specs)):
            state_dict[spec.name] = tensor
            bar.update(1)
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
    return model.to(device)


def load_tokenizer(ctx: StoreContext, name: str) -> Any:
    """The tokenizer stored with ``name`` (files written to a temporary folder, then loaded)."""
    from transformers import AutoTokenizer

    source = ModelSource.open(ctx, name)
    present = [f for f in TOKENIZER_FILES if f in source.manifest.files]
    if not present:
        raise InputError(f"{name!r} was stored without tokenizer files", "add a checkpoint that has them")
    with tempfile.TemporaryDirectory(prefix="deltahub-tok-") as tmp:
        root = Path(tmp)
        for rel in present + ["config.json"]:
            join_inside(root, rel).write_bytes(source.file_bytes(rel))
        return AutoTokenizer.from_pretrained(tmp)
