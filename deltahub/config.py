"""Settings read from the environment.

``DELTAHUB_HOME``   the store (default: ``$XDG_CACHE_HOME/deltahub`` or ``~/.cache/deltahub``).
``DELTAHUB_DEBUG``  ``1`` shows tracebacks in the CLI.
``DELTAHUB_DISABLE_PROGRESS_BARS`` (or ``HF_HUB_DISABLE_PROGRESS_BARS``) ``1`` hides progress bars.
``DELTAHUB_RESERVE_BYTES`` the space a store keeps for a full disk (default 4 MiB; ``0``: none).
Hugging Face variables (``HF_HOME``, ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``) are read by
``huggingface_hub`` itself and honoured as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from deltahub import defaults


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def default_home() -> Path:
    """Where the store lives when no ``--home`` is given."""
    env = os.environ.get("DELTAHUB_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltahub"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` itself resolves it
    (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
        if env:
            return Path(env).expanduser()
        home = os.environ.get("HF_HOME")
        return (Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface") / "hub"
    return Path(constants.HF_HUB_CACHE).expanduser()


#: The key under which reference objects name the Hugging Face hub cache.
HF_CACHE_ROOT = "hf_hub_cache"


#: Default size of the space reserve a store keeps for a full disk (``$DELTAHUB_HOME/reserve``).
DEFAULT_RESERVE_BYTES = defaults.DEFAULT_RESERVE_BYTES


def reserve_bytes() -> int:
    """``DELTAHUB_RESERVE_BYTES`` (bytes; ``0`` keeps no reserve), else :data:`DEFAULT_RESERVE_BYTES`.

    The reserve is given back when the disk is nearly full, so that the index can still be opened
    and written (``ls``, ``show``, ``rm``, ``gc`` on a full disk)."""
    raw = os.environ.get("DELTAHUB_RESERVE_BYTES", "").strip()
    if not raw:
        return DEFAULT_RESERVE_BYTES
    try:
        return max(0, int(raw))
    except ValueError:
        return DEFAULT_RESERVE_BYTES


def debug_enabled() -> bool:
    return _truthy(os.environ.get("DELTAHUB_DEBUG"))


def progress_disabled() -> bool:
    return _truthy(os.environ.get("DELTAHUB_DISABLE_PROGRESS_BARS")) or _truthy(
        os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    )
