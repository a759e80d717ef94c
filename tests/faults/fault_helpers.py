"""Helpers of the fault-injection suite (``tests/faults``): a warmed-up "zygote" that forks the
processes the tests kill, and the checks run after every kill.

The zygote
----------
A long-lived helper process (one per test module) that has already imported torch, transformers,
huggingface_hub and every deltahub module the operations use. For each request it forks one child
per job; a child runs its operation in-process (the CLI through ``cli.main(args,
standalone_mode=False)``, or a Python function) and exits with the command's exit code. The zygote
sends SIGKILL to a child when its ``kill_after`` delay (measured from the fork) has passed, reaps it
and reports how it ended. Forking a warmed-up process means a kill lands in real work, not in the
seconds of imports a fresh interpreter would spend first.

Protocol: one JSON request per line on the zygote's stdin, one JSON reply per line on its stdout.
Children write their stdout/stderr to a log file per job (``job["log"]``) and their result as JSON to
``job["result"]`` (written only when the job completes, so a killed job has none).

The checks
----------
``store_state`` / ``check_store`` (run in the test process): ``verify`` passes, names point where
the test allows, and every name materializes to the reference bytes of its manifest (a digest of
every file of a clean materialization).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typing import Any

FAULTS_DIR = Path(__file__).resolve().parent
TESTS_DIR = FAULTS_DIR.parent
REPO_ROOT = TESTS_DIR.parent

#: Base seed of every random choice of the suite (a failure prints the trial's own seed);
#: ``DELTAHUB_FAULTS_SEED`` overrides it to explore other kill moments.
BASE_SEED = int(os.environ.get("DELTAHUB_FAULTS_SEED", "90210"))

#: Environment variables the ``hub_server`` fixture sets or removes (tests/hub_fixtures.py).
HUB_ENV_KEYS = (
    "HF_ENDPOINT",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_XET",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_TOKEN",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_DISABLE_UPDATE_CHECK",
)
HUB_ENV_REMOVED = ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE")

#: Modules the zygote imports before forking (what the operations would otherwise import lazily).
WARM_MODULES = (
    "torch",
    "numpy",
    "safetensors",
    "safetensors.torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "tokenizers",
    "huggingface_hub",
    "huggingface_hub.hf_api",
    "huggingface_hub.file_download",
    "huggingface_hub._snapshot_download",
    "sqlalchemy",
    "sqlalchemy.dialects.sqlite",
    "alembic",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "zstandard",
    "click",
    "deltahub",
    "deltahub.api",
    "deltahub.cli",
    "deltahub.ops.add",
    "deltahub.ops.compress",
    "deltahub.ops.calibrate",
    "deltahub.ops.materialize",
    "deltahub.ops.manage",
    "deltahub.ops.pull",
    "deltahub.ops.push",
    "deltahub.ops.load",
    "deltahub.calibrate.distill",
    "deltahub.calibrate.targets",
    "deltahub.calibrate.data",
    "deltahub.runtime",
    "deltahub.hub.layout",
    "deltahub.hub.transfer",
    "deltahub.hub.source",
    "deltahub.hub.card",
    "pytest",
    "hub_fixtures",
)


# ============================================================================ the zygote (child side)
def _write_json_atomic(path: str, data: Any) -> None:
    part = f"{path}.part"
    with open(part, "w", encoding="utf-8") as fh:
        json.dump(data, fh, default=str)
    os.replace(part, path)


def _apply_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _patch_hub(hub: dict[str, str]) -> None:
    """Point the already-imported huggingface_hub at the test's Hub, as the fixture does."""
    import pytest
    from hub_fixtures import _close_client_session, _patch_client

    _patch_client(pytest.MonkeyPatch(), hub["url"], hub["hf_home"])
    _close_client_session()


def run_cli(args: list[str]) -> dict[str, Any]:
    """Run the deltahub CLI in this process: ``{"rc": exit code, "stdout": what it printed}``."""
    from deltahub.cli import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(list(args), prog_name="deltahub", standalone_mode=False)
    return {"rc": rc if isinstance(rc, int) else 0, "stdout": out.getvalue()}


