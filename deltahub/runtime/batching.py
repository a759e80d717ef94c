"""Continuous batching across fine-tunes of one base (the engine under ``deltahub serve``).

One :class:`BatchEngine` owns a :class:`~deltahub.runtime.multi_tenant.TenantModel` (one base in
memory, every fine-tune a delta) and decodes every active request in one batch per step, each row
with its own fine-tune:

* **join** — a new request is prefilled alone (its own ``DynamicCache``, its tenant), then merged
  into the batch cache: both are left-padded with zeros to the same length and concatenated on the
  batch dimension, with a ``[B, L]`` attention mask (1 = a real token);
* **decode** — one forward of ``[B, 1]`` tokens with the mask and explicit ``position_ids`` (each
  row's true length: padding must not shift rotary positions);
* **leave** — finished rows are dropped (``batch_select_indices``) and columns that are padding in
  every row are trimmed.

Sampling is per request: greedy at temperature 0, else temperature and top-p with the request's own
``torch.Generator`` (``seed``). The engine is synchronous (:meth:`step`); a server runs it in a
thread and feeds it through :meth:`submit`.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from deltahub.codec.codecs import HintedError

__all__ = ["BatchEngine", "BatchError", "EngineStoppedError", "EngineThread", "Request"]

logger = logging.getLogger(__name__)


class BatchError(HintedError, ValueError):
    """A request the engine cannot take: an empty prompt, or one longer than the context."""


class EngineStoppedError(BatchError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class Request:
    """One generation request. ``tenant``: the fine-tune's name in the engine's tenant set (looked
    up at every step: ids change when the set does), or a tenant id (``-1``: the base);
    ``prompt``: token ids; ``stop_ids``: token ids that end it (not emitted)."""

    tenant: int | str
    prompt: Sequence[int]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"
    cancelled: bool = False
    _generator: torch.Generator | None = field(default=None, repr=False)
    _length: int = 0  # tokens in the cache for this row (its next position)
    _next: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class BatchEngine:
    """Decode many requests, over many tenants of one base, in one batch per step.

    Args:
        tenants: the multi-tenant model (``use(ids)`` sets the tenant of every batch row).
        max_batch: most requests decoded together; more wait in the queue.
        context: most tokens (prompt + generated) of one request.
    """

    def __init__(self, tenants: Any, max_batch: int = 8, context: int | None = None) -> None:
        self.tenants = tenants
        self.model = tenants.model
        self.max_batch = max_batch
        self.context = context
        self.queue: deque[Request] = deque()
        self.rows: list[Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._device = next(self.model.parameters()).device
        import inspect

        accepted = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Request:
        if not request.prompt:
            raise BatchError("the prompt is empty", "give at least one token")
        if self.context is not None and len(request.prompt) + request.max_new_tokens > self.context:
            raise BatchError(
                f"the prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_new_tokens}) exceed the "
                f"context of {self.context} tokens", "shorten the prompt or lower max_tokens")
        if request.seed is not None:
            request._generator = torch.Generator().manual_seed(int(request.seed))
        self.queue.append(request)
        return request

    @property
    def idle(self) -> bool:
        return not self.queue and not self.rows

    def replace_tenants(self, names: Sequence[str], changes: Sequence[dict[str, Any]]) -> None:
        """Serve the tenants ``changes`` (named ``names``) from now on. Requests that name their
        fine-tune keep it; those given a tenant id are re-mapped by name. Every fine-tune of a request
        in flight must be in ``names``. Call between steps (from the engine's thread)."""
        old = list(self.tenants.names)
        pending = [*self.rows, *list(self.queue)]  # (list(): one C-level copy, safe against submit)
        by_id = [(r, old[r.tenant]) for r in pending if isinstance(r.tenant, int) and r.tenant >= 0]
        wanted = {n for _, n in by_id} | {r.tenant for r in self.rows if isinstance(r.tenant, str)}
        missing = sorted(wanted - set(names))
        if missing:
            raise BatchError(f"requests in flight use {', '.join(missing)}, which the new set lacks",
                             "keep a fine-tune until its requests finish")
        self.tenants.replace(names, changes)
        index = {n: t for t, n in enumerate(names)}
        for r, n in by_id:
            r.tenant = index[n]

    def _ids(self, requests: Sequence[Request]) -> list[int]:
        """The tenant id of each request now (``-1``: the base)."""
        names = self.tenants.names
        out = []
        for r in requests:
            if isinstance(r.tenant, str):
                if r.tenant not in names:
                    raise BatchError(f"{r.tenant!r} is not among the fine-tunes in memory", "a bug: report it")
                out.append(names.index(r.tenant))
            else:
                out.append(r.tenant)
        return out

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests (up to ``max_batch`` rows; their prompts prefilled together), drop
        finished ones, decode one token for every other row."""
        joining: list[Request] = []
        while self.queue and len(self.rows) + len(joining) < self.max_batch:
            request = self.queue.popleft()
            if request.cancelled:
                request.finish_reason = "cancelled"
                continue
            joining.append(request)
        if joining:
            self._join(joining)
        self._leave()
        if self.rows:
            self._decode()
            self._leave()

    def _join(self, requests: list[Request]) -> None:
        """Prefill ``requests`` in one batch (prompts left-padded, each row its own positions and
        tenant) and merge their caches into the batch's: both left-padded with zeros to one length."""
        from transformers import DynamicCache

        cache = DynamicCache()
        width = max(len(r.prompt) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for k, r in enumerate(requests):
            ids[k, width - len(r.prompt):] = torch.tensor(list(r.prompt), dtype=torch.long)
            mask[k, width - len(r.prompt):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, **self._last_only}
        if len(requests) > 1:
            kwargs.update(attention_mask=mask, position_ids=positions)
        try:
            with self.tenants.use(self._ids(requests)):
                logits = self.model(ids, **kwargs).logits
        except Exception:  # (out of memory on a long prompt, say): these requests fail, the batch goes on
            logger.exception("prefill failed: %d joining request(s) fail, the %d in flight go on",
                             len(requests), len(self.rows))
            for r in requests:
                r.finish_reason = "error"
            return
        for k, r in enumerate(requests):
            r._length = len(r.prompt)
            self._emit(r, logits[k, -1])
        for layer in cache.layers:  # padding must be zeros in the merged cache (0 · NaN is NaN)
            keep = mask[:, None, :, None].bool()
            layer.keys = torch.where(keep, layer.keys, torch.zeros((), dtype=layer.keys.dtype, device=layer.keys.device))
            layer.values = torch.where(keep, layer.values, torch.zeros((), dtype=layer.values.dtype, device=layer.values.device))
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            assert self._mask is not None
            lb, lp = self._mask.shape[1], mask.shape[1]
            length = max(lb, lp)
            for big, one in zip(self._cache.layers, cache.layers, strict=True):
                big.keys = torch.cat([_pad_left(big.keys, length - lb), _pad_left(one.keys, length - lp)])
                big.values = torch.cat([_pad_left(big.values, length - lb), _pad_left(one.values, length - lp)])
            self._mask = torch.cat([F.pad(self._mask, (length - lb, 0)), F.pad(mask, (length - lp, 0))])
        self.rows.extend(requests)

    def _leave(self) -> None:
        keep = [k for k, r in enumerate(self.rows) if not r.done and not r.cancelled]
        for r in self.rows:
            if r.cancelled and not r.done:
                r.finish_reason = "cancelled"
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[k] for k in keep]
        if not self.rows:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        idx = torch.tensor(keep, dtype=torch.long, device=self._device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        drop = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
        if drop:
            self._mask = self._mask[:, drop:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]

    def _decode(self) -> None:
        assert self._mask is not None
        rows = self.rows
        ids = torch.tensor([[r._next] for r in rows], dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self._device)], 1)
        positions = torch.tensor([[r._length] for r in rows], dtype=torch.long, device=self._device)
        with self.tenants.use(self._ids(rows)):
            logits = self.model(ids, attention_mask=self._mask, position_ids=positions, use_cache=True,
                                **{self._cache_kw: self._cache}).logits
        for k, r in enumerate(rows):
            r._length += 1
            self._emit(r, logits[k, -1])

    # ------------------------------------------------------------------ sampling
    def _emit(self, request: Request, logits: torch.Tensor) -> None:
        try:
            token = _sample(logits.float(), request.temperature, request.top_p, request._generator)
        except RuntimeError:  # this row's logits cannot be sampled: it alone fails
            logger.exception("sampling failed for request %d", request.id)
            request.finish_reason = "error"
            return
        if token in request.stop_ids:
            request.finish_reason = "stop"
            return
        request.tokens.append(token)
        request._next = token
        if request.on_token is not None:
            request.on_token(token)
        if len(request.tokens) >= request.max_new_tokens:
            request.finish_reason = "length"


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, L + n, D]`` with zeros in front (zeros, never garbage: a masked NaN
    still poisons attention through 0 · NaN)."""
    return F.pad(x, (0, 0, n, 0)) if n else x


MIN_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily (``logits / T`` would overflow fp32)."""


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from fp32 logits ``[V]``: argmax at temperature 0 (or below ``MIN_TEMPERATURE``,
    where the division would overflow), else nucleus sampling. NaN logits count as ``-inf``."""
    logits = torch.nan_to_num(logits, nan=float("-inf"))
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(logits.argmax())
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class EngineThread:
    """Runs a :class:`BatchEngine` in a background thread: :meth:`submit` from any thread (an HTTP
    handler); tokens arrive through each request's ``on_token`` and its end through ``on_finish``
    (both called in the engine thread), and the returned event is set when it has finished.
    :meth:`call` runs a function in the engine thread between two steps (to change the tenants).
    :meth:`close` stops after the requests in flight (or cancels them)."""

    def __init__(self, engine: BatchEngine, name: str = "deltahub-engine") -> None:
        import threading

        self.engine = engine
        self._wake = threading.Condition()
        self._stopping = False
        self._closed = False  # the thread has returned: nothing queued from now on would run
        self._cancel_all = False
        self._done: dict[int, tuple[Request, Any]] = {}
        self._calls: deque[tuple[Callable[[], Any], Any]] = deque()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Any:
        """Queue ``request`` (checked first: :class:`BatchError`); returns a ``threading.Event`` set
        when it has finished."""
        import threading

        with self._wake:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down", "retry on another instance")
            self.engine.submit(request)
            event = threading.Event()
            self._done[request.id] = (request, event)
            self._wake.notify()
        return event

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the engine thread between two steps; returns a
        ``concurrent.futures.Future`` of its result."""
        from concurrent.futures import Future

        future: Future[Any] = Future()
        with self._wake:
            if self._closed:
                raise EngineStoppedError("the engine has stopped", "start the server again")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def cancel_all(self) -> None:
        """Stop taking requests and cancel those in flight and waiting (their ``on_finish`` runs
        with ``finish_reason`` ``"cancelled"``); returns at once."""
        with self._wake:
            self._stopping = True
            self._cancel_all = True
            self._wake.notify()

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        with self._wake:
            self._stopping = True
            self._cancel_all = cancel
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # whatever ended the thread: calls queued now or later fail instead of waiting forever
            with self._wake:
                self._closed = True
                calls = list(self._calls)
                self._calls.clear()
            for _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineStoppedError("the engine has stopped", "start the server again"))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while engine.idle and not self._calls and not self._stopping:
                    self._wake.wait()
                calls = list(self._calls)
                self._calls.clear()
                if engine.idle and not calls and self._stopping:
                    self._closed = True
                    return
                if self._cancel_all:
                    for r in [*engine.rows, *engine.queue]:
                        r.cancelled = True
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)
            try:
                if not engine.idle:
                    engine.step()
            except Exception:  # one bad step must not leave clients waiting forever
                logger.exception("engine step failed: the requests in flight fail")
                with self._wake:
                    for r in [*engine.rows, *engine.queue]:
                        r.cancelled = True
                        r.finish_reason = r.finish_reason or "error"
                    engine.rows, engine._cache, engine._mask = [], None, None
                    engine.queue.clear()
            finished: list[tuple[Request, Any]] = []
            with self._wake:  # (submit adds to _done and the queue under this lock)
                live = {r.id for r in [*engine.rows, *engine.queue]}
                for rid in [rid for rid in self._done if rid not in live]:
                    finished.append(self._done.pop(rid))
            for request, event in finished:
                if request.finish_reason is None:
                    request.finish_reason = "cancelled"
                if request.on_finish is not None:
                    try:
                        request.on_finish(request)
                    except Exception:
                        logger.exception("a request's on_finish failed")
                event.set()
