"""The deltahub exception hierarchy.

Every error says what happened and what to do next. The CLI maps each class to an exit
code through one table (``deltahub.cli.ERROR_TABLE``) and prints ``str(error)`` on one
line; ``DELTAHUB_DEBUG=1`` adds the traceback.

``deltahub.codec`` and ``deltahub.kernels`` import nothing of the rest of deltahub, so their errors
(``deltahub.codec.CodecError``, ``KernelInputError``, ``TritonUnavailableError``) and the runtime's
``TenantError`` are ``ValueError``/``RuntimeError`` subclasses of their own; the operations turn
them into the classes below where they know more, and the CLI's table maps them where they do not.
"""

from __future__ import annotations


class DeltaHubError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InvalidNameError(DeltaHubError):
    """A model name or a path from a manifest is not acceptable (``..``, ``/``, absolute...)."""


class NameNotFoundError(DeltaHubError):
    """No model of that name in the store."""


class NameExistsError(DeltaHubError):
    """The name already points at another model."""


class NameChangedError(NameExistsError):
    """A name was moved or removed by another process while this one worked on the model it named."""


class InputError(DeltaHubError):
    """A checkpoint given as input is missing, malformed or unsupported."""


class PickleCheckpointError(InputError):
    """The input holds only pickle checkpoints (.bin/.pt/.pth/.ckpt), which deltahub never loads."""


class MalformedSafetensorsError(InputError):
    """A .safetensors file is truncated or its header is invalid."""


class InvalidSizeError(InputError, ValueError):
    """A size such as ``max_shard_size="5GB"`` cannot be parsed or is not positive.

    Also a ``ValueError``, which is what :func:`deltahub.api.parse_size` raised before."""


class IncompatibleBaseError(DeltaHubError):
    """The fine-tune does not fit the base (other architecture, shapes or tensors)."""


class WrongBaseError(DeltaHubError):
    """A delta is being applied to a base whose tensors differ from the ones it was made from."""


class CorruptObjectError(DeltaHubError):
    """A stored object's bytes do not hash to its id, or the object is missing."""


class UnsupportedFormatError(DeltaHubError):
    """An on-disk or on-Hub format version this deltahub cannot read."""


class OutputExistsError(DeltaHubError):
    """The output directory exists and is not empty."""


class StoreError(DeltaHubError):
    """The store or its index is unusable (permissions, locked, inconsistent)."""


class DanglingNameError(StoreError):
    """A name points at a manifest the index does not hold (a damaged index; ``verify`` reports it)."""


class DiskFullError(StoreError):
    """A write failed for lack of space (ENOSPC, EDQUOT) or a file size limit (EFBIG, ``ulimit -f``).

    Nothing half-written is kept: the message names the folder and the bytes that were needed.
    """


class InUseError(DeltaHubError):
    """The model is still needed (e.g. a base that deltas depend on)."""


class CapacityError(DeltaHubError):
    """A server is full for now (its memory budget is taken by models in use): retry later."""


class CodecError(DeltaHubError):
    """A tensor cannot be encoded or decoded (non-finite values, shape mismatch)."""


class HubError(DeltaHubError):
    """Talking to the Hugging Face Hub failed, or what is on the Hub is not usable."""


class HubAuthError(HubError):
    """Not logged in, an invalid token, or a token without the needed access (HTTP 401/403)."""


class HubNotFoundError(HubError):
    """The Hub repository or revision does not exist (or is not visible with this token)."""


class HubConnectionError(HubError):
    """The Hub cannot be reached (network down, wrong HF_ENDPOINT, or HF_HUB_OFFLINE=1)."""
