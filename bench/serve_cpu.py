"""Serving N fine-tunes on the CPU: one multi-tenant model (delta mode) vs N materialized models.

A random model of the SmolLM2-135M layout (Llama: hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings) is the base; N fine-tunes are the base plus small
Gaussian noise on every tensor, stored with ``Store.compress`` (sign1 everywhere, embeddings
included: the default). For each N in ``--n`` (default 1, 4, 16), two fresh subprocesses:

  delta          ``load_multi_tenant(N names)``: one base + N packed deltas; a batch of N rows, row
                 i using fine-tune i. A decode step = one forward of the [N, 1] batch with a KV cache.
                 The same model with every row on the base (tenant -1) is timed too: the base's own
                 cost in that process (the floor the deltas add to).
  materialized   N x ``load_model(name)`` (full weights each). A decode step = one [1, 1] forward of
                 each of the N models (what serving N fine-tunes without deltas costs per token).

Each reports the median decode-step latency over ``--steps`` steps (after a prompt of
``--prompt-len`` tokens and 2 warm-up steps) and its resident memory after loading (VmRSS) and
peak (GNU time %M). Printed: the table, the ratios delta/materialized, and the JSON line; written to
``bench/results/serve_cpu.json``.

Without a GPU the deltas are applied by deltahub's torch path (rows of the sign matrix unpacked a
few MB at a time); the kernels' GPU numbers come from the GPU benchmark.

Usage:
  python bench/serve_cpu.py                      # SmolLM2 layout, N = 1, 4, 16, bfloat16
  python bench/serve_cpu.py --layers 4 --n 1 4   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_workdir_args,
    fmt_bytes,
    log,
    print_table,
    python_child,
    run_child,
    scratch_dir,
    setup_torch,
    write_noisy_finetune,
    write_results,
)

SMOLLM2 = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152)

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
import deltahub

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024

home, mode, n, steps, _threads, prompt_len, dtype = sys.argv[1:8]
n, steps, prompt_len = int(n), int(steps), int(prompt_len)
names = [f'ft{i}' for i in range(n)]
rss0 = rss()
t0 = time.perf_counter()
gen = torch.Generator().manual_seed(0)

def decode(step_fn, prompt):
    past, tok = step_fn(prompt, None)
    for _ in range(2):
        past, tok = step_fn(tok, past)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        past, tok = step_fn(tok, past)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times

out = {}
with torch.no_grad():
    if mode == 'delta':
        mt = deltahub.load_multi_tenant(names, dtype=dtype, home=home)
        out['load_s'] = time.perf_counter() - t0
        out['rss_loaded'] = rss() - rss0
        model = mt.model

        def run(tenants):
            def step(ids, past):
                with mt.use(tenants):
                    o = model(input_ids=ids, past_key_values=past, use_cache=True)
                return o.past_key_values, o.logits[:, -1:].argmax(-1)
            return step

        prompt = torch.randint(3, 40000, (n, prompt_len), generator=gen)
        out['step_s'], out['times_s'] = decode(run(list(range(n))), prompt)
        out['base_rows_step_s'], _ = decode(run([-1] * n), prompt)
    else:
        models = [deltahub.load_model(name, dtype=dtype, home=home) for name in names]
        out['load_s'] = time.perf_counter() - t0
        out['rss_loaded'] = rss() - rss0
        prompt = torch.randint(3, 40000, (1, prompt_len), generator=gen)

        def step(ids, past):
            pasts, toks = [], []
            for i, m in enumerate(models):
                o = m(input_ids=ids if past is None else ids[i], past_key_values=None if past is None else past[i], use_cache=True)
                pasts.append(o.past_key_values)
                toks.append(o.logits[:, -1:].argmax(-1))
            return pasts, toks

        out['step_s'], out['times_s'] = decode(step, prompt)
out['rss_end'] = rss() - rss0
out['rss_import'] = rss0
print(json.dumps(out))
"""


