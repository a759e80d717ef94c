"""Can the Triton path run? (Triton importable, and tensors on a CUDA device or the interpreter on.)

``TRITON_INTERPRET=1`` must be set before Triton is first imported for the interpreter to be used;
it lets the kernels run on CPU tensors (slowly: for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreter_enabled", "triton_unavailable_reason", "triton_can_run"]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install: report it, never crash the caller
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return None


def _interpreter_set_too_late() -> str | None:
    """``@triton.jit`` picks the interpreter when a function is defined: if triton (or our kernel
    modules) were imported before ``TRITON_INTERPRET=1`` was set, the kernels are compiled ones and
    cannot run on the CPU. Detected from the type of a jit function (None when all is well)."""
    import sys

    from triton.runtime.jit import JITFunction  # a compiled (not interpreted) jit function

    probes = [getattr(sys.modules.get("triton.language"), "zeros", None)]
    common = sys.modules.get(__name__.rpartition(".")[0] + ".tl_common")
    probes.append(getattr(common, "unpack_signs_kn", None))
    if any(isinstance(p, JITFunction) for p in probes):
        return (
            "TRITON_INTERPRET=1 was set after triton was imported, so the kernels were not built for "
            "the interpreter; set it before the first import of triton (e.g. in the environment)"
        )
    return None


def triton_unavailable_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None when they can.

    They can when triton imports and either every given tensor is on a CUDA device (and CUDA is
    available) or the interpreter is on and every tensor is on the CPU.
    """
    err = _triton_import_error()
    if err is not None:
        return err
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if interpreter_enabled():
        late = _interpreter_set_too_late()
        if late is not None:
            return late
        if devices <= {"cpu"}:
            return None
        return f"TRITON_INTERPRET=1 runs CPU tensors only, got tensors on {sorted(devices)}"
    if not torch.cuda.is_available():
        return "no CUDA device is available (and TRITON_INTERPRET is not set)"
    if devices != {"cuda"}:
        return f"the Triton kernels need CUDA tensors, got tensors on {sorted(devices) or ['no device']}"
    return None


def triton_can_run(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels can run on these tensors (see :func:`triton_unavailable_reason`)."""
    return triton_unavailable_reason(*tensors) is None


def triton_available() -> bool:
    """True when Triton imports and it has somewhere to run: a CUDA device, or the interpreter."""
    return _triton_import_error() is None and (interpreter_enabled() or torch.cuda.is_available())
