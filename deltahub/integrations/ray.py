"""deltahub behind Ray Serve: many engine replicas, each serving many fine-tunes of its base.

Topology::

    client ──HTTP──> Ray Serve proxy ──> DeltahubIngress          (reads "model" from the JSON body)
                                           │ handle.options(multiplexed_model_id=model, stream=True)
                                           ▼
                                         DeltahubEngine replica × N (Ray autoscaling)
                                           ├─ @serve.multiplexed loader: model id -> resident in the pool
                                           ├─ ModelPool: one base in memory, the fine-tunes of it resident
                                           │  as packed deltas, continuous batching across all of them
                                           └─ the `deltahub serve` app (create_app), called in-process

Ray routes a request to a replica that already holds its model id (``serve.multiplexed``); a replica
holds at most ``max_models`` ids (Ray's LRU). When Ray drops an id, the replica unloads that fine-tune
from its pool as soon as no request uses it (the base too once none of its models is held), so the
memory is given back. Every request is answered by the same code as ``deltahub serve``
(:func:`deltahub.serve.app.create_app` on the replica's pool): the same parsing, tokenizing, sampling,
streaming (server-sent events pass through Ray's streaming handles) and OpenAI-shaped errors.

Run it (``pip install "deltahub[ray]"``; the store must be readable at ``home`` on every node)::

    serve run deltahub.integrations.ray:app home=/data/deltahub names=llama-chat,llama-code
    serve run deltahub.integrations.ray:app home=/data/deltahub \\
        autoscaling_config='{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}'

or from Python: ``serve.run(build_app(home="/data/deltahub", names=["llama-chat"], num_replicas=2))``.
Arguments (``key=value``; see :func:`build_app`): ``home`` (default ``$DELTAHUB_HOME``), ``names``
(comma-separated; none: every stored model), ``device``, ``dtype``, ``max_batch``, ``max_waiting``,
``max_context``, ``memory_budget`` (per replica), ``api_key`` (default ``$DELTAHUB_API_KEY``),
``pull``, ``max_models``, ``num_replicas`` or ``autoscaling_config`` (JSON), ``num_cpus``,
``num_gpus``, ``max_ongoing_requests``, ``ingress_replicas``, ``json_logs``.

Routes: those of ``deltahub serve`` (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``). ``/v1/models`` and ``/health`` are answered by one replica: ``resident`` is that
replica's memory. Every response carries ``x-deltahub-replica`` (the replica that answered).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deltahub import defaults
from deltahub.errors import DeltaHubError, InputError
from deltahub.fileio import parse_size
from deltahub.formats import safe_json
from deltahub.serve import configure_logging
from deltahub.serve.app import BODY_TIMEOUT_S, MAX_BODY_BYTES, create_app

__all__ = ["DeltahubEngine", "DeltahubIngress", "DeltahubVLLMEngine", "app", "build", "build_app"]

logger = logging.getLogger("deltahub.integrations.ray")

DEFAULT_MAX_MODELS = 8
"""Model ids one engine replica holds (Ray's LRU beyond that); deltas are small, bases are shared."""
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_MODEL_ID = 1024  # a longer "model" is not routed by (the engine answers it as unknown)
UNLOAD_RETRY_S = 0.2  # how often an unload waits for the requests still using a model
REPLICA_HEADER = "x-deltahub-replica"
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


def _openai_error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    code = {429: "rate_limit_exceeded"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------- ASGI
_Start = tuple[int, list[tuple[str, str]]]


async def _call_asgi(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]],
                     body: bytes, tasks: set[asyncio.Task[None]]) -> AsyncIterator[_Start | bytes]:
    """Run one HTTP request through the ASGI ``app`` in this event loop: yields ``(status,
    headers)``, then the body's chunks as the app sends them. Closing the iterator early is a client
    disconnect for the app (a streamed generation is cancelled)."""
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode("utf-8"), "root_path": "",
        "query_string": query.encode("latin-1"), "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # (the app answers its own errors: this is a bug)
            logger.exception("the deltahub app failed on %s %s", method, path)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    started = False
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield (int(message["status"]), [(k.decode("latin-1"), v.decode("latin-1"))
                                                 for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:
            response = _openai_error(500, "internal error: the deltahub app gave no response (see the replica log)",
                                     "server_error")
            yield (500, [("content-type", "application/json")])
            yield bytes(response.body)
    finally:
        gone.set()  # the app sees a disconnect (its work ends by itself; the task is not awaited here)


# --------------------------------------------------------------------------------------------- engine
class _Held:
    """A model id Ray's multiplexing holds on one replica; Ray calls ``__del__`` when it drops it
    (LRU), and the replica then unloads the model from its pool once no request uses it."""

    def __init__(self, name: str, on_drop: Callable[[str], None]) -> None:
        self.name = name
        self._on_drop: Callable[[str], None] | None = on_drop

    def __del__(self) -> None:  # called by Ray (in a thread), then maybe by the GC: once only
        on_drop, self._on_drop = self._on_drop, None
        if on_drop is not None:
            on_drop(self.name)

    def __repr__(self) -> str:
        return f"_Held({self.name!r})"


@serve.deployment(name="DeltahubEngine")
class DeltahubEngine:
    """One engine replica: a :class:`~deltahub.ops.pool.ModelPool` (one runtime per base, fine-tunes
    resident on demand, continuous batching across them) answered by the ``deltahub serve`` app."""

    def __init__(
        self,
        home: str | None = None,
        names: Sequence[str] = (),
        device: str = defaults.SERVE_DEVICE,
        dtype: str | None = None,
        max_batch: int = defaults.SERVE_MAX_BATCH,
        max_waiting: int = defaults.SERVE_MAX_WAITING,
        max_context: int | None = None,
        memory_budget: int | None = None,
        api_key: str | None = None,
        pull: bool = False,
        max_models: int = DEFAULT_MAX_MODELS,
        json_logs: bool = False,
    ) -> None:
        import torch

        from deltahub.ops.pool import ModelPool

        configure_logging(json_logs)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pool = ModelPool(home, list(names), serve_all=not names, device=device, dtype=dtype,
                              max_batch=max_batch, memory_budget=memory_budget, pull=pull,
                              max_context=max_context, preload=False)
        self.app = create_app(self.pool, api_key=api_key, max_waiting=max_waiting)
        self._api_key = api_key
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # (outside a replica: tests calling the class directly)
            self.replica = f"local-{os.getpid()}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._cv = threading.Condition()
        self._held: set[str] = set()  # model ids Ray's multiplexing holds here
        self._dropped: set[str] = set()  # ids Ray dropped, still to be unloaded from the pool
        self._closing = False
        self._unloader = threading.Thread(target=self._unload_loop, name="deltahub-ray-unload", daemon=True)
        self._unloader.start()

        async def deltahub_load(model_id: str) -> _Held:
            return await self._load_model(model_id)

        # (bound per replica, so that max_models is an argument of the deployment)
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_models)(deltahub_load)
        logger.info("engine replica %s: %d model(s) served on %s, at most %d held", self.replica,
                    len(self.pool.served), device, max_models)

    # ---------------------------------------------------------------- multiplexing
    async def _load_model(self, name: str) -> _Held:
        """Ray's multiplexed loader: make ``name`` resident in the pool (base and delta)."""
        with self._cv:
            self._held.add(name)
            self._dropped.discard(name)

        def warm() -> None:
            self.pool.acquire(name)
            self.pool.release(name)

        try:
            await asyncio.to_thread(warm)
        except BaseException:
            with self._cv:
                self._held.discard(name)
            raise
        return _Held(name, self._drop)

    def _drop(self, name: str) -> None:
        with self._cv:
            self._held.discard(name)
            self._dropped.add(name)
            self._cv.notify_all()

    def _unload_loop(self) -> None:
        """Unload what Ray dropped, once no request uses it (retrying while requests run)."""
        while True:
            with self._cv:
                while not self._dropped and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                dropped = sorted(self._dropped)
            for name in dropped:
                try:
                    done = self._unload(name)
                except Exception as exc:  # (a name gone from the store: nothing left to unload)
                    logger.warning("could not unload %s: %s", name, exc)
                    done = True
                if done:
                    with self._cv:
                        self._dropped.discard(name)
            with self._cv:
                if self._dropped and not self._closing:
                    self._cv.wait(UNLOAD_RETRY_S)

    def _unload(self, name: str) -> bool:
        with self._cv:
            if name in self._held:  # Ray loaded it again meanwhile
                return True
            held = list(self._held)
        base_id = self.pool.model(name).base_id
        keep_base = any(self.pool.model(n).base_id == base_id for n in held)
        done = self.pool.unload(name, base=not keep_base)
        if done:
            logger.info("unloaded %s%s (dropped by Ray's multiplexing)", name, "" if keep_base else " and its base")
        return done

    async def _ensure(self, model_id: str) -> None:
        """Let Ray's multiplexing hold ``model_id`` here; unknown names (and loads that fail) are left
        to the app, which answers them as ``deltahub serve`` does (404, 503, ...)."""
        try:
            await asyncio.to_thread(self.pool.model, model_id)
        except DeltaHubError:
            return
        try:
            await self._multiplexed(model_id)
        except Exception as exc:  # (the app meets the same failure, and answers it)
            logger.info("%s is not held by this replica: %s", model_id, exc)

    # ---------------------------------------------------------------- requests
    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[_Start | bytes]:
        """One HTTP request through this replica's ``deltahub serve`` app (a streaming call): yields
        ``(status, headers)``, then the body's chunks."""
        model_id = serve.get_multiplexed_model_id()
        if model_id and self._authorized(headers):  # (else the app answers 401: nothing is loaded or pulled)
            await self._ensure(model_id)
        answer = _call_asgi(self.app, method, path, query, headers, body, self._tasks)
        try:
            async for item in answer:
                yield (item[0], [*item[1], (REPLICA_HEADER, self.replica)]) if isinstance(item, tuple) else item
        finally:  # (a caller gone: the app sees its disconnect now, not when the GC gets here)
            await answer.aclose()

    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        if not self._api_key:
            return True
        given = next((v for k, v in headers if k.lower() == "authorization"), "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode())

    def loaded(self) -> dict[str, Any]:
        """What this replica holds: ``replica``, ``multiplexed`` (the ids Ray's multiplexing holds
        here), ``resident`` (the pool's models in memory → bytes) and ``unloading``."""
        with self._cv:
            held, dropped = sorted(self._held), sorted(self._dropped)
        return {"replica": self.replica, "multiplexed": held, "resident": self.pool.resident(), "unloading": dropped}

    def check_health(self) -> None:
        if not self._unloader.is_alive() and not self._closing:
            raise RuntimeError("the unloading thread of this replica died")

    def __del__(self) -> None:  # Ray calls it on a replica's shutdown
        if getattr(self, "_closing", True):
            return
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self.pool.close(cancel=True, timeout=5)


@serve.deployment(name="DeltahubVLLMEngine")
class DeltahubVLLMEngine:
    """One engine replica backed by vLLM: ``deltahub serve NAMES --engine vllm --pull`` (one base,
    its fine-tunes as adapters, others loaded by name on their first request) on a private local
    port, each request proxied to it. vLLM keeps its own adapter LRU (``--max-cpu-loras``); Ray's
    multiplexing only routes a model id to the replicas that served it last."""

    def __init__(self, home: str | None = None, names: Sequence[str] = (), dtype: str | None = None,
                 max_batch: int = defaults.SERVE_MAX_BATCH, max_context: int | None = None, api_key: str | None = None,
                 pull: bool = False, max_models: int = DEFAULT_MAX_MODELS, engine_args: Sequence[str] = (),
                 json_logs: bool = False, start_timeout: float = 900.0) -> None:
        import socket
        import subprocess
        import sys
        import time

        import httpx

        configure_logging(json_logs)
        if not names:
            raise InputError("the vLLM engine serves named models (one base and fine-tunes of it)",
                             "pass names=BASE,FT1,...")
        with socket.socket() as sock:  # (a free port for this replica's own vLLM server)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "deltahub.cli", *(["--home", os.fspath(home)] if home else []), "serve", *names,
               "--engine", "vllm", "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
               "--pull" if pull else "", *(["--dtype", dtype] if dtype else []),
               *(["--max-context", str(max_context)] if max_context else []),
               *(f"--engine-arg={a}" for a in engine_args)]
        env = {**os.environ, **({"DELTAHUB_API_KEY": api_key} if api_key else {})}
        self.proc = subprocess.Popen([c for c in cmd if c], env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10.0))
        deadline = time.monotonic() + start_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        while True:  # ready when vLLM lists its models
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server of this replica exited ({self.proc.returncode}): see the replica log")
            try:
                if httpx.get(self.url + "/v1/models", headers=headers, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"the vLLM server of this replica did not start within {start_timeout:.0f} s")
            time.sleep(1)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # (outside a replica)
            self.replica = f"local-{os.getpid()}"

        async def deltahub_route(model_id: str) -> str:  # vLLM loads adapters itself: routing only
            return model_id

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_models)(deltahub_route)
        logger.info("vLLM engine replica %s on %s: %s", self.replica, self.url, ", ".join(names))

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[_Start | bytes]:
        """One HTTP request proxied to this replica's vLLM server (a streaming call)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._multiplexed(model_id)
        request = self.client.build_request(method, path + (f"?{query}" if query else ""), content=body,
                                            headers=[(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS])
        response = await self.client.send(request, stream=True)
        try:
            yield (response.status_code, [*response.headers.items(), (REPLICA_HEADER, self.replica)])
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    def check_health(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the vLLM server of this replica exited ({self.proc.returncode})")

    def _stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # deltahub's launcher stops vLLM and removes its stubs
            try:
                self.proc.wait(60)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)

    def __del__(self) -> None:  # Ray calls it on a replica's shutdown
        if hasattr(self, "proc"):
            self._stop()


# --------------------------------------------------------------------------------------------- ingress
def _model_of(body: bytes) -> str | None:
    """The ``model`` of a JSON request body (``None``: none to route by; the engine answers it)."""
    try:
        parsed = safe_json.loads(body, "the request body")
    except (safe_json.JSONInputError, ValueError, UnicodeDecodeError):
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_ID else None


@serve.deployment(name="DeltahubIngress")
class DeltahubIngress:
    """The HTTP entry: forwards each request to an engine replica, routed by its ``model``."""

    def __init__(self, engine: DeploymentHandle) -> None:
        configure_logging(False)
        self.engine = engine

    async def _body(self, request: Request) -> bytes | Response:
        declared = request.headers.get("content-length", "")
        too_big = _openai_error(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes (send a shorter "
                                     "prompt)", "invalid_request_error")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return too_big
        chunks: list[bytes] = []
        size = 0

        async def read() -> bool:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return False
                chunks.append(chunk)
            return True

        try:
            if not await asyncio.wait_for(read(), timeout=BODY_TIMEOUT_S):
                return too_big
        except asyncio.TimeoutError:
            return _openai_error(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s (send it at once)",
                                 "invalid_request_error")
        except ClientDisconnect:
            return _openai_error(499, "the client went away before sending its body", "invalid_request_error")
        return b"".join(chunks)

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        path = request.scope["path"]
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):  # (an application deployed under a route prefix)
            path = path[len(root):] or "/"
        model = _model_of(body) if request.method == "POST" and path in GENERATION_ROUTES else None
        handle = self.engine.options(stream=True)
        if model is not None:
            handle = handle.options(multiplexed_model_id=model)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        gen = handle.forward.remote(request.method, path, request.url.query, headers, body)
        try:
            start = await gen.__anext__()
        except Exception as exc:
            gen.cancel()
            return self._unavailable(exc, model)
        if not isinstance(start, tuple):  # (the engine answers a start first, always)
            gen.cancel()
            return _openai_error(500, "internal error: the engine replica answered out of order", "server_error")
        status, raw = start
        out = {k: v for k, v in raw if k.lower() not in _HOP_HEADERS}
        if out.get("content-type", "").startswith("text/event-stream"):
            async def rest() -> AsyncIterator[bytes]:
                try:
                    async for chunk in gen:
                        yield chunk
                except Exception as exc:  # (a replica lost mid-stream: the client sees the stream end)
                    logger.warning("the stream for %s broke: %s", model, exc)
                finally:
                    gen.cancel()

            return StreamingResponse(rest(), status_code=status, headers=out)
        try:
            content = b"".join([chunk async for chunk in gen])
        except Exception as exc:
            return self._unavailable(exc, model)
        return Response(content, status_code=status, headers=out)

    @staticmethod
    def _unavailable(exc: Exception, model: str | None) -> Response:
        from ray.serve.exceptions import BackPressureError

        retry = {"Retry-After": str(defaults.SERVE_RETRY_AFTER)}
        if isinstance(exc, BackPressureError):
            return _openai_error(429, "every engine replica is full (max_queued_requests); retry later",
                                 "rate_limit_error", headers=retry)
        logger.warning("no engine replica answered for %s: %s: %s", model, type(exc).__name__, exc)
        return _openai_error(503, f"no engine replica could answer: {type(exc).__name__}: {exc}"[:500],
                             "server_error", headers=retry)


# --------------------------------------------------------------------------------------------- builders
def build_app(
    home: str | os.PathLike[str] | None = None,
    names: Sequence[str] = (),
    *,
    device: str = defaults.SERVE_DEVICE,
    dtype: str | None = None,
    max_batch: int = defaults.SERVE_MAX_BATCH,
    max_waiting: int = defaults.SERVE_MAX_WAITING,
    max_context: int | None = None,
    memory_budget: int | str | None = None,
    api_key: str | None = None,
    pull: bool = False,
    max_models: int = DEFAULT_MAX_MODELS,
    num_replicas: int | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float | None = None,
    max_ongoing_requests: int | None = None,
    ingress_replicas: int = 1,
    json_logs: bool = False,
    engine: str = defaults.SERVE_ENGINE,
    engine_args: Sequence[str] = (),
) -> Any:
    """The Ray Serve application (``serve.run(build_app(...))``): an ingress and engine replicas.
    ``engine="vllm"``: each replica runs vLLM with deltahub's plug-in (:class:`DeltahubVLLMEngine`:
    ``names`` = one base and fine-tunes of it; ``engine_args`` go to vLLM), else deltahub's own.

    ``home``: the store (default ``$DELTAHUB_HOME``, else deltahub's default); it must be readable
    at that path on every node. ``names``: the models served (none: every stored model). ``device``,
    ``dtype``, ``max_batch``, ``max_waiting``, ``max_context``, ``memory_budget`` (bytes or
    ``"20GB"``), ``api_key`` (default ``$DELTAHUB_API_KEY``), ``pull``: as ``deltahub serve``, per
    engine replica. ``max_models``: model ids one replica holds (Ray's multiplexing LRU).
    ``num_replicas`` (default 1) or ``autoscaling_config`` (e.g. ``{"min_replicas": 1,
    "max_replicas": 4, "target_ongoing_requests": 8}``; ``target_ongoing_requests`` defaults to
    ``max_batch``): engine replicas. ``num_cpus``/``num_gpus``
    per engine replica (``num_gpus`` default: 1 on CUDA, else 0). ``max_ongoing_requests`` per engine
    replica (default ``2 * max_batch``).

    Raises:
        InputError: an argument out of range.
    """
    if num_replicas is not None and autoscaling_config is not None:
        raise InputError("num_replicas and autoscaling_config were both given",
                         "pass one: a fixed number of engine replicas, or Ray's autoscaling config")
    for what, value, least in (("max_batch", max_batch, 1), ("max_waiting", max_waiting, 0),
                               ("max_models", max_models, 1), ("ingress_replicas", ingress_replicas, 1),
                               ("num_replicas", num_replicas, 1), ("max_ongoing_requests", max_ongoing_requests, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(f"{what} must be an integer of at least {least}, got {value!r}", f"pass {what}=N")
    if home is None:
        home = os.environ.get("DELTAHUB_HOME") or None
    if api_key is None:
        api_key = os.environ.get("DELTAHUB_API_KEY") or None
    budget = parse_size(memory_budget) if memory_budget is not None else None
    if num_gpus is None:
        num_gpus = 1.0 if device.startswith("cuda") else 0.0
    options: dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests or 2 * max_batch,
                               "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if autoscaling_config is not None:  # (a replica batches max_batch requests: the default target)
        options["autoscaling_config"] = {"target_ongoing_requests": max_batch, **autoscaling_config}
    else:
        options["num_replicas"] = num_replicas or 1
    if engine not in defaults.SERVE_ENGINES:
        raise InputError(f"unknown engine {engine!r}", f"use {' or '.join(defaults.SERVE_ENGINES)}")
    if engine == "vllm":
        replicas = DeltahubVLLMEngine.options(**options).bind(
            home=None if home is None else os.fspath(home), names=list(names), dtype=dtype, max_batch=max_batch,
            max_context=max_context, api_key=api_key, pull=pull, max_models=max_models, engine_args=list(engine_args),
            json_logs=json_logs)
    else:
        if engine_args:
            raise InputError("engine_args go with engine=vllm", "leave them out, or pass engine=vllm")
        replicas = DeltahubEngine.options(**options).bind(
            home=None if home is None else os.fspath(home), names=list(names), device=device, dtype=dtype,
            max_batch=max_batch, max_waiting=max_waiting, max_context=max_context, memory_budget=budget,
            api_key=api_key, pull=pull, max_models=max_models, json_logs=json_logs,
        )
    ingress = DeltahubIngress.options(num_replicas=ingress_replicas, max_ongoing_requests=1000,
                                      ray_actor_options={"num_cpus": 0})
    return ingress.bind(replicas)


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_ARGS: dict[str, Callable[[Any], Any]] = {
    "home": str, "device": str, "dtype": str, "api_key": str, "memory_budget": str,
    "names": lambda v: [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else list(v),
    "max_batch": int, "max_waiting": int, "max_context": int, "max_models": int, "num_replicas": int,
    "max_ongoing_requests": int, "ingress_replicas": int, "num_cpus": float, "num_gpus": float,
    "pull": lambda v: v if isinstance(v, bool) else _flag(str(v)),
    "json_logs": lambda v: v if isinstance(v, bool) else _flag(str(v)),
    "autoscaling_config": lambda v: json.loads(v) if isinstance(v, str) else dict(v),
    "engine": str,
    "engine_args": lambda v: [a for a in v.split(" ") if a] if isinstance(v, str) else list(v),
}


def build(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder: ``serve run deltahub.integrations.ray:app key=value ...``
    (values are strings there: ``names=a,b``, ``autoscaling_config='{"max_replicas": 4}'``), or the
    ``args:`` of a Serve config file. See :func:`build_app` for the keys."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise InputError(f"unknown argument(s) for deltahub's Ray Serve app: {', '.join(unknown)}",
                         f"use: {', '.join(sorted(_ARGS))}")
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if value is None:
            continue
        try:
            kwargs[key] = _ARGS[key](value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad value for {key}: {value!r} ({exc})",
                             'e.g. max_batch=8, names=a,b, autoscaling_config=\'{"max_replicas": 4}\'') from None
    if "autoscaling_config" in kwargs and not isinstance(kwargs["autoscaling_config"], dict):
        raise InputError("autoscaling_config must be a JSON object", 'e.g. autoscaling_config=\'{"max_replicas": 4}\'')
    return build_app(**kwargs)


app = build
"""``serve run deltahub.integrations.ray:app home=... names=...`` (Ray calls it with the args)."""