def cli_killed_at(args: list[str], point: str) -> dict[str, Any]:
    """Run the CLI, but SIGKILL this process at a chosen moment (``point``):

    * ``index-base`` / ``index-delta``: the first ``StoreContext.register`` of such a manifest, right
      after the batch's objects (the manifest object included) were renamed into ``objects/`` and
      before any index row is written;
    * ``materialize-rename``: when materialize renames its complete ``.OUT.deltahub-tmp-*`` folder
      into place;
    * ``push-commit``: when push makes its Hub commit (files staged in ``tmp/`` and uploaded).
    """

    def die(*_args: Any, **_kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point.startswith("index-"):
        from deltahub.ops.context import StoreContext

        kind = point.removeprefix("index-")
        real = StoreContext.register

        def register(self, manifest, *a, **kw):
            if manifest.kind.value == kind:
                self.objects.flush()  # what register does first: objects durable and in place
                die()
            return real(self, manifest, *a, **kw)

        StoreContext.register = register
    elif point == "materialize-rename":
        for fname in ("rename", "replace"):
            real_fn = getattr(os, fname)

            def renaming(src, dst, *a, real_fn=real_fn, **kw):
                if ".deltahub-tmp-" in os.fspath(src):
                    die()
                return real_fn(src, dst, *a, **kw)

            setattr(os, fname, renaming)
    elif point == "push-commit":
        from huggingface_hub import HfApi

        HfApi.create_commit = die
    else:
        raise ValueError(f"unknown kill point {point!r}")
    return run_cli(args)


def _resolve(target: str):
    module, _, name = target.partition(":")
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name)