def build_store(home: Path, work: Path, args: argparse.Namespace) -> dict:
    """A random SmolLM2-layout base and ``max(n)`` noisy fine-tunes, stored (checkpoints deleted)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltahub

    cfg = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        tie_word_embeddings=True, max_position_embeddings=2048,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    base_dir = work / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    del model
    log(f"base: {n_params / 1e6:.1f} M params ({args.dtype}) in {base_dir}")
    with deltahub.Store(home) as store:
        store.add(base_dir, name="base")
        for i in range(max(args.n)):
            ft_dir = write_noisy_finetune(base_dir, work / f"ft{i}", 1000 + i, args.noise)
            res = store.compress(ft_dir, base="base", name=f"ft{i}")
            shutil.rmtree(ft_dir)
            log(f"fine-tune ft{i}: delta {fmt_bytes(res.stored_bytes)} ({res.ratio:.1f}x smaller than fp16)")
        delta_bytes = res.stored_bytes
    shutil.rmtree(base_dir)
    return {"n_params": n_params, "delta_stored_bytes": delta_bytes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in SMOLLM2.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16], help="numbers of fine-tunes served")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps (median reported)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--noise", type=float, default=1e-3, help="std of each fine-tune's change")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    add_workdir_args(p)
    args = p.parse_args()
    setup_torch(args.threads)
    rows, results = [], []
    with scratch_dir("serve-cpu", args.workdir, args.keep) as work:
        home = work / "store"
        t0 = time.perf_counter()
        info = build_store(home, work, args)
        log(f"store built in {time.perf_counter() - t0:.0f} s")
        for n in args.n:
            entry: dict = {"n": n}
            for mode in ("delta", "materialized"):
                log(f"N={n}: {mode} ...")
                child = run_child(
                    python_child(CHILD, str(home), mode, str(n), str(args.steps), str(args.threads),
                                 str(args.prompt_len), args.dtype)
                )
                if child.returncode != 0:
                    log(child.stderr[-3000:])
                    raise SystemExit(f"child {mode} N={n} failed")
                data = json.loads(child.stdout.strip().splitlines()[-1])
                data["peak_rss"] = child.max_rss_bytes
                entry[mode] = data
                log(f"  step {data['step_s'] * 1e3:.1f} ms, resident {fmt_bytes(data['rss_loaded'])} "
                    f"(peak {fmt_bytes(child.max_rss_bytes)}), load {data['load_s']:.1f} s")
            d, m = entry["delta"], entry["materialized"]
            entry["step_ratio_delta_over_materialized"] = d["step_s"] / m["step_s"]
            entry["rss_ratio_delta_over_materialized"] = d["rss_loaded"] / m["rss_loaded"]
            entry["peak_ratio_delta_over_materialized"] = d["peak_rss"] / m["peak_rss"]
            results.append(entry)
            rows.append([
                n,
                f"{d['step_s'] * 1e3:.1f}", f"{d['base_rows_step_s'] * 1e3:.1f}", f"{m['step_s'] * 1e3:.1f}",
                f"{entry['step_ratio_delta_over_materialized']:.2f}",
                fmt_bytes(d["rss_loaded"]), fmt_bytes(m["rss_loaded"]),
                f"{entry['rss_ratio_delta_over_materialized']:.3f}",
                fmt_bytes(d["peak_rss"]), fmt_bytes(m["peak_rss"]),
            ])
    print(f"SmolLM2 layout: {args.layers} layers, hidden {args.hidden}, {info['n_params'] / 1e6:.1f} M params, "
          f"{args.dtype}, {args.threads} threads; decode step = one token for each of the N fine-tunes")
    print_table(
        ["N", "delta ms/step", "(base rows)", "materialized ms/step", "time ratio d/m",
         "delta RSS", "materialized RSS", "RSS ratio d/m", "delta peak", "materialized peak"],
        rows,
    )
    write_results("serve_cpu", {
        "layout": {**{k: getattr(args, k) for k in SMOLLM2}, "tied_embeddings": True},
        "dtype": args.dtype, "steps": args.steps, "prompt_len": args.prompt_len, "threads": args.threads,
        **info, "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
