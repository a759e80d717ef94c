"""The ``deltahub`` quantization method of vLLM: base weight plus the delta as sign planes.

``config.json`` of a stub folder carries ``quantization_config`` = ``{"quant_method": "deltahub",
"version": 1, "planes": {tensor name: [P, C, G]}}`` (:mod:`deltahub.ops.vllm_stub`). For each
vLLM Linear layer whose every shard (``qkv_proj`` = q/k/v, ``gate_up_proj`` = gate/up, from the
model's ``packed_modules_mapping``) has a planes delta with one scale layout ``(C, G)``, the layer
gets :class:`DeltahubLinearMethod` with ``P`` = the most planes of its shards; any other Linear keeps
vLLM's unquantized method and the loader gives it the fine-tune's own (decoded) weight.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from deltahub import defaults
from deltahub.errors import InputError
from deltahub.ops.vllm_stub import QUANT_METHOD, QUANT_VERSION, planes_of

from . import ops as _ops  # noqa: F401  (registers torch.ops.deltahub.planes_delta)

__all__ = ["DeltahubConfig", "DeltahubLinearMethod", "Layout"]

logger = logging.getLogger(__name__)

WORD_BITS = 32
#: how a Linear applies its delta: ``on-the-fly`` (base GEMM + the planes op, every forward),
#: ``merged`` (``W + Δ`` built once after loading, in fp32 then rounded, exactly as ``materialize``;
#: the planes are then freed), ``auto`` (merged on a CPU, where the torch path of the op costs
#: several GEMMs; on the fly on a GPU, with the Triton kernel).
APPLY_MODES = defaults.VLLM_APPLY_MODES
MERGE_ROWS = 256  # rows of W + Δ built at a time (fp32 temporaries of MERGE_ROWS x K)
Layout = tuple[int, int, int | None]
"""``(P, C, G)``: planes, scale columns per row, columns per scale group (None when C = 1)."""


class DeltahubConfig(QuantizationConfig):
    """Which Linear weights carry a deltahub delta, and its planes layout."""

    def __init__(self, planes: dict[str, Layout], manifest: str | None = None, base_manifest: str | None = None,
                 adapter_planes: int = 1, adapter_group: int | None = None, apply: str = "auto") -> None:
        super().__init__()
        if apply not in APPLY_MODES:
            raise InputError(f"deltahub quantization_config: apply must be one of {', '.join(APPLY_MODES)}, got {apply!r}",
                             "write the folder again with `deltahub vllm-prepare`")
        self.planes = planes
        self.apply = apply
        self.manifest = manifest
        self.base_manifest = base_manifest
        self.adapter_planes = adapter_planes
        self.adapter_group = adapter_group

    def __repr__(self) -> str:
        return f"DeltahubConfig({len(self.planes)} delta tensors)"

    def get_name(self) -> str:  # type: ignore[override]
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DeltahubConfig:
        version = config.get("version")
        if version != QUANT_VERSION:
            raise InputError(f"deltahub quantization_config version {version!r} is not supported (this deltahub reads "
                             f"{QUANT_VERSION})", "upgrade deltahub, or write the folder again with `deltahub vllm-prepare`")
        planes = config.get("planes")
        if not isinstance(planes, dict):
            raise InputError("deltahub quantization_config has no 'planes' object",
                             "write the folder again with `deltahub vllm-prepare`")
        p, _c, g = planes_of([config.get("adapter_planes", 1), 2 if config.get("adapter_group") else 1,
                              config.get("adapter_group")], "quantization_config adapter slots")
        ids = [config.get(k) for k in ("manifest", "base_manifest")]
        if any(v is not None and not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)) for v in ids):
            raise InputError("deltahub quantization_config: 'manifest' and 'base_manifest' must be manifest ids",
                             "write the folder again with `deltahub vllm-prepare`")
        return cls({str(name): planes_of(v, f"quantization_config planes of {name!r}") for name, v in planes.items()},
                   ids[0], ids[1], p, g, config.get("apply", "auto"))

    def shards(self, prefix: str) -> list[str]:
        """The checkpoint module names behind vLLM module ``prefix`` (its shards when fused)."""
        parent, _, last = prefix.rpartition(".")
        names = self.packed_modules_mapping.get(last)
        if not names:
            return [prefix]
        return [f"{parent}.{n}" if parent else n for n in names]

    def layout_for(self, prefix: str) -> Layout | None:
        """The layer's ``(P, C, G)``, or None when one of its shards has no planes delta or their
        scale layouts differ (the loader then gives the layer its decoded weight)."""
        found = [self.planes.get(f"{s}.weight") for s in self.shards(prefix)]
        if any(f is None for f in found):
            return None
        scale_layouts = {(f[1], f[2]) for f in found if f is not None}
        if len(scale_layouts) != 1:
            logger.info("%s: its shards' deltas have different scale layouts; loading it decoded", prefix)
            return None
        (c, g), = scale_layouts
        return max(f[0] for f in found if f is not None), c, g

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            layout = self.layout_for(prefix)
            return UnquantizedLinearMethod() if layout is None else DeltahubLinearMethod(layout, self.apply)
        return None


class DeltahubLinearMethod(LinearMethodBase):
    """``y = x·Wᵀ + Σᵢ (x·Sᵢᵀ) ⊙ sᵢ (+ bias)``: vLLM's unquantized GEMM for the base, then
    ``torch.ops.deltahub.planes_delta`` for the delta.

    Parameters registered on the layer (``N`` = its output rows on this rank, ``K`` its input):
    ``weight`` (base, as vLLM's unquantized method), ``delta_signs`` int32 ``[P, N, ceil(K/32)]`` and
    ``delta_scales`` fp32 ``[P, N, C]``, both with ``output_dim=1`` so vLLM's own ``weight_loader``
    places each shard (q/k/v, gate/up) at its rows. Unused planes keep zero scales.
    """

    def __init__(self, layout: Layout, apply: str = "auto") -> None:
        self.layout = layout
        self.mode = apply
        self.base = UnquantizedLinearMethod()

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if input_size_per_partition != input_size:
            raise InputError("deltahub's vLLM plug-in does not split a delta's input columns across tensor-parallel "
                             "ranks yet", "serve with --tensor-parallel-size 1 (one engine per GPU; Ray Serve scales out)")
        weight_loader = extra_weight_attrs.get("weight_loader")
        self.base.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                 params_dtype, **extra_weight_attrs)
        p, c, g = self.layout
        n, k = sum(output_partition_sizes), input_size_per_partition
        if c != (1 if g is None else math.ceil(k / g)):
            raise InputError(f"a delta of {c} scale columns does not fit an input of {k} columns (group {g})",
                             "write the folder again with `deltahub vllm-prepare`")
        signs = nn.Parameter(torch.zeros(p, n, math.ceil(k / WORD_BITS), dtype=torch.int32), requires_grad=False)
        scales = nn.Parameter(torch.zeros(p, n, c, dtype=torch.float32), requires_grad=False)
        for name, param in (("delta_signs", signs), ("delta_scales", scales)):
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"output_dim": 1, "weight_loader": weight_loader})
        layer.delta_k = k
        layer.delta_group = g or 0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        merge = self.mode == "merged" or (self.mode == "auto" and layer.weight.device.type == "cpu")
        layer.delta_merged = merge  # (fixed from here on: apply's one branch never changes)
        if merge:
            _merge(layer)
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.base.apply(layer, x, bias)
        if layer.delta_merged:
            return y
        x2d = x.reshape(-1, layer.delta_k)
        delta = torch.ops.deltahub.planes_delta(x2d, layer.delta_signs, layer.delta_scales, layer.delta_k,
                                                layer.delta_group)
        return y + delta.to(y.dtype).reshape(y.shape)


def _merge(layer: nn.Module) -> None:
    """``W ← (W.float() + Σᵢ sᵢ ⊙ Sᵢ).to(W.dtype)`` in place, ``MERGE_ROWS`` rows at a time, then the
    planes are freed. ``W`` ``[N, K]``; ``delta_signs`` int32 ``[P, N, ceil(K/32)]``; ``delta_scales``
    fp32 ``[P, N, C]``."""
    from deltahub.codec.planes_apply import expand_scales
    from deltahub.codec.signs import unpack_rows

    w = layer.weight.data
    p, n, _ = layer.delta_signs.shape
    k, group = layer.delta_k, layer.delta_group or None
    with torch.no_grad():
        for r0 in range(0, n, MERGE_ROWS):
            r1 = min(n, r0 + MERGE_ROWS)
            acc = w[r0:r1].to(torch.float32)
            for i in range(p):
                scales = layer.delta_scales[i, r0:r1]
                if not bool(scales.any()):
                    continue
                acc += unpack_rows(layer.delta_signs[i, r0:r1], k, torch.float32) * expand_scales(scales, k, group)
            w[r0:r1] = acc.to(w.dtype)
    for name in ("delta_signs", "delta_scales"):  # nothing left to apply: give the memory back
        setattr(layer, name, nn.Parameter(torch.empty(0, dtype=getattr(layer, name).dtype), requires_grad=False))
