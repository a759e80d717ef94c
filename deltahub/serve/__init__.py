"""``deltahub serve``: an OpenAI-compatible server for many fine-tunes on one base.

:func:`run` serves a :class:`~deltahub.ops.pool.ModelPool` with uvicorn until SIGINT/SIGTERM: it then
stops accepting connections, lets the requests in flight finish for ``grace`` seconds, cancels the
rest and returns (the CLI exits 0). See :mod:`deltahub.serve.app` for the routes.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from deltahub import defaults

__all__ = ["JsonFormatter", "configure_logging", "run"]

CANCEL_BEFORE_GRACE_S = 1.0  # seconds before the end of --grace at which requests still running are cancelled

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(json_logs: bool) -> None:
    """Server logs (startup lines, one access line per request) on stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("deltahub", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO)
        log.propagate = False


def bind(host: str, port: int) -> Any:
    """A listening socket on ``host:port`` (``port`` 0: any free port), or a clear error."""
    import socket

    from deltahub.errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot serve on host {host!r}: {exc.strerror}", "pass --host 127.0.0.1 or an address of this machine") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "pick a free port with --port (another server may be running)") from None
    sock.set_inheritable(True)
    return sock


def run(
    pool: Any,
    sock: Any,
    api_key: str | None = None,
    grace: float = defaults.SERVE_GRACE_SECONDS,
    max_waiting: int = defaults.SERVE_MAX_WAITING,
) -> None:
    """Serve ``pool`` on the listening socket ``sock`` (from :func:`bind`, taken before the models
    load, so a port in use fails at once) until SIGINT/SIGTERM, then drain for ``grace`` seconds.
    The caller closes the pool."""
    import uvicorn

    from deltahub.serve.app import create_app

    app = create_app(pool, api_key=api_key, max_waiting=max_waiting)
    # connections beyond this get 503 from uvicorn before anything is read (the app's own admission
    # answers 429 well below it; /health and /v1/models need some room beside the requests)
    limit = 2 * (pool.max_batch + max_waiting) + 32
    config = uvicorn.Config(app, access_log=False, log_config=None,
                            timeout_graceful_shutdown=grace, lifespan="off", limit_concurrency=limit)
    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a drained shutdown exits 0 (uvicorn re-raises the signal)
            if first or self.force_exit:
                # the requests still running just before the grace period ends are cancelled by the
                # engines, so their clients get a proper end ("abort", then [DONE]) before uvicorn
                # closes the connections; a second Ctrl-C cancels them at once
                delay = 0.0 if self.force_exit else max(0.0, grace - CANCEL_BEFORE_GRACE_S)
                timer = threading.Timer(delay, pool.cancel_all)
                timer.daemon = True
                timer.start()

    server = _Server(config)
    host, port = sock.getsockname()[:2]
    logging.getLogger("deltahub.serve").info(
        "serving %d model(s) on http://%s:%d/v1%s", len(pool.served), f"[{host}]" if ":" in host else host, port,
        " (API key required)" if api_key else "")
    server.run(sockets=[sock])
