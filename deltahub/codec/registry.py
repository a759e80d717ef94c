"""The codec registry: codec name → :class:`~deltahub.codec.base.TensorCodec` instance.

The built-in codecs (``same``, ``dense``, ``sign1``) register when :mod:`deltahub.codec` is
imported. Others register by calling :func:`register` (a test, an application), or from an installed
package through the entry point group ``deltahub.codecs`` (each entry point names a
``TensorCodec`` subclass or instance; it is loaded the first time an unknown name is looked up).

Recipe for a new codec: write ``deltahub/codec/<name>.py`` (or a module of your package) with a
``TensorCodec`` subclass that sets ``name``, ``version``, ``part_names``, ``uses_base`` and
implements ``encode``, ``part_specs``, ``decode``, ``check_params`` and, for delta mode and
serving, ``operator``; then ``register(MyCodec())``. Nothing else in deltahub changes: compress
(``codec="<name>"``), materialize, load, delta mode, multi-tenant serving, calibration, push, pull,
verify, gc and show all dispatch through the registry.
"""

from __future__ import annotations

import logging
import re
import threading
from importlib import metadata

from .base import TensorCodec
from .codecs import CodecError

__all__ = ["ENTRY_POINT_GROUP", "UnknownCodecError", "get", "names", "register", "unregister"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "deltahub.codecs"

_WORD = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PART = re.compile(r"[A-Za-z0-9_]{1,64}")
_CODECS: dict[str, TensorCodec] = {}
_LOCK = threading.Lock()
_ENTRY_POINTS_LOADED = False


class UnknownCodecError(CodecError):
    """No codec of that name is registered (the manifest or the request names a codec this
    installation does not know)."""


def register(codec: TensorCodec, *, replace: bool = False) -> TensorCodec:
    """Register ``codec`` under ``codec.name``. Registering the same instance twice is a no-op;
    another codec under a taken name needs ``replace=True``. Returns ``codec``."""
    if not isinstance(codec, TensorCodec):
        raise TypeError(f"register() takes a TensorCodec instance, got {type(codec).__name__}")
    name = getattr(codec, "name", None)
    if not isinstance(name, str) or not _WORD.fullmatch(name):
        raise ValueError(f"a codec name must be 1-64 ASCII letters, digits, _ and -, got {name!r}")
    if isinstance(codec.version, bool) or not isinstance(codec.version, int) or codec.version < 1:
        raise ValueError(f"codec {name!r}: version must be a positive int")
    for flag in ("uses_base", "compressible", "stores_delta", "progressive", "checks_finite"):
        if not isinstance(getattr(codec, flag), bool):
            raise ValueError(f"codec {name!r}: {flag} must be True or False")
    parts = codec.part_names
    if not isinstance(parts, tuple) or len(set(parts)) != len(parts) or not all(
        isinstance(p, str) and _PART.fullmatch(p) for p in parts
    ):
        raise ValueError(f"codec {name!r}: part names must be distinct words, got {codec.part_names!r}")
    with _LOCK:
        old = _CODECS.get(name)
        if old is not None and old is not codec and not replace:
            raise ValueError(f"a codec named {name!r} is already registered ({old!r})")
        _CODECS[name] = codec
    logger.debug("codec %s v%d registered", name, codec.version)
    return codec


def unregister(name: str) -> None:
    """Remove a registered codec (tests)."""
    with _LOCK:
        _CODECS.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata of some installed package
        logger.warning("could not read the %s entry points", ENTRY_POINT_GROUP, exc_info=True)
        return
    for ep in eps:
        try:
            obj = ep.load()
            codec = obj() if isinstance(obj, type) else obj
            if codec.name not in _CODECS:
                register(codec)
        except Exception as exc:  # a broken plug-in must not break the built-in codecs
            logger.warning("codec plug-in %s could not be loaded: %s", ep.value, exc)


def get(name: str) -> TensorCodec:
    """The codec registered as ``name``; :class:`UnknownCodecError` when there is none."""
    codec = _CODECS.get(name)
    if codec is None:
        _load_entry_points()
        codec = _CODECS.get(name)
    if codec is None:
        raise UnknownCodecError(f"unknown codec {name!r} (this deltahub knows {', '.join(names())})")
    return codec


def names() -> list[str]:
    """The names of the registered codecs, sorted."""
    return sorted(_CODECS)
