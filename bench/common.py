"""Shared helpers for deltahub's benchmarks (``bench/size.py``, ``speed.py``, ``memory.py``).

* a synthetic Llama-style tensor layout (HF ``LlamaForCausalLM`` names and shapes) and a
  deterministic generator of (base, fine-tune) fp16 tensor pairs: the fine-tune is the base plus
  small Gaussian noise, so every tensor changes, as in a real full fine-tune;
* writing such a pair as two HF-style checkpoint folders (sharded like ``save_pretrained``) with
  the library's own safetensors writer, streaming one tensor at a time;
* timing (median of repeats), peak RSS of a child process (``os.wait4``), a scratch work folder
  that is deleted at the end unless ``--keep``, and results output (table on stdout, a final JSON
  line, ``bench/results/<name>.json``).

Progress goes to stderr (``log``); results go to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from deltahub.store.objects import tree_bytes  # noqa: F401 - one directory walker, used by the benches

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
_T0 = time.perf_counter()

GB = 1e9
MB = 1e6


# ---------------------------------------------------------------------------------------- output
def log(msg: str) -> None:
    """A progress line on stderr, stamped with seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def scorer(tokens: torch.Tensor) -> Callable[..., object]:
    """``scored(label, loader, **kw)``: :func:`deltahub.calibrate.targets.score_model` of the model
    ``loader()`` on held-out ``tokens`` (batches of 4, CPU), its perplexity, KL and time logged."""
    from deltahub.calibrate.targets import score_model

    def scored(label: str, loader: Callable[[], object], **kw: object) -> object:
        t0 = time.perf_counter()
        stats = score_model(loader, tokens, 4, "cpu", desc=label, **kw)
        log(f"{label}: ppl {stats.perplexity:.3f}" + (f", KL {stats.mean_kl:.4f}" if stats.mean_kl is not None else "")
            + f" ({time.perf_counter() - t0:.0f} s)")
        return stats

    return scored


def setup_torch(threads: int = 2) -> None:
    torch.set_num_threads(threads)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def machine_info() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_at_end": list(os.getloadavg()),
    }


def write_results(name: str, data: dict) -> Path:
    """Write ``bench/results/<name>.json`` and print ``data`` as the final JSON line of stdout."""
    data = dict(data)
    data.setdefault("benchmark", name)
    data.setdefault("machine", machine_info())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(json.dumps(data, sort_keys=True), flush=True)
    log(f"results written to {path}")
    return path


# ---------------------------------------------------------------------------------------- workdir
def add_workdir_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder under which a scratch folder is created (default: the system temp dir, /tmp)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder at the end")


