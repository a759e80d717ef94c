"""The models behind ``deltahub serve``: one runtime per base, fine-tunes resident on demand.

A :class:`ModelPool` serves stored names. Each base in use gets a :class:`BaseRuntime`: the base
model in memory once, made multi-tenant over the fine-tunes of it that are *resident*, decoded by a
:class:`~deltahub.runtime.batching.BatchEngine` in its own thread (continuous batching: requests for
different fine-tunes of one base share each step).

* **On demand.** A request for a fine-tune that is not resident loads its delta from the store (with
  ``pull``, a name the store lacks is first pulled from the Hub as a repo id) while the engine keeps
  decoding; the new tenant set is swapped in between two steps.
* **Memory budget.** Residents (bases and deltas, by the bytes of their tensors in memory) are
  evicted least recently used when a load would exceed ``memory_budget``. A model with requests in
  flight is *pinned* (:meth:`ModelPool.acquire` … :meth:`ModelPool.release`) and never evicted; a
  base goes with its deltas.
* **Store access** happens on one loader thread that opens its own :class:`StoreContext` (SQLite
  connections stay in the thread that made them).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub import defaults
from deltahub.errors import (
    CapacityError,
    DeltaHubError,
    InputError,
    InvalidNameError,
    NameNotFoundError,
)
from deltahub.fileio import human_bytes
from deltahub.formats.manifest import ModelKind
from deltahub.formats.safetensors_io import dtype_from_name
from deltahub.ops.context import StoreContext
from deltahub.ops.load import TOKENIZER_FILES, context_length, tokenizer_of
from deltahub.ops.materialize import parse_output_dtype
from deltahub.ops.reconstruct import ModelSource
from deltahub.ops.serve import load_base_model, tenant_changes
from deltahub.runtime import choose_backend
from deltahub.runtime.batching import BatchEngine, EngineThread
from deltahub.runtime.multi_tenant import (
    TenantError,
    TenantModel,
    TenantState,
    TensorChange,
)

__all__ = ["BaseRuntime", "ModelPool", "PoolFullError", "ServedModel"]

logger = logging.getLogger(__name__)


"""What ``--pull`` takes for a Hub repo id (``NAME`` or ``NAMESPACE/NAME``, optionally ``@REVISION``)."""


class PoolFullError(CapacityError):
    """Loading a model would exceed the memory budget and every resident model is in use."""


@dataclass
class ServedModel:
    """A stored name the server answers to: a fine-tune (``parent`` = its base's name) or a base."""

    name: str
    manifest_id: str
    base_id: str
    parent: str | None  # the base's label for a fine-tune; None for a base
    has_tokenizer: bool


@dataclass
class _Resident:
    key: str  # a served name (delta) or "base:<id>"
    base_id: str
    nbytes: int
    pins: int = 0


@dataclass
class BaseRuntime:
    """One base in memory and the engine decoding every request on it."""

    base_id: str
    label: str
    tenants: TenantModel
    engine: BatchEngine
    thread: EngineThread
    tokenizer: Any
    context: int
    nbytes: int
    eos_ids: tuple[int, ...]
    vocab: int  # rows of the input embedding: token ids must be below it
    tokenizers: dict[str, Any] = field(default_factory=dict)  # served name -> its own tokenizer


def _tensor_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _change_bytes(changes: dict[str, TensorChange]) -> int:
    total = 0
    for ch in changes.values():
        if ch.op is not None:
            total += _tensor_bytes(ch.op)
        elif ch.tensor is not None:
            total += ch.tensor.numel() * ch.tensor.element_size()
    return total


class ModelPool:
    """The stored models a server answers to, loaded on demand under a memory budget.

    Args:
        home: the store folder (``None``: the default).
        names: the names to serve (fine-tunes or bases); with ``serve_all``, every stored name.
        device, dtype: where and in which dtype the models run (``dtype=None``: the base's own).
        max_batch: most requests decoded together per base.
        memory_budget: most bytes of resident models (bases and deltas) or ``None`` for no limit.
        pull: a requested name the store lacks is pulled from the Hub (as a repo id) first.
        max_context: cap on a request's prompt plus generated tokens (``None``: the model's own).
    """

    def __init__(
        self,
        home: str | Path | None,
        names: Sequence[str] = (),
        serve_all: bool = False,
        device: str = defaults.DEFAULT_DEVICE,
        dtype: str | torch.dtype | None = None,
        max_batch: int = defaults.SERVE_MAX_BATCH,
        memory_budget: int | None = None,
        pull: bool = False,
        max_context: int | None = None,
        verify: bool = True,
        preload: bool = True,
        full_wait: float = defaults.SERVE_FULL_WAIT_S,
    ) -> None:
        if not names and not serve_all:
            raise InputError("no models to serve", "name stored models, or pass --all")
        if max_batch < 1:
            raise InputError(f"--max-batch must be at least 1, got {max_batch}", "pass a positive number")
        self.home = home
        self.device = torch.device(device)
        self.dtype = parse_output_dtype(dtype)
        self.max_batch = max_batch
        self.memory_budget = memory_budget
        self.pull = pull
        self.max_context = max_context
        self.verify = verify
        self.serve_all = serve_all
        self.full_wait = full_wait
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltahub-store")
        self._ctx: StoreContext | None = None
        self._lock = threading.Lock()  # residents, pins, served
        self._released = threading.Condition(self._lock)  # notified when a pin is given back
        self._load_lock = threading.Lock()  # one load (or eviction) at a time
        self._residents: OrderedDict[str, _Resident] = OrderedDict()
        self._runtimes: dict[str, BaseRuntime] = {}
        self._deltas: dict[str, list[str]] = {}  # base id -> resident delta names, in tenant order
        self.served: dict[str, ServedModel] = {}
        for served in self._store(lambda ctx: self._resolve_all(ctx, list(names), serve_all)):
            self.served[served.name] = served
        if preload:
            self.full_wait, wait = 0.0, self.full_wait  # at start nothing is in use: never wait
            for name in dict.fromkeys(names):
                try:
                    self.acquire(name)
                    self.release(name)
                except PoolFullError as exc:
                    if not self.resident():  # it would never fit
                        self.close(cancel=True)
                        raise InputError(f"{name!r} does not fit in the memory budget on its own: {exc.message}",
                                         "start the server with a larger --memory-budget") from None
                    logger.warning("%s is not resident at start: the memory budget is full", name)
            self.full_wait = wait

    # ------------------------------------------------------------------ store thread
    def _store(self, fn: Callable[[StoreContext], Any]) -> Any:
        def run() -> Any:
            if self._ctx is None:
                self._ctx = StoreContext(self.home)
            return fn(self._ctx)

        return self._io.submit(run).result()

    def _resolve_all(self, ctx: StoreContext, names: list[str], serve_all: bool) -> list[ServedModel]:
        wanted = list(dict.fromkeys(names))
        if serve_all:
            wanted += [m.name for m in ctx.index.list_models() if m.name not in wanted]
        return [self._resolve(ctx, name) for name in wanted]

    def _resolve(self, ctx: StoreContext, name: str) -> ServedModel:
        r = ctx.resolve(name)
        has_tok = any(f in r.manifest.files for f in TOKENIZER_FILES)
        if r.manifest.kind is ModelKind.DELTA:
            base_id, _ = ctx.base_of(r.manifest)
            base_names = ctx.index.names_of(base_id)
            return ServedModel(name, r.manifest_id, base_id, base_names[0] if base_names else base_id[:12], has_tok)
        return ServedModel(name, r.manifest_id, r.manifest_id, None, has_tok)

    # ------------------------------------------------------------------ names
    def model(self, name: str) -> ServedModel:
        """The served model ``name`` (with ``pull``, pulled from the Hub if the store lacks it).

        Raises:
            NameNotFoundError: ``name`` is not served (the message lists what is).
        """
        with self._lock:
            hit = self.served.get(name)
        if hit is not None:
            return hit
        found = self._store(lambda ctx: self._find(ctx, name))
        if found is None:
            with self._lock:
                listed = ", ".join(sorted(self.served)) or "none"
            raise NameNotFoundError(
                f"the model {name!r} is not served here",
                f"use one of: {listed}" + ("" if self.pull else " (or start the server with --pull)"),
            )
        with self._lock:
            self.served[name] = found
            self.served.setdefault(found.name, found)  # a pulled repo id is stored under its own name
        return found

    def _find(self, ctx: StoreContext, name: str) -> ServedModel | None:
        try:
            stored = ctx.index.get_name(name) is not None
        except DeltaHubError:  # not a valid store name (a repo id with its owner, say)
            stored = False
        if stored and self.serve_all:
            return self._resolve(ctx, name)
        if stored or not self.pull:
            return None
        from deltahub.ops.pull import looks_like_repo_id, pull

        if not looks_like_repo_id(name):  # not a Hub repo id at all: simply not served
            return None
        logger.info("pulling %s from the Hub", name)
        try:
            result = pull(ctx, name)
        except (InputError, InvalidNameError):  # not a Hub repo id at all: simply not served
            return None
        return self._resolve(ctx, result.name)

    # ------------------------------------------------------------------ residents
    def resident(self) -> dict[str, int]:
        """Resident served names (and ``base:<id>`` entries) → bytes in memory, least recent first."""
        with self._lock:
            return {k: r.nbytes for k, r in self._residents.items()}

    def used_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._residents.values())

    def acquire(self, name: str) -> tuple[BaseRuntime, int | str]:
        """Make ``name`` resident (loading and evicting as needed) and pin it (and its base) until
        :meth:`release`. Returns its runtime and its tenant for the engine: the fine-tune's name, or
        ``-1`` for the base (names, not ids: ids change whenever the resident set does).

        Raises:
            NameNotFoundError: not served. PoolFullError: it does not fit beside the models in use.
        """
        served = self.model(name)
        deadline = time.monotonic() + self.full_wait
        while True:
            hit = self.try_acquire(name)
            if hit is not None:
                return hit
            try:
                with self._load_lock:
                    with self._lock:
                        if self._is_resident(served):
                            continue
                    served = self._refresh(name, served)
                    self._load(served)
            except PoolFullError:
                # every resident model is in use: wait for a request to end, then try again
                with self._released:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self._released.wait(min(left, 1.0))

    def _refresh(self, name: str, served: ServedModel) -> ServedModel:
        """``served`` as the store has it now (a name re-pointed since, by ``compress --force`` or
        ``pull --force``, serves the new model once its old one is out of memory). Holds
        ``_load_lock``; ``served`` is not resident, so no request holds its pins."""
        fresh = self._store(lambda ctx: self._resolve(ctx, served.name))
        if fresh.manifest_id != served.manifest_id:
            logger.info("%s now names another stored model (%s): serving that", served.name, fresh.manifest_id[:12])
            with self._lock:
                for key, value in list(self.served.items()):
                    if value is served:
                        self.served[key] = fresh
        return fresh

    def try_acquire(self, name: str) -> tuple[BaseRuntime, int | str] | None:
        """:meth:`acquire` if ``name`` is resident now (never blocks on a load), else ``None``."""
        with self._lock:
            served = self.served.get(name)
            if served is None or not self._pin(served):
                return None
            return self._runtimes[served.base_id], (-1 if served.parent is None else served.name)

    def served_models(self) -> list[tuple[str, ServedModel]]:
        """``(name, model)`` of every name served, sorted (a snapshot)."""
        with self._lock:
            return sorted(self.served.items())

    def release(self, name: str) -> None:
        """Unpin ``name`` (one :meth:`acquire`)."""
        served = self.served[name]
        with self._lock:
            for key in self._keys(served):
                res = self._residents.get(key)
                if res is not None and res.pins > 0:
                    res.pins -= 1
            self._released.notify_all()

    def unload(self, name: str, base: bool = False) -> bool:
        """Evict served model ``name`` from memory now, unless a request uses it: a fine-tune's
        delta, or (a base's name, or ``base=True``) the base with every fine-tune of it. For a cache
        outside the pool that decides what stays (Ray Serve's multiplexing); a later request loads
        it again. True if it is not resident afterwards, False if in use (it stays: call again).

        Raises:
            NameNotFoundError: ``name`` is not served.
        """
        served = self.model(name)
        with self._load_lock:
            with self._lock:
                if served.parent is None or base:
                    keys = [f"base:{served.base_id}", *self._deltas.get(served.base_id, [])]
                else:
                    keys = [served.name]
                victims = [self._residents[k] for k in keys if k in self._residents]
                if any(v.pins for v in victims):
                    return False
                for v in victims:
                    del self._residents[v.key]
            if victims:
                self._evict(victims)
        return True

    def _keys(self, served: ServedModel) -> list[str]:
        keys = [f"base:{served.base_id}"]
        if served.parent is not None:
            keys.append(served.name)
        return keys

    def _is_resident(self, served: ServedModel) -> bool:
        return all(k in self._residents for k in self._keys(served))

    def _pin(self, served: ServedModel) -> bool:
        if not self._is_resident(served):
            return False
        for key in self._keys(served):
            self._residents[key].pins += 1
            self._residents.move_to_end(key)
        return True

    def _load(self, served: ServedModel) -> None:
        """Load what ``served`` needs (its base, its delta), evicting to fit. Holds ``_load_lock``."""
        base_key = f"base:{served.base_id}"
        if base_key not in self._residents:
            # room first, from the manifest's figures: a base that cannot fit is never loaded
            self._make_room(self._store(lambda ctx: self._base_estimate(ctx, served)), keep=set())
            runtime = self._store(lambda ctx: self._read_base(ctx, served))
            try:
                self._make_room(runtime.nbytes, keep=set())
            except BaseException:
                runtime.thread.close(cancel=True)
                raise
            with self._lock:
                self._runtimes[served.base_id] = runtime
                self._deltas[served.base_id] = []
                self._residents[base_key] = _Resident(base_key, served.base_id, runtime.nbytes)
            self._announce(runtime.label, runtime.nbytes)
        if served.parent is None or served.name in self._residents:
            return
        runtime = self._runtimes[served.base_id]
        # the new delta's bytes are known once read; read it first (the engine keeps decoding)
        changes, tokenizer = self._store(lambda ctx: self._read_delta(ctx, served))
        nbytes = _change_bytes(changes)
        with self._lock:
            self._residents[base_key].pins += 1  # the base must stay while its set changes
        try:
            self._make_room(nbytes, keep={base_key})
            with self._lock:
                names = [n for n in self._deltas[served.base_id] if n in self._residents]
            names, others = self._read_deltas(names)
            kept = self._swap(runtime, [*names, served.name], [*others, changes], fallback=(names, others))
            with self._lock:
                self._deltas[served.base_id] = kept
                if served.name in kept:
                    self._residents[served.name] = _Resident(served.name, served.base_id, nbytes)
                    runtime.tokenizers[served.name] = tokenizer
        finally:
            with self._lock:
                self._residents[base_key].pins -= 1
        self._announce(served.name, nbytes)

    def _swap(self, runtime: BaseRuntime, names: list[str], changes: list[dict[str, TensorChange]],
              fallback: tuple[list[str], list[dict[str, TensorChange]]] | None = None) -> list[str]:
        """Install ``names`` in ``runtime``'s engine (between two steps); the names installed. If
        that fails and ``fallback`` is given, ``fallback`` (the set before) goes back in and the error
        is raised; without one, the engine is left with no fine-tunes."""

        def swap() -> list[str]:
            try:
                runtime.engine.replace_tenants(names, changes)
                return names
            except Exception as exc:
                if fallback is not None:
                    runtime.engine.replace_tenants(*fallback)  # what worked a moment ago
                if isinstance(exc, TenantError):
                    raise InputError(str(exc), "serve fine-tunes with the base's tensor shapes only") from None
                raise

        return runtime.thread.call(swap).result()

    def _announce(self, name: str, nbytes: int) -> None:
        logger.info("resident: %s (%s in memory)", name, human_bytes(nbytes))

    def _make_room(self, nbytes: int, keep: set[str]) -> None:
        """Evict unpinned residents, least recently used first, until ``nbytes`` more fit."""
        if self.memory_budget is None:
            return
        with self._lock:
            used = sum(r.nbytes for r in self._residents.values())
            if used + nbytes <= self.memory_budget:
                return
            victims: list[_Resident] = []
            for res in self._residents.values():
                if used + nbytes <= self.memory_budget:
                    break
                if res.pins or res.key in keep or any(v.key == res.key for v in victims):
                    continue
                group = [res]
                if res.key.startswith("base:"):  # a base goes with its deltas (all must be unpinned)
                    deltas = [self._residents[n] for n in self._deltas.get(res.base_id, []) if n in self._residents]
                    if any(d.pins or d.key in keep for d in deltas):
                        continue
                    group += [d for d in deltas if all(v.key != d.key for v in victims)]
                victims += group
                used -= sum(v.nbytes for v in group)
            if used + nbytes > self.memory_budget:
                in_use = [k for k, r in self._residents.items() if r.pins]
                raise PoolFullError(
                    f"loading {human_bytes(nbytes)} would exceed the memory budget of {human_bytes(self.memory_budget)} "
                    f"({human_bytes(used)} stay resident" + (f"; in use: {', '.join(in_use)}" if in_use else "") + ")",
                    "retry when requests finish, or start the server with a larger --memory-budget",
                )
            for v in victims:
                del self._residents[v.key]
        self._evict(victims)

    def _evict(self, victims: list[_Resident]) -> None:
        gone_bases = {v.base_id for v in victims if v.key.startswith("base:")}
        for base_id in gone_bases:
            with self._lock:
                runtime = self._runtimes.pop(base_id)
                self._deltas.pop(base_id, None)
            runtime.thread.close(cancel=True)
            logger.info("evicted: %s and its fine-tunes", runtime.label)
        by_base: dict[str, list[str]] = {}
        for v in victims:
            if not v.key.startswith("base:") and v.base_id not in gone_bases:
                by_base.setdefault(v.base_id, []).append(v.key)
        for base_id, gone in by_base.items():
            runtime = self._runtimes[base_id]
            with self._lock:
                names = [n for n in self._deltas[base_id] if n not in gone]
            names, changes = self._read_deltas(names)
            self._swap(runtime, names, changes)
            with self._lock:
                self._deltas[base_id] = names
                for n in gone:
                    runtime.tokenizers.pop(n, None)
            logger.info("evicted: %s", ", ".join(gone))

    # ------------------------------------------------------------------ reading (store thread)
    def _base_estimate(self, ctx: StoreContext, served: ServedModel) -> int:
        """Bytes the base of ``served`` will take in memory (its tensors in the serving dtype)."""
        r = ctx.resolve(served.name)
        manifest = ctx.base_of(r.manifest)[1] if served.parent is not None else r.manifest
        total = 0
        for rec in manifest.tensors.values():
            dtype = self.dtype or dtype_from_name(rec.dtype)
            total += math.prod(rec.shape) * torch.empty((), dtype=dtype).element_size()
        return total

    def _read_base(self, ctx: StoreContext, served: ServedModel) -> BaseRuntime:
        with ctx.reading():
            r = ctx.resolve(served.name)
            base_manifest = ctx.base_of(r.manifest)[1] if served.parent is not None else r.manifest
            model, source, base_names = load_base_model(ctx, served.base_id, base_manifest, self.dtype, self.verify)
            label = source.resolved.name
            tokenizer = tokenizer_of(source, label) if any(f in base_manifest.files for f in TOKENIZER_FILES) else None
        model.to(self.device)
        choose_backend(self.device)
        nbytes = _tensor_bytes(model)
        tenants = TenantModel(model, TenantState(0), [])
        context = context_length(model.config.to_dict()) or defaults.SERVE_DEFAULT_CONTEXT
        if self.max_context is not None:
            context = min(context, self.max_context)
        engine = BatchEngine(tenants, max_batch=self.max_batch, context=context)
        thread = EngineThread(engine, name=f"deltahub-engine-{label}")
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
        vocab = int(model.get_input_embeddings().num_embeddings)
        runtime = BaseRuntime(served.base_id, label, tenants, engine, thread, tokenizer, context, nbytes, eos_ids, vocab)
        for name in base_names:
            runtime.tokenizers[name] = tokenizer
        return runtime

    def _read_deltas(self, names: list[str]) -> tuple[list[str], list[dict[str, TensorChange]]]:
        """The changes of the resident fine-tunes ``names``, read again on the store thread. One
        that can no longer be read (removed or re-pointed meanwhile) is dropped if no request uses
        it; if one does, the error is raised."""

        def read(ctx: StoreContext) -> tuple[list[str], list[dict[str, TensorChange]]]:
            kept, changes = [], []
            for n in names:
                try:
                    changes.append(self._read_delta(ctx, self.served[n])[0])
                    kept.append(n)
                except DeltaHubError as exc:
                    with self._lock:
                        res = self._residents.get(n)
                        if res is not None and res.pins:
                            raise
                        self._residents.pop(n, None)
                    logger.warning("dropped %s: it cannot be read again (%s)", n, exc)
            return kept, changes

        return self._store(read)

    def _read_delta(self, ctx: StoreContext, served: ServedModel) -> tuple[dict[str, TensorChange], Any]:
        with ctx.reading():
            r = ctx.resolve(served.name)
            if r.manifest_id != served.manifest_id:
                raise InputError(
                    f"{served.name!r} was re-pointed to another model while being served",
                    "restart the server to serve the new one",
                )
            _, base_manifest = ctx.base_of(r.manifest)
            changes = tenant_changes(ctx, r, base_manifest, self.verify)
            tokenizer = tokenizer_of(ModelSource(ctx, r, base_manifest, self.verify), served.name) if served.has_tokenizer else None
        for ch in changes.values():
            if ch.op is not None:
                ch.op.to(self.device)
        return changes, tokenizer

    # ------------------------------------------------------------------ requests
    def tokenizer_for(self, runtime: BaseRuntime, name: str) -> Any:
        """Served model ``name``'s own tokenizer (its stored files), else its base's."""
        served = self.served.get(name)
        return runtime.tokenizers.get(served.name if served else name) or runtime.tokenizer

    def cancel_all(self) -> None:
        """Cancel every request in flight or waiting, in every engine (they end with
        ``finish_reason`` ``"cancelled"``); new ones are refused. Returns at once."""
        with self._lock:
            runtimes = list(self._runtimes.values())
        for runtime in runtimes:
            runtime.thread.cancel_all()

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop every engine (after the requests in flight, or cancelling them) and the loader."""
        with self._lock:
            runtimes = list(self._runtimes.values())
        for runtime in runtimes:
            runtime.thread.close(cancel=cancel, timeout=timeout)
        if self._ctx is not None:
            ctx = self._ctx
            self._io.submit(ctx.close).result()  # in the thread that opened it
            self._ctx = None
        self._io.shutdown(wait=False, cancel_futures=True)
