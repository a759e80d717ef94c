"""Which implementation applies the deltas: the Triton kernels or the torch path.

The Triton kernels (:mod:`deltahub.kernels`) run only on a CUDA device with a working Triton. Anywhere
else — no GPU, CPU tensors, Triton missing or broken — the memory-bounded torch path of
:mod:`deltahub.runtime.signs` is used. The choice is logged once per process and device type
(INFO when there is simply no GPU, WARNING when a GPU is there but Triton cannot run on it).
"""

from __future__ import annotations

import enum
import logging
import threading

import torch

__all__ = ["Backend", "choose_backend", "reset_backend_choice", "FALLBACK_MESSAGE"]

logger = logging.getLogger(__name__)

FALLBACK_MESSAGE = "deltahub: no GPU/Triton, using the torch path"


class Backend(str, enum.Enum):
    TRITON = "triton"
    TORCH = "torch"


_lock = threading.Lock()
_chosen: dict[str, Backend] = {}


def _triton_runs() -> tuple[bool, str]:
    """(whether deltahub.kernels can run Triton kernels here, why not)."""
    try:
        from deltahub import kernels
    except Exception as exc:  # a broken install must not break the torch path
        return False, f"deltahub.kernels cannot be imported ({exc})"
    available = getattr(kernels, "triton_available", None)
    if available is None or not hasattr(kernels, "sign_matmul"):
        return False, "deltahub.kernels has no Triton kernels"
    try:
        ok = bool(available())
    except Exception as exc:
        return False, f"Triton check failed ({exc})"
    return ok, "" if ok else "Triton cannot run here"


def choose_backend(device: torch.device | str) -> Backend:
    """The backend for tensors on ``device``; logs the choice the first time per device type."""
    dev = torch.device(device)
    hit = _chosen.get(dev.type)
    if hit is not None:  # the common case, without the lock
        return hit
    with _lock:
        hit = _chosen.get(dev.type)
        if hit is not None:
            return hit
        if dev.type != "cuda":
            choice = Backend.TORCH
            if torch.cuda.is_available():
                logger.info("%s (tensors on %s, not on the GPU)", FALLBACK_MESSAGE, dev.type)
            else:
                logger.info("%s (no CUDA device)", FALLBACK_MESSAGE)
        else:
            ok, why = _triton_runs()
            choice = Backend.TRITON if ok else Backend.TORCH
            if ok:
                logger.info("deltahub: using the Triton kernels on %s", torch.cuda.get_device_name(dev))
            else:
                logger.warning("%s on the GPU: %s", FALLBACK_MESSAGE, why)
        _chosen[dev.type] = choice
        return choice


def reset_backend_choice() -> None:
    """Forget the choices made (the next :func:`choose_backend` decides and logs again)."""
    with _lock:
        _chosen.clear()
