"""The OpenAI-compatible HTTP server over a :class:`~deltahub.ops.pool.ModelPool` (FastAPI + uvicorn).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming by
server-sent events with ``"stream": true``), ``GET /health``. Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``):

======================================  =====  ==============================================
unknown model (lists the served ones)    404    ``model_not_found``
bad body, prompt beyond the context      400    ``invalid_request_error``
missing or wrong ``Authorization``       401    ``authentication_error`` (every route but /health)
too many requests waiting                429    ``Retry-After`` header
memory budget full of models in use      503    ``Retry-After`` header
======================================  =====  ==============================================

A request pins its model in the pool from admission until the engine has let go of it; a client
that disconnects cancels its request at once (the engine drops the row before its next step).
One access-log line per request goes to the ``deltahub.access`` logger.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import (
    Request as HttpRequest,  # (module level: FastAPI reads the annotations)
)

from deltahub import defaults
from deltahub.errors import (
    CapacityError,
    DeltaHubError,
    HubError,
    HubNotFoundError,
    NameExistsError,
    NameNotFoundError,
)
from deltahub.formats.safe_json import JSONInputError
from deltahub.formats.safe_json import loads as json_loads
from deltahub.runtime.batching import BatchError, EngineStoppedError, Request
from deltahub.serve.protocol import (
    GenerationParams,
    RequestError,
    default_max_tokens,
    parse_chat,
    parse_completion,
)
from deltahub.serve.text import TextStream

__all__ = ["create_app"]

logger = logging.getLogger("deltahub.serve")
access = logging.getLogger("deltahub.access")

MAX_BODY_BYTES = 8 << 20
BODY_TIMEOUT_S = 10.0
DISCONNECT_CHECK_S = 0.25  # how often a request checks that its client is still there


def _error(status: int, message: str, kind: str, param: str | None = None, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    if status == 404 and param == "model":
        code = "model_not_found"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


MAX_LOGGED = 200  # characters of a client's string in a log line


def _loggable(text: str) -> str:
    """A client's string for a text log line: escaped (no newline or terminal escape can forge a
    line) and cut to :data:`MAX_LOGGED` characters."""
    out = text.encode("unicode_escape").decode("ascii")
    return out if len(out) <= MAX_LOGGED else out[:MAX_LOGGED] + "..."


class _BearerAuth:
    """Pure ASGI middleware: every HTTP route but ``/health`` needs ``Authorization: Bearer KEY``
    (compared in constant time). Pure ASGI, not Starlette's ``BaseHTTPMiddleware``: streamed
    responses pass through untouched."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Admission:
    """Counts requests from admission to their end; beyond ``limit`` a request gets 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


def create_app(pool: Any, api_key: str | None = None, max_waiting: int = defaults.SERVE_MAX_WAITING) -> Any:
    """The FastAPI application serving ``pool`` (a :class:`~deltahub.ops.pool.ModelPool`)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from concurrent.futures import ThreadPoolExecutor

    from starlette.exceptions import HTTPException

    app = FastAPI(title="deltahub", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> Any:  # unknown routes, wrong methods
        what = {404: f"no route {request.url.path}: the routes are /v1/models, /v1/completions, "
                     "/v1/chat/completions and /health",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, what, "invalid_request_error", headers=getattr(exc, "headers", None))
    admission = _Admission(pool.max_batch + max_waiting)
    receiving = _Admission(2 * admission.limit)  # request bodies still arriving
    loads = ThreadPoolExecutor(max_workers=admission.limit, thread_name_prefix="deltahub-acquire")
    started = int(time.time())

    if api_key is not None:
        app.add_middleware(_BearerAuth, key=api_key)

    @app.get("/health")
    async def health() -> Any:
        out: dict[str, Any] = {"status": "ok", "in_flight": admission.active}
        if api_key is None:  # (open to all: the names in memory only when no key guards the rest)
            out["resident"] = pool.resident()
        return out

    @app.get("/v1/models")
    async def models() -> Any:
        resident = pool.resident()
        data = []
        for name, m in pool.served_models():
            key = m.name if m.parent is not None else f"base:{m.base_id}"
            data.append({
                "id": name, "object": "model", "created": started, "owned_by": "deltahub",
                "root": m.parent or name, "parent": m.parent,
                "resident": key in resident, "bytes": resident.get(key),
            })
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def one_model(model: str) -> Any:
        for entry in (await models())["data"]:
            if entry["id"] == model:
                return entry
        listed = ", ".join(name for name, _ in pool.served_models())
        return _error(404, f"the model {model!r} is not served here (use one of: {listed})", "invalid_request_error",
                      "model")

    async def body_of(request: HttpRequest) -> Any:
        too_big = RequestError(f"the request body is over the limit of {MAX_BODY_BYTES} bytes", "send a shorter prompt",
                               status=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():  # read at most the limit, whatever the header said
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise too_big
                chunks.append(chunk)

        from starlette.requests import ClientDisconnect

        try:  # a client that sends its body slowly holds an admission slot: not for ever
            await asyncio.wait_for(read(), timeout=BODY_TIMEOUT_S)
        except ClientDisconnect:
            raise RequestError("the client went away before sending its body", status=499) from None
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", "send it at once",
                               status=408) from None
        raw = b"".join(chunks)
        try:
            return json_loads(raw, strict_unicode=True, unique_keys=True)
        except (JSONInputError, ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}", "send a JSON object") from None

    async def acquire(name: str) -> tuple[Any, Any]:
        """Pin ``name`` in the pool: at once if resident, else on a loader thread (never holding
        the event loop or anyio's worker threads while a model loads)."""
        hit = pool.try_acquire(name)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(loads, pool.acquire, name)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left (or shutdown) while loading: unpin when done
            future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else pool.release(name))
            raise

    async def generate(request: HttpRequest, chat: bool) -> Any:
        t0 = time.perf_counter()
        name = "-"

        def refuse(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
            access.info("%s %s %d error=%s", "chat" if chat else "completion", _loggable(name), status,
                        _loggable(message), extra={"event": "request", "model": name[:MAX_LOGGED], "status": status,
                               "endpoint": "chat" if chat else "completion", "total_s": round(time.perf_counter() - t0, 4),
                               "error": message})
            return _error(status, message, kind, param, headers)

        # the body first, under its own (larger) limit: slow senders hold no request slot
        if not receiving.enter():
            return refuse(429, f"the server is full ({receiving.limit} request bodies arriving)", "rate_limit_error",
                          headers={"Retry-After": str(defaults.SERVE_RETRY_AFTER)})
        try:
            body = await body_of(request)
            params = parse_chat(body) if chat else parse_completion(body)
        except RequestError as exc:
            return refuse(exc.status, str(exc), "invalid_request_error", exc.param)
        finally:
            receiving.leave()
        name = params.model
        if not admission.enter():
            return refuse(429, f"the server is full ({admission.limit} requests in flight or waiting)",
                          "rate_limit_error", headers={"Retry-After": str(defaults.SERVE_RETRY_AFTER)})
        entered, pinned, submitted = True, False, False
        try:
            try:
                await run_in_threadpool(pool.model, params.model)
                runtime, tenant = await acquire(params.model)
                pinned = True
                tokenizer = pool.tokenizer_for(runtime, params.model)
                job = _Job(params, runtime, tenant, tokenizer, chat, t0)
                await run_in_threadpool(job.prepare)  # tokenizing and the chat template, off the event loop
            except RequestError as exc:
                return refuse(exc.status, str(exc), "invalid_request_error", exc.param)
            except (NameNotFoundError, HubNotFoundError) as exc:
                return refuse(404, str(exc), "invalid_request_error", "model")
            except CapacityError as exc:
                return refuse(503, str(exc), "server_error", headers={"Retry-After": str(defaults.SERVE_RETRY_AFTER)})
            except NameExistsError as exc:  # --pull: the repo's name is taken by another stored model
                return refuse(409, str(exc), "invalid_request_error", "model")
            except DeltaHubError as exc:  # a pull that failed (--pull), a store that cannot be read
                return refuse(502 if isinstance(exc, HubError) else 500, str(exc), "server_error", "model")
            loop = asyncio.get_running_loop()
            model = params.model

            def on_end() -> None:  # (engine thread) the engine has let go of the request
                pool.release(model)
                try:
                    loop.call_soon_threadsafe(admission.leave)
                except RuntimeError:  # the event loop is closed (shutting down)
                    pass

            try:
                job.start(loop, on_end=on_end)
            except EngineStoppedError as exc:
                return refuse(503, str(exc), "server_error", headers={"Retry-After": str(defaults.SERVE_RETRY_AFTER)})
            except BatchError as exc:
                return refuse(400, str(exc), "invalid_request_error")
            submitted = True  # from here on_end unpins and leaves the admission
            if params.stream:
                return StreamingResponse(job.sse(request), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            result = await job.collect(request)
            if job.status == 499:  # the client is gone: nobody reads this
                return _error(499, "the client disconnected", "invalid_request_error")
            if job.finish_reason == "error":
                return _error(500, "the engine failed on this request (see the server log)", "server_error")
            if job.finish_reason == "abort":
                return _error(503, "the server stopped this request (shutting down)", "server_error",
                              headers={"Retry-After": str(defaults.SERVE_RETRY_AFTER)})
            return JSONResponse(result)
        except Exception as exc:  # a bug: answered as an OpenAI error, logged with its traceback
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.exception("request failed")
            return refuse(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        finally:
            if not submitted:
                if pinned:
                    pool.release(params.model)
                if entered:
                    admission.leave()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        return await generate(request, chat=True)

    return app


class _Job:
    """One request on its way through the engine: tokens arrive on an asyncio queue."""

    def __init__(self, params: GenerationParams, runtime: Any, tenant: int, tokenizer: Any, chat: bool, t0: float) -> None:
        self.params = params
        self.runtime = runtime
        self.tenant = tenant
        self.tokenizer = tokenizer
        self.chat = chat
        self.t0 = t0
        self.first_token: float | None = None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_ids: list[int] = []
        self.request: Request | None = None
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.finish_reason: str | None = None
        self.status = 200

    def prepare(self) -> None:
        p, tok = self.params, self.tokenizer
        if tok is None and (self.chat or isinstance(p.prompt, str)):
            raise RequestError(f"{p.model!r} was stored without tokenizer files",
                               "send token ids as the prompt to /v1/completions")
        if self.chat:
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"{p.model!r} has no chat template in its tokenizer files",
                                   "use /v1/completions with a prompt", param="messages")
            try:
                text = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # a template that raises on these messages (jinja errors)
                raise RequestError(f"the chat template of {p.model!r} refused the messages: {exc}",
                                   param="messages") from None
            self.prompt_ids = list(tok(text, add_special_tokens=False)["input_ids"])
        elif isinstance(p.prompt, str):
            self.prompt_ids = list(tok(p.prompt, add_special_tokens=True)["input_ids"])
        else:
            self.prompt_ids = list(p.prompt)
        vocab = self.runtime.vocab
        if any(t >= vocab for t in self.prompt_ids):  # (a tokenizer with tokens the base lacks, say)
            raise RequestError(f"a prompt token id is beyond the model's {vocab} embeddings",
                               "use token ids of this model's vocabulary", param="prompt")
        if not self.prompt_ids:
            raise RequestError("the prompt gives no tokens", "give some text", param="prompt")
        context = self.runtime.context
        room = context - len(self.prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt is {len(self.prompt_ids)} tokens, the context of {p.model!r} is {context}",
                "shorten the prompt", param="prompt" if not self.chat else "messages")
        if p.max_tokens is None:
            p.max_tokens = min(default_max_tokens(self.chat), room)
        elif p.max_tokens > room:
            raise RequestError(
                f"the prompt ({len(self.prompt_ids)} tokens) plus max_tokens ({p.max_tokens}) exceed the context "
                f"of {context} tokens", f"ask for at most {room} tokens", param="max_tokens")

    def start(self, loop: asyncio.AbstractEventLoop, on_end: Any) -> None:
        p = self.params
        eos = set(self.runtime.eos_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed (shutting down)
                pass

        def on_token(token: int) -> None:
            put(("token", token))

        def on_finish(request: Request) -> None:
            try:
                put(("done", request.finish_reason))
            finally:
                on_end()

        self.request = Request(
            tenant=self.tenant, prompt=self.prompt_ids, max_new_tokens=int(p.max_tokens or 1),
            temperature=p.temperature, top_p=p.top_p, seed=p.seed, stop_ids=tuple(sorted(eos)),
            on_token=on_token, on_finish=on_finish,
        )
        self.runtime.thread.submit(self.request)

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancelled = True

    async def _events(self, request: Any) -> AsyncIterator[tuple[str, Any]]:
        """``("text", piece)`` as pieces become final, then ``("done", reason)``; cancels on disconnect."""
        stream = TextStream(self.tokenizer, self.params.stop) if self.tokenizer is not None else None
        self.tokens: list[int] = []
        next_check = time.monotonic() + DISCONNECT_CHECK_S
        while True:
            try:
                kind, value = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                kind, value = "", None
            if time.monotonic() >= next_check:  # whether or not tokens flow: a client gone is cancelled
                next_check = time.monotonic() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    self.cancel()
                    self.status = 499
                    yield ("gone", None)
                    return
            if not kind:  # no event within the check interval
                continue
            if kind == "token":
                if self.first_token is None:
                    self.first_token = time.perf_counter()
                if stream is not None and stream.stopped:
                    continue
                self.tokens.append(value)
                if stream is None:
                    yield ("text", "")
                    continue
                piece = stream.push(value)
                if stream.stopped:
                    self.cancel()  # the engine drops the row; the text is final
                    self.finish_reason = "stop"
                if piece:
                    yield ("text", piece)
            else:
                if stream is not None and not stream.stopped:
                    rest = stream.finish()
                    if rest:
                        yield ("text", rest)
                if self.finish_reason is None:  # cancelled by the server (shutdown): "abort", as vLLM says
                    self.finish_reason = "abort" if value == "cancelled" else value
                self.text = stream.text if stream is not None else ""
                yield ("done", self.finish_reason)
                return

    def _usage(self) -> dict[str, int]:
        n = len(getattr(self, "tokens", []))
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "total_tokens": len(self.prompt_ids) + n}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if self.chat:
            if delta:
                content: dict[str, Any] = {} if text is None else {"content": text}
                return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.params.model, "choices": choices}

    async def collect(self, request: Any) -> dict[str, Any] | None:
        pieces: list[str] = []
        try:
            async for kind, value in self._events(request):
                if kind == "text":
                    pieces.append(value)
            if self.status == 200 and self.finish_reason in ("error", "abort"):  # what the client is answered
                self.status = 500 if self.finish_reason == "error" else 503
        finally:
            self.cancel_if_unfinished()
            self._log()
        if self.finish_reason == "error" or self.status == 499:
            return None
        out = self._envelope([self._choice("".join(pieces), self.finish_reason, delta=False)], chunk=False)
        out["usage"] = self._usage()
        return out

    async def sse(self, request: Any) -> AsyncIterator[str]:
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if self.chat:
                first = self._choice(None, None, delta=True)
                first["delta"] = {"role": "assistant", "content": ""}
                yield event(self._envelope([first], chunk=True))
            async for kind, value in self._events(request):
                if kind == "gone":
                    return
                if kind == "text" and value:
                    yield event(self._envelope([self._choice(value, None, delta=True)], chunk=True))
                elif kind == "done":
                    yield event(self._envelope([self._choice(None if self.chat else "", value, delta=True)], chunk=True))
            if self.params.include_usage:
                usage = self._envelope([], chunk=True)
                usage["usage"] = self._usage()
                yield event(usage)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.status = 499
            raise
        finally:
            self.cancel_if_unfinished()
            self._log()

    def cancel_if_unfinished(self) -> None:
        if self.finish_reason is None:
            self.cancel()
            if self.status == 200:
                self.status = 499

    def _log(self) -> None:
        now = time.perf_counter()
        ttft = None if self.first_token is None else self.first_token - self.t0
        access.info(
            "%s %s %d in=%d out=%d ttft=%s total=%.3fs finish=%s",
            "chat" if self.chat else "completion", _loggable(self.params.model), self.status, len(self.prompt_ids),
            len(getattr(self, "tokens", [])), "-" if ttft is None else f"{ttft:.3f}s", now - self.t0, self.finish_reason,
            extra={"event": "request", "model": self.params.model, "status": self.status, "endpoint": "chat" if self.chat else "completion",
                   "tokens_in": len(self.prompt_ids), "tokens_out": len(getattr(self, "tokens", [])),
                   "ttft_s": None if ttft is None else round(ttft, 4), "total_s": round(now - self.t0, 4),
                   "finish_reason": self.finish_reason, "stream": self.params.stream},
        )