@contextmanager
def scratch_dir(name: str, parent: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh folder ``<parent>/deltahub-bench-<name>-XXXX``, removed at the end unless ``keep``."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"deltahub-bench-{name}-", dir=parent))
    log(f"workdir {path}")
    try:
        yield path
    finally:
        if keep:
            log(f"kept workdir {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed workdir {path}")


def drop_dirty_pages() -> None:
    """Flush dirty pages to disk so a previous step's writeback does not slow the next timing."""
    os.sync()


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-style decoder (HF ``LlamaForCausalLM``)."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    vocab: int = 32000
    heads: int = 32
    kv_heads: int | None = None  # None: same as heads (no GQA)
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * self.head_dim

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order HF's ``state_dict`` lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def n_params(self) -> int:
        return sum(math.prod(s) for _n, s in self.tensors())

    def largest_tensor_numel(self) -> int:
        return max(math.prod(s) for _n, s in self.tensors())

    def config(self, dtype: str = "float16") -> dict:
        """A ``config.json`` for this layout (Llama-2 style)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads or self.heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": dtype,
            "vocab_size": self.vocab,
        }

    def describe(self) -> str:
        return (
            f"Llama layout: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"vocab {self.vocab}, kv_dim {self.kv_dim}, "
            f"{'tied' if self.tie_embeddings else 'untied'} embeddings: {self.n_params() / 1e9:.3f} B params, "
            f"{fmt_bytes(2 * self.n_params())} in fp16"
        )


LLAMA2_7B = LlamaShape()


def add_layout_args(parser: argparse.ArgumentParser, default: LlamaShape) -> None:
    g = parser.add_argument_group("synthetic model layout")
    g.add_argument("--hidden", type=int, default=default.hidden)
    g.add_argument("--intermediate", type=int, default=default.intermediate)
    g.add_argument("--layers", type=int, default=default.layers)
    g.add_argument("--vocab", type=int, default=default.vocab)
    g.add_argument("--heads", type=int, default=default.heads)
    g.add_argument("--kv-heads", type=int, default=default.kv_heads)
    g.add_argument("--tie-embeddings", action="store_true", default=default.tie_embeddings)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--noise",
        type=float,
        default=1e-3,
        help="std of the fine-tune's change (base weights have std 0.02)",
    )


def layout_from_args(args: argparse.Namespace) -> LlamaShape:
    return LlamaShape(
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        tie_embeddings=args.tie_embeddings,
    )


BASE_STD = 0.02


def synth_pair(
    name: str, shape: tuple[int, ...], seed: int = 0, noise: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic fp16 (base, fine-tune) tensors for ``name``.

    2-D weights: base ~ N(0, 0.02²); 1-D (RMSNorm) weights: base ~ 1 + N(0, 0.02²). The fine-tune
    is ``fp16(base + N(0, noise²))``. Depends only on (name, shape, seed, noise).
    """
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    base = torch.empty(shape, dtype=torch.float16)
    base.normal_(0.0, BASE_STD, generator=gen)
    if len(shape) == 1:
        base.add_(1.0)
    ft = torch.empty(shape, dtype=torch.float16)
    ft.normal_(0.0, noise, generator=gen)
    ft.add_(base)
    return base, ft


def write_checkpoint_pair(
    layout: LlamaShape,
    base_dir: Path,
    ft_dir: Path,
    seed: int = 0,
    noise: float = 1e-3,
    max_shard_bytes: int = 5 * 10**9,
) -> None:
    """Write synthetic fp16 base and fine-tune checkpoints (config.json + safetensors shards).

    Uses the library's :class:`SafetensorsWriter` and HF shard naming/indexing; one tensor pair
    in memory at a time.
    """
    from deltahub.formats.hf_writer import plan_shards, shard_file_names
    from deltahub.formats.safetensors_io import SafetensorsWriter, TensorSpec

    specs = [TensorSpec(n, torch.float16, s) for n, s in layout.tensors()]
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards))
    total = sum(s.nbytes for s in specs)
    done = 0
    last_log = time.perf_counter()
    for d in (base_dir, ft_dir):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(layout.config(), indent=2, sort_keys=True) + "\n")
    for file_name, shard in zip(names, shards):
        with SafetensorsWriter(base_dir / file_name, shard, metadata={"format": "pt"}) as wb, SafetensorsWriter(
            ft_dir / file_name, shard, metadata={"format": "pt"}
        ) as wf:
            for spec in shard:
                base, ft = synth_pair(spec.name, spec.shape, seed, noise)
                wb.write(spec.name, base)
                wf.write(spec.name, ft)
                del base, ft
                done += spec.nbytes
                if time.perf_counter() - last_log > 15:
                    log(f"  writing checkpoints: {done / total:.0%} of {fmt_bytes(total)} each")
                    last_log = time.perf_counter()
    if len(shards) > 1:
        weight_map = {spec.name: fname for fname, shard in zip(names, shards) for spec in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        for d in (base_dir, ft_dir):
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_json(self) -> dict:
        return {"median_s": self.median, "times_s": self.times}


def time_repeats(
    fn: Callable[[int], object],
    repeats: int,
    before: Callable[[int], object] | None = None,
    after: Callable[[int], object] | None = None,
    label: str = "",
) -> Timing:
    """Wall time of ``fn(i)`` for ``i in range(repeats)``; ``before``/``after`` run untimed."""
    times = []
    for i in range(repeats):
        if before is not None:
            before(i)
        gc.collect()
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        times.append(dt)
        if label:
            log(f"  {label} #{i + 1}/{repeats}: {dt:.2f} s")
        if after is not None:
            after(i)
    return Timing(times)


def profile_top(fn: Callable[[], object], top: int = 8, label: str = "") -> list[dict]:
    """Run ``fn`` under cProfile; print the ``top`` functions by cumulative time to stderr."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative")
    buf = io.StringIO()
    stats.stream = buf
    # Skip the profiled lambda / wrapper frames of this module at the top.
    stats.print_stats(top + 4)
    print(f"\n--- cProfile: {label} (top by cumulative time) ---", file=sys.stderr)
    print(buf.getvalue().split("\n", 4)[-1].strip("\n"), file=sys.stderr, flush=True)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if fname == __file__ or func == "<lambda>":
            continue
        rows.append({"function": f"{Path(fname).name}:{line}({func})", "ncalls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["cumtime_s"])
    return rows[:top]


# ---------------------------------------------------------------------------------------- RSS
@dataclass
class ChildRun:
    returncode: int
    max_rss_bytes: int
    wall_s: float
    stdout: str
    stderr: str
    method: str
    wait4_max_rss_bytes: int


TIME_BIN = "/usr/bin/time"


def run_child(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> ChildRun:
    """Run ``cmd`` to completion; return its peak RSS and output.

    Peak RSS comes from GNU ``/usr/bin/time -f %M`` when available: ``time`` is a small process
    that forks and waits for ``cmd``, so the figure is ``cmd``'s own. ``os.wait4`` on a direct
    child is recorded too but is NOT used when ``time`` exists, because Linux starts an exec'd
    child's ``ru_maxrss`` at the RSS high-water mark of the process that spawned it (the
    ``vfork``ed parent's mm), so a benchmark that has ever held 600 MB would report >= 600 MB for
    every child.
    """
    full_env = dict(os.environ)
    full_env.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")
    if env:
        full_env.update(env)
    use_time = os.access(TIME_BIN, os.X_OK)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile(
        "r", suffix=".rss"
    ) as rss_file:
        full_cmd = [TIME_BIN, "-f", "%M", "-o", rss_file.name, *cmd] if use_time else cmd
        proc = subprocess.Popen(full_cmd, stdout=out, stderr=err, env=full_env, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        time_kb = None
        if use_time:
            lines = [ln for ln in rss_file.read().splitlines() if ln.strip()]
            if lines and lines[-1].strip().isdigit():
                time_kb = int(lines[-1].strip())
    # Linux reports ru_maxrss in KiB (macOS in bytes); GNU time's %M is KiB too.
    scale = 1 if sys.platform == "darwin" else 1024
    wait4_rss = usage.ru_maxrss * scale
    if time_kb is not None:
        return ChildRun(proc.returncode, time_kb * 1024, wall, stdout, stderr, "/usr/bin/time %M", wait4_rss)
    return ChildRun(proc.returncode, wait4_rss, wall, stdout, stderr, "os.wait4 ru_maxrss", wait4_rss)


def python_child(code: str, *argv: str) -> list[str]:
    """``[python, -c, code, *argv]`` with the interpreter running this script."""
    return [sys.executable, "-c", code, *argv]


def write_noisy_finetune(base_dir: Path, out_dir: Path, seed: int, noise: float,
                         only: Callable[[str], bool] | None = None) -> Path:
    """``out_dir``: ``base_dir``'s files with ``model.safetensors`` replaced by the base plus
    N(0, noise²) on every tensor (generator seeded with ``seed``): a synthetic full fine-tune.
    ``only``: change just the tensors it accepts (by name); the others stay the base's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(base_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if only is not None and not only(name):
                tensors[name] = t
                continue
            tensors[name] = (t.float() + torch.randn(t.shape, generator=gen) * noise).to(t.dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
