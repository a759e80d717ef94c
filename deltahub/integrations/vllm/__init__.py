"""deltahub's vLLM plug-in: stored fine-tunes served by vLLM from base + delta, no fp16 checkpoint.

Registered through the ``vllm.general_plugins`` entry point (``pyproject.toml``), which vLLM runs in
every one of its processes, so :func:`register` is idempotent. It registers, with vLLM's public APIs:

* the quantization method ``deltahub`` (:mod:`.quant`): a Linear layer keeps the base weight and the
  fine-tune's delta as sign planes (``delta_signs`` int32 ``[P, N, ceil(K/32)]``, ``delta_scales`` fp32
  ``[P, N, C]``) and computes ``x·Wᵀ + Σᵢ (x·Sᵢᵀ) ⊙ sᵢ``: on a GPU through deltahub's Triton kernel,
  on a CPU through the torch path, both behind the custom op ``torch.ops.deltahub.planes_delta``
  (:mod:`.ops`), so CUDA graphs and ``torch.compile`` see one opaque op;
* many fine-tunes per engine as LoRA adapters (:mod:`.lora`: the one module that patches vLLM
  internals, on the supported releases only) and a ``LoRAResolver`` that loads a stored fine-tune by
  name;
* the load format ``deltahub`` (:mod:`.loader`): reads the stub folder written by
  ``deltahub vllm-prepare`` (:mod:`deltahub.ops.vllm_stub`) and streams the weights, tensor by
  tensor, from the store into vLLM's own ``weight_loader`` s (fused q/k/v and gate/up included).

Usage::

    deltahub vllm-prepare my-ft ./my-ft-vllm
    python -m vllm.entrypoints.openai.api_server --model ./my-ft-vllm --load-format deltahub
    # or: deltahub serve my-ft --engine vllm

Supported vLLM releases: :data:`SUPPORTED_VLLM` (checked when a model loads).
"""

from __future__ import annotations

import logging
import os

from .version import SUPPORTED_VLLM, UnsupportedVLLMError, check_vllm_version

__all__ = ["SUPPORTED_VLLM", "UnsupportedVLLMError", "check_vllm_version", "register"]

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register the ``deltahub`` quantization method and load format with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from .loader import DeltahubModelLoader
    from .quant import DeltahubConfig

    register_quantization_config("deltahub")(DeltahubConfig)
    register_model_loader("deltahub")(DeltahubModelLoader)
    try:  # many fine-tunes per engine (vLLM internals: supported releases only)
        from .lora import install_lora_patches, register_resolver

        install_lora_patches()
        register_resolver()
    except UnsupportedVLLMError as exc:
        logger.warning("deltahub: fine-tunes as vLLM adapters are off: %s (%s)", exc, exc.hint)
    _registered = True
    logger.debug("deltahub vLLM plug-in registered in process %d", os.getpid())
