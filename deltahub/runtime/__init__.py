"""Inference with deltas applied on the fly: ``DeltaLinear``, delta-mode and multi-tenant models.

* :class:`DeltaLinear` / :class:`DeltaEmbedding` — a frozen base weight plus packed signs and a
  scale; nothing of the ``[N, K]`` delta is ever materialized.
* :mod:`deltahub.runtime.multi_tenant` — one base shared by several deltas, every row of a batch
  using its own fine-tune (or the base).
* :mod:`deltahub.runtime.backend` — Triton kernels on a CUDA device, a chunked torch path elsewhere.

Imports only torch, transformers, :mod:`deltahub.codec` and :mod:`deltahub.kernels`.
"""

from deltahub.codec import signs  # the sign1 torch path (it moved to the codec; the old name stays)
from deltahub.runtime.backend import Backend, choose_backend, reset_backend_choice
from deltahub.runtime.delta_linear import DeltaEmbedding, DeltaLinear

__all__ = ["signs", "Backend", "DeltaEmbedding", "DeltaLinear", "choose_backend", "reset_backend_choice"]