def _child(job: dict[str, Any]) -> None:
    """Body of a forked child: run ``job`` and ``os._exit`` with its exit code. Never returns."""
    code = 70
    try:
        log_fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Import the target first: a test module imports conftest, which sets HF_HUB_OFFLINE=1.
        func = _resolve(job["target"]) if job["kind"] == "call" else None
        _apply_env(job.get("env") or {})
        if job.get("hub"):
            _patch_hub(job["hub"])
        if func is None:
            result = run_cli(job["args"])
        else:
            result = {"rc": 0, "value": func(**(job.get("kwargs") or {}))}
        code = int(result["rc"])
        _write_json_atomic(job["result"], result)
    except BaseException as exc:  # noqa: BLE001 - report everything, then exit
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        with contextlib.suppress(BaseException):
            _write_json_atomic(job["result"], {"rc": 70, "error": repr(exc), "traceback": tb})
        code = 70
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_jobs(jobs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Fork one child per job, SIGKILL those whose ``kill_after`` passes, reap all; returns one
    report per job (in order)."""
    running: list[dict[str, Any]] = []
    for job in jobs:
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _child(job)
        running.append({"job": job, "pid": pid, "t0": t0, "pidfd": os.pidfd_open(pid), "kill_sent": None})
    deadline = min(r["t0"] for r in running) + timeout
    poller = select.poll()
    by_fd = {}
    for r in running:
        poller.register(r["pidfd"], select.POLLIN)
        by_fd[r["pidfd"]] = r
    reports: dict[int, dict[str, Any]] = {}
    timed_out: set[int] = set()
    while len(reports) < len(running):
        now = time.monotonic()
        wake = deadline
        for r in running:
            if r["pid"] in reports:
                continue
            after = r["job"].get("kill_after")
            if after is not None and r["kill_sent"] is None:
                if now >= r["t0"] + after:
                    os.kill(r["pid"], signal.SIGKILL)  # a zombie ignores it: its status says so
                    r["kill_sent"] = now - r["t0"]
                else:
                    wake = min(wake, r["t0"] + after)
        if now >= deadline:
            for r in running:
                if r["pid"] not in reports and r["pid"] not in timed_out:
                    os.kill(r["pid"], signal.SIGKILL)
                    timed_out.add(r["pid"])
            wake = now + 30  # they are being killed; reaping follows
        for fd, _ev in poller.poll(max(0.0, wake - time.monotonic()) * 1000):
            r = by_fd[fd]
            if r["pid"] in reports:
                continue
            _pid, status = os.waitpid(r["pid"], 0)
            elapsed = time.monotonic() - r["t0"]
            poller.unregister(fd)
            os.close(fd)
            signaled = os.WIFSIGNALED(status)
            result = None
            with contextlib.suppress(OSError, ValueError):
                result = json.loads(Path(r["job"]["result"]).read_text(encoding="utf-8"))
            reports[r["pid"]] = {
                "pid": r["pid"],
                "elapsed": elapsed,
                "signal": os.WTERMSIG(status) if signaled else None,
                "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "killed": signaled and os.WTERMSIG(status) == signal.SIGKILL and r["pid"] not in timed_out,
                "timed_out": r["pid"] in timed_out,
                "kill_sent": r["kill_sent"],
                "result": result,
            }
    return [reports[r["pid"]] for r in running]


def _warm_sqlalchemy() -> None:
    """Configure the ORM and compile a query per table (SQLAlchemy's first compile in a process costs
    ~0.25 s of lazy set-up, which would otherwise be most of a tiny operation). No database is opened."""
    from sqlalchemy import select
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.orm import configure_mappers

    from deltahub.index import models

    configure_mappers()
    for mapper in models.Base.registry.mappers:
        str(select(mapper.class_).compile(dialect=sqlite.dialect()))


def zygote_main() -> None:
    """Entry point of the zygote process (see the module docstring)."""
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    _warm_sqlalchemy()
    import torch

    # Tiny models: one thread is faster on the shared cores, and no thread pool exists at fork time.
    torch.set_num_threads(1)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            if request["cmd"] == "run":
                reply = {"ok": True, "reports": _run_jobs(request["jobs"], float(request["timeout"]))}
            elif request["cmd"] == "ping":
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        except Exception as exc:  # noqa: BLE001 - tell the test, keep serving
            reply = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        out.write(json.dumps(reply, default=str) + "\n")
        out.flush()


# ============================================================================ the zygote (test side)
@dataclass
class JobReport:
    """How one forked job ended."""

    pid: int
    elapsed: float
    killed: bool
    timed_out: bool
    exit_code: int | None
    signal: int | None
    kill_sent: float | None
    result: dict[str, Any] | None
    log: Path

    @property
    def rc(self) -> int | None:
        """The command's exit code (None when it was killed or timed out)."""
        return self.exit_code

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def describe(self) -> str:
        how = (
            "timed out" if self.timed_out
            else f"killed (SIGKILL sent at {self.kill_sent:.3f}s)" if self.killed and self.kill_sent is not None
            else "killed by SIGKILL" if self.killed
            else f"signal {self.signal}" if self.signal is not None
            else f"exit {self.exit_code}"
        )
        return f"pid {self.pid}: {how} after {self.elapsed:.3f}s; log {self.log}:\n{self.log_tail()}"


class Zygote:
    """Test-side handle of a zygote process (start with :func:`start_zygote`)."""

    def __init__(self, proc: subprocess.Popen, work: Path) -> None:
        self.proc = proc
        self.work = work
        self._buf = b""
        self._n = 0

    def _send(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the zygote exited ({self.proc.returncode}): {self.stderr_tail()}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._read_reply(timeout)

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from the zygote in {timeout:.0f}s: {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the zygote died: {self.stderr_tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if reply.get("ok") is False:
            raise RuntimeError(f"zygote error: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def stderr_tail(self) -> str:
        try:
            return (self.work / "zygote.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def job(
        self,
        *,
        args: list[str] | None = None,
        target: str | None = None,
        kwargs: dict[str, Any] | None = None,
        env: dict[str, str | None] | None = None,
        hub: dict[str, str] | None = None,
        kill_after: float | None = None,
        tag: str = "job",
    ) -> dict[str, Any]:
        """A job description: a CLI command (``args``) or a function ``"module:name"`` (``target``)."""
        self._n += 1
        stem = self.work / f"{self._n:05d}-{tag}"
        job: dict[str, Any] = {
            "kind": "cli" if args is not None else "call",
            "log": f"{stem}.log",
            "result": f"{stem}.json",
            "env": env or {},
            "hub": hub,
            "kill_after": kill_after,
        }
        if args is not None:
            job["args"] = [str(a) for a in args]
        else:
            job["target"], job["kwargs"] = target, kwargs or {}
        return job

    def run(self, jobs: list[dict[str, Any]], timeout: float) -> list[JobReport]:
        """Fork ``jobs`` at once and wait for all of them (each killed after ``timeout`` at most)."""
        reply = self._send({"cmd": "run", "jobs": jobs, "timeout": timeout}, timeout + 60)
        return [
            JobReport(
                pid=r["pid"], elapsed=r["elapsed"], killed=r["killed"], timed_out=r["timed_out"],
                exit_code=r["exit_code"], signal=r["signal"], kill_sent=r["kill_sent"], result=r["result"],
                log=Path(job["log"]),
            )
            for r, job in zip(reply["reports"], jobs)
        ]

    def run_one(self, timeout: float = 120, **job: Any) -> JobReport:
        return self.run([self.job(**job)], timeout)[0]

    def cli(self, home: Path, *args: Any, timeout: float = 120, **job: Any) -> JobReport:
        """Run ``deltahub --home HOME ARGS`` in a forked child (not killed unless ``kill_after``)."""
        return self.run_one(timeout=timeout, args=["--home", str(home), *map(str, args)], **job)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_zygote(work: Path, timeout: float = 300) -> Zygote:
    """Start a zygote (imports take a while on a busy machine; waits up to ``timeout`` s)."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(FAULTS_DIR), str(TESTS_DIR), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["DELTAHUB_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("DELTAHUB_HOME", None)
    with open(work / "zygote.log", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import fault_helpers; fault_helpers.zygote_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=str(REPO_ROOT),
        )
    zygote = Zygote(proc, work)
    try:
        ready = zygote._read_reply(timeout)
    except BaseException:
        zygote.close()
        raise
    assert ready.get("ready"), ready
    return zygote


@pytest.fixture(scope="module")
def zygote(request, tmp_path_factory) -> Iterator[Zygote]:
    """A warmed-up process for this test module (forks one child per job); closed at the end."""
    z = start_zygote(tmp_path_factory.mktemp(f"zygote-{request.module.__name__}"))
    yield z
    z.close()


def hub_job_settings(server, hf_home: Path | None = None) -> tuple[dict[str, str | None], dict[str, str]]:
    """(env, hub) for a job that talks to the ``hub_server`` fixture's Hub, optionally with its own
    ``HF_HOME``. Read after the fixture has set the test process's environment."""
    env: dict[str, str | None] = {k: os.environ[k] for k in HUB_ENV_KEYS if k in os.environ}
    env.update({k: None for k in HUB_ENV_REMOVED})
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
        env["HF_HUB_CACHE"] = str(Path(hf_home) / "hub")
    return env, {"url": server.url, "hf_home": str(env["HF_HOME"])}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (for stale temp files)."""
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=30)
    return proc.pid


# ============================================================================ checks
def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def names_of(home: Path) -> dict[str, str]:
    """name -> manifest id of every name in the store at ``home``."""
    import deltahub

    with deltahub.Store(home) as store:
        return {row["name"]: row["manifest_id"] for row in store.list()}


def materialized_digest(store, name: str, out: Path) -> dict[str, str]:
    if out.exists():
        shutil.rmtree(out)
    store.materialize(name, out)
    try:
        return tree_digest(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@dataclass
class References:
    """Reference bytes per manifest id (a digest of a clean materialization)."""

    digests: dict[str, dict[str, str]] = field(default_factory=dict)

    def learn(self, home: Path, work: Path) -> dict[str, str]:
        """Materialize every name of ``home`` (a store built by clean runs); returns name -> manifest."""
        import deltahub

        names = names_of(home)
        with deltahub.Store(home) as store:
            for name, mid in names.items():
                digest = materialized_digest(store, name, work / f"ref-{name}")
                assert digest, f"{name} materialized to nothing"
                if mid in self.digests:
                    assert self.digests[mid] == digest, f"two clean materializations of {mid[:12]} differ"
                self.digests[mid] = digest
        return names


def check_store(
    home: Path,
    refs: References,
    allowed: dict[str, Iterable[str | None]],
    work: Path,
    extra_names_ok: bool = False,
    verify: bool = True,
) -> dict[str, str]:
    """``verify`` passes; every name in ``allowed`` points at one of its allowed manifest ids (None:
    the name may be absent); no other name exists (unless ``extra_names_ok``); every name present
    materializes to the reference bytes of its manifest. Returns name -> manifest id.
    ``verify=False``: the caller has just verified the store itself."""
    import deltahub

    with deltahub.Store(home) as store:
        if verify:
            report = store.verify()
            assert report.ok, f"verify found problems: {report.problems}"
        names = {row["name"]: row["manifest_id"] for row in store.list()}
        for name, options in allowed.items():
            options = set(options)
            got = names.get(name)
            assert got in options, (
                f"name {name!r} points at {got and got[:12]}, expected one of "
                f"{sorted((o or 'absent')[:12] for o in options)}"
            )
        if not extra_names_ok:
            unexpected = set(names) - set(allowed)
            assert not unexpected, f"unexpected names {sorted(unexpected)}"
        for name, mid in sorted(names.items()):
            assert mid in refs.digests, f"{name!r} points at {mid[:12]}, which no clean run produced"
            got = materialized_digest(store, name, work / f"check-{name}")
            assert got == refs.digests[mid], f"{name!r} ({mid[:12]}) does not materialize to the reference bytes"
    return names


def tmp_leftovers(home: Path) -> list[str]:
    """Everything left in the store's ``tmp/`` (files and folders, recursively)."""
    tmp = Path(home) / "tmp"
    if not tmp.is_dir():
        return []
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def output_leftovers(out: Path) -> list[str]:
    """Temporary siblings of a materialize output folder (``.OUT.deltahub-*``)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.deltahub-"))


def reset_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def copy_store(template: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(template, dst)
    return dst
