"""The ``deltahub`` load format of vLLM: weights streamed from the store, never a checkpoint on disk.

vLLM is pointed at a stub folder (:mod:`deltahub.ops.vllm_stub`); its ``deltahub.json`` names the
store and the exact manifest. :class:`DeltahubModelLoader` reads the model's tensors one at a time
(hash-verified, the next one read ahead) and hands them to the model's own ``load_weights``, which
routes each through vLLM's ``weight_loader`` (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``):

* a Linear weight whose layer has :class:`~.quant.DeltahubLinearMethod`: the **base** weight, then
  ``<module>.delta_signs`` int32 ``[P, n, ceil(K/32)]`` and ``<module>.delta_scales`` fp32
  ``[P, n, C]`` (the codec's planes padded to the layer's P, scales given per row);
* every other tensor: the fine-tune's own tensor, decoded exactly as ``materialize`` writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from deltahub.errors import DeltaHubError, InputError
from deltahub.ops.reconstruct import ModelSource
from deltahub.ops.vllm_stub import POINTER_FILE, open_stub, read_stub

from .version import check_vllm_version
from .quant import DeltahubLinearMethod

__all__ = ["DeltahubModelLoader", "delta_modules", "stream_weights"]

logger = logging.getLogger(__name__)


def delta_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vLLM module name → module, for the layers that hold a deltahub delta."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), DeltahubLinearMethod)}


def _owner(tensor_name: str, modules: dict[str, nn.Module], fused: dict[str, str]) -> nn.Module | None:
    """The delta layer that checkpoint weight ``tensor_name`` (``...q_proj.weight``) loads into."""
    if not tensor_name.endswith(".weight"):
        return None
    prefix = tensor_name[: -len(".weight")]
    if prefix in modules:
        return modules[prefix]
    parent, _, last = prefix.rpartition(".")
    if last in fused:
        return modules.get(f"{parent}.{fused[last]}" if parent else fused[last])
    return None


def _planes_for(layer: nn.Module, op: Any, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The operator's planes as the layer's ``delta_signs``/``delta_scales`` rows of one shard
    (``[P, n, W]`` int32, ``[P, n, C]`` fp32), or None when its layout does not fit the layer."""
    planes = op.bit_planes() if op is not None else None
    if planes is None:
        return None
    p_layer, _, c_layer = layer.delta_scales.shape
    layout = planes.layout
    if layout.planes > p_layer or layout.columns != c_layer or (layout.group or 0) != layer.delta_group:
        return None
    signs = torch.zeros((p_layer, n, layer.delta_signs.shape[2]), dtype=torch.int32)
    scales = torch.zeros((p_layer, n, c_layer), dtype=torch.float32)
    for i, (packed, s) in enumerate(zip(planes.packed, planes.scales, strict=True)):
        signs[i].copy_(packed)
        scales[i].copy_(s.to(torch.float32).expand(n, c_layer))
    return signs, scales


def stream_weights(model: nn.Module, source: ModelSource, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` pairs for ``model.load_weights``, one tensor in memory at a time
    (see the module docstring)."""
    modules = delta_modules(model)
    fused = {shard: name for name, shards in getattr(model, "packed_modules_mapping", {}).items() for shard in shards}
    manifest = source.manifest
    specs = source.specs(dtype)
    n_delta = 0
    for spec, inputs in zip(specs, source.iter_inputs(specs)):
        rec = manifest.tensors[spec.name]
        layer = _owner(spec.name, modules, fused) if inputs.base is not None and inputs.parts else None
        if layer is not None:
            op = rec.impl.operator(inputs.parts, rec.params, tuple(rec.shape))
            rows = _planes_for(layer, op, int(rec.shape[0]))
            if rows is not None:
                module = spec.name[: -len(".weight")]
                yield spec.name, inputs.base.to(spec.dtype)
                yield f"{module}.delta_signs", rows[0]
                yield f"{module}.delta_scales", rows[1]
                n_delta += 1
                continue
        yield spec.name, source.fill_new(spec.name, inputs, spec.dtype)
    logger.info("deltahub: %d Linear weight(s) loaded as base + sign planes, %d decoded", n_delta,
                len(specs) - n_delta)


class DeltahubModelLoader(BaseModelLoader):
    """``--load-format deltahub``: see the module docstring."""

    def download_model(self, model_config: ModelConfig) -> None:
        read_stub(model_config.model)  # nothing to download: fail early on a folder that is no stub

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        check_vllm_version()
        stub = read_stub(model_config.model)
        quant = getattr(model_config.hf_config, "quantization_config", None)
        prepared = quant.get("manifest") if isinstance(quant, dict) else None
        if prepared is not None and prepared != stub.manifest:  # the planes plan is of another model
            raise InputError(f"{model_config.model}: config.json was written for manifest {prepared[:12]} but "
                             f"{POINTER_FILE} names {stub.manifest[:12]}",
                             f"write the folder again with `deltahub vllm-prepare {stub.name} DIR --force`")
        ctx, source = open_stub(stub)
        try:
            with ctx.reading():
                loaded = model.load_weights(stream_weights(model, source, model_config.dtype))
        finally:
            ctx.close()
        expected = {name for name, _ in model.named_parameters()}
        missing = sorted(expected - set(loaded or ())) if loaded is not None else []
        if missing:
            raise DeltaHubError(
                f"{len(missing)} parameter(s) of the vLLM model got no weight from {stub.name!r}, e.g. {missing[0]!r}",
                "check that the stored model's architecture is one vLLM supports; report this with the names")
        logger.info("deltahub: loaded %s (manifest %s) from %s", stub.name, stub.manifest[:12], stub.home)
