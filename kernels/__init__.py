"""Triton kernels of deltahub, each beside a plain-torch reference with the same signature.

Shipped inside the distribution as ``deltahub.kernels`` (the top-level name ``kernels`` belongs to
Hugging Face's kernel loader on PyPI). This package imports nothing else of deltahub; triton is
imported only when a kernel is launched, so ``import deltahub.kernels`` works without it.

The inference primitive is ``y = x·Wᵀ + scale·(x·Sᵀ)`` with ``S ∈ {-1, +1}`` read from packed sign
bits (layout v1: ``int32 [N, ceil(K/32)]``, bit ``j`` of word ``w`` = column ``32*w + j``, LSB
first, 1 = +1):

* :func:`sign_matmul` / :func:`sign_matmul_ref`: one delta, optional base weight and bias;
* :func:`multi_tenant_sign_matmul` / :func:`multi_tenant_sign_matmul_ref`: a stack of deltas,
  each row of ``x`` picks one (``-1``: base only), fused with the shared base GEMM;
* :func:`apply_delta` / :func:`apply_delta_ref`: ``W + scale·S`` (materialize on the GPU);
* :func:`planes_matmul` / :func:`planes_matmul_ref` and :func:`multi_tenant_planes_matmul` /
  :func:`multi_tenant_planes_matmul_ref`: the same for the ``planes`` codec, ``Δ = Σᵢ sᵢ ⊙ Sᵢ``
  with P <= 8 sign planes and scales per matrix, per row or per (row, group of G columns).

The Triton functions run when :func:`triton_can_run` says so for the tensors (CUDA tensors and
triton importable, or ``TRITON_INTERPRET=1`` with CPU tensors) and raise
:class:`TritonUnavailableError` otherwise. The ``_ref`` functions are plain torch on any device.
"""

from .backend import interpreter_enabled, triton_available, triton_can_run, triton_unavailable_reason
from .errors import KernelInputError, TritonUnavailableError
from .layout import WORD_BITS, unpack_signs_dense, words_per_row
from .ops import apply_delta, multi_tenant_planes_matmul, multi_tenant_sign_matmul, planes_matmul, sign_matmul
from .reference import (
    apply_delta_ref,
    multi_tenant_planes_matmul_ref,
    multi_tenant_sign_matmul_ref,
    planes_matmul_ref,
    sign_matmul_ref,
)

__all__ = [
    "sign_matmul",
    "sign_matmul_ref",
    "multi_tenant_sign_matmul",
    "multi_tenant_sign_matmul_ref",
    "apply_delta",
    "apply_delta_ref",
    "planes_matmul",
    "planes_matmul_ref",
    "multi_tenant_planes_matmul",
    "multi_tenant_planes_matmul_ref",
    "triton_available",
    "triton_can_run",
    "triton_unavailable_reason",
    "interpreter_enabled",
    "KernelInputError",
    "TritonUnavailableError",
    "WORD_BITS",
    "words_per_row",
    "unpack_signs_dense",
]
