"""Errors raised by :mod:`deltahub.kernels`.

The kernels import nothing else of deltahub, so they carry their own small hierarchy; both classes
have a ``message`` (what happened) and a ``hint`` (what to do next), like ``deltahub.errors``, and
callers (``deltahub.runtime``) may re-raise them as ``DeltaHubError`` subclasses.
"""

from __future__ import annotations

__all__ = ["KernelInputError", "TritonUnavailableError"]


class _HintedError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class KernelInputError(_HintedError, ValueError):
    """Bad arguments to a kernel or its reference: wrong shape, dtype, device, or tenant id."""


class TritonUnavailableError(_HintedError, RuntimeError):
    """The Triton path cannot run for these tensors (Triton not installed, tensors not on a CUDA
    device, or no GPU / interpreter). The hint names the alternative."""
