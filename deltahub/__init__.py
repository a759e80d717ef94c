"""deltahub: one shared base model plus 1-bit deltas for every fine-tune.

See :mod:`deltahub.api` for the Python API and ``deltahub --help`` for the command line. The API
names are imported lazily, so ``import deltahub.errors`` (and ``deltahub --help``) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltahub._version import __version__

__all__ = ["DeltaHubError", "Store", "__version__", "load_model", "load_multi_tenant", "load_tokenizer"]

if TYPE_CHECKING:  # pragma: no cover
    from deltahub.api import Store, load_model, load_multi_tenant, load_tokenizer
    from deltahub.errors import DeltaHubError


def __getattr__(name: str) -> Any:
    if name in ("Store", "load_model", "load_multi_tenant", "load_tokenizer"):
        from deltahub import api

        return getattr(api, name)
    if name == "DeltaHubError":
        from deltahub.errors import DeltaHubError

        return DeltaHubError
    raise AttributeError(f"module 'deltahub' has no attribute {name!r}")
