"""`deltahub serve` under load: M fine-tunes as deltas on one base vs the same M as separate models.

A random model of the SmolLM2-135M layout (Llama: hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings) is the base; M fine-tunes are the base plus small
Gaussian noise on every tensor. Each fine-tune is stored twice: as a delta of the base
(``compress``, sign1) and as a model of its own (``add``). In the same run, two servers:

  delta      ``deltahub serve ft0 … ft{M-1}``: one base in memory, M packed deltas; requests for
             different fine-tunes share every decode step (continuous batching, one engine).
  separate   ``deltahub serve full0 … full{M-1}``: M models in memory (all fit here), one engine
             each, decoding in turn on the same cores.

C clients each send R streamed completions (prompt: ``--prompt-len`` random token ids; greedy;
``--max-tokens`` tokens), client c's r-th request going to fine-tune (c + r) mod M. Measured per
server: output tokens/s over the whole run, p50/p99 time to first token, p50/p99 per-token
latency (the gaps between streamed tokens), and resident memory (the server's VmRSS after the run,
and the model bytes the pool reports). Printed: the table, the ratios delta/separate, a JSON line;
written to ``bench/results/serve.json``.

Usage:
  python bench/serve.py                         # SmolLM2 layout, M=4, C=8
  python bench/serve.py --layers 4 --clients 4  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_workdir_args,
    fmt_bytes,
    log,
    print_table,
    scratch_dir,
    write_noisy_finetune,
    write_results,
)

SMOLLM2 = dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152)


def _tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` words ``w0 …`` (every id decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def build_store(home: Path, work: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltahub

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                      tie_word_embeddings=True, max_position_embeddings=2048, eos_token_id=None, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    base_dir = work / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    _tokenizer(base_dir, args.vocab)
    del model
    log(f"base: {n_params / 1e6:.1f} M params ({args.dtype})")
    with deltahub.Store(home) as store:
        store.add(base_dir, name="base")
        for i in range(args.models):
            ft_dir = write_noisy_finetune(base_dir, work / f"ft{i}", 1000 + i, args.noise)
            res = store.compress(ft_dir, base="base", name=f"ft{i}")
            store.add(ft_dir, name=f"full{i}")
            shutil.rmtree(ft_dir)
            log(f"fine-tune {i}: delta {fmt_bytes(res.stored_bytes)}, and stored in full")
    shutil.rmtree(base_dir)
    return {"n_params": n_params, "delta_stored_bytes": res.stored_bytes}


class Server:
    def __init__(self, home: Path, names: list[str], args: argparse.Namespace) -> None:
        env = {**os.environ, "DELTAHUB_HOME": str(home), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "deltahub.cli", "serve", *names, "--port", "0", "--dtype", args.dtype,
               "--max-batch", str(args.max_batch)]
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url = ""
        ready = threading.Event()

        def follow() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                hit = re.search(r"on (http://[0-9.]+:\d+)/v1", line)
                if hit and not self.url:
                    self.url = hit.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=follow, daemon=True).start()
        ready.wait(1800)
        if not self.url:
            raise SystemExit(f"the server did not start (exit {self.proc.wait()})")

    def rss(self) -> int:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(300)


def one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: time to first token and the times of every token after it."""
    import httpx

    t0 = time.perf_counter()
    stamps: list[float] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "total": time.perf_counter() - t0}


def load(url: str, names: list[str], args: argparse.Namespace) -> dict:
    import random

    rng = random.Random(0)
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(args.requests):
            prompt = [rng.randrange(3, args.vocab) for _ in range(args.prompt_len)]
            res = one_request(url, names[(c + r) % len(names)], prompt, args.max_tokens)
            with lock:
                results.append(res)

    one_request(url, names[0], [5] * args.prompt_len, 2)  # warm up
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "token_p50_s": statistics.median(gaps), "token_p99_s": pct(gaps, 0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in SMOLLM2.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--models", type=int, default=4, help="M: fine-tunes served")
    p.add_argument("--clients", type=int, default=8, help="C: concurrent clients")
    p.add_argument("--requests", type=int, default=2, help="R: requests per client")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--noise", type=float, default=1e-3, help="std of each fine-tune's change")
    p.add_argument("--threads", type=int, default=2)
    add_workdir_args(p)
    args = p.parse_args()
    import httpx

    out: dict = {}
    with scratch_dir("serve", args.workdir, args.keep) as work:
        home = work / "store"
        t0 = time.perf_counter()
        info = build_store(home, work, args)
        log(f"store built in {time.perf_counter() - t0:.0f} s")
        for mode, names in (("delta", [f"ft{i}" for i in range(args.models)]),
                            ("separate", [f"full{i}" for i in range(args.models)])):
            log(f"{mode}: starting the server on {', '.join(names)}")
            server = Server(home, names, args)
            try:
                res = load(server.url, names, args)
                res["rss_bytes"] = server.rss()
                res["model_bytes"] = sum(httpx.get(server.url + "/health", timeout=30).json()["resident"].values())
            finally:
                res["exit_code"] = server.stop()
            out[mode] = res
            log(f"  {res['tokens_per_s']:.1f} tokens/s, TTFT p50 {res['ttft_p50_s'] * 1e3:.0f} ms, "
                f"token p50 {res['token_p50_s'] * 1e3:.0f} ms, RSS {fmt_bytes(res['rss_bytes'])}")
    d, s = out["delta"], out["separate"]
    ratios = {"throughput_delta_over_separate": d["tokens_per_s"] / s["tokens_per_s"],
              "ttft_p50_delta_over_separate": d["ttft_p50_s"] / s["ttft_p50_s"],
              "token_p50_delta_over_separate": d["token_p50_s"] / s["token_p50_s"],
              "rss_delta_over_separate": d["rss_bytes"] / s["rss_bytes"],
              "model_bytes_delta_over_separate": d["model_bytes"] / s["model_bytes"]}
    print(f"SmolLM2 layout: {args.layers} layers, {info['n_params'] / 1e6:.1f} M params, {args.dtype}, "
          f"{args.threads} threads; M={args.models} fine-tunes, C={args.clients} clients x {args.requests} requests, "
          f"{args.prompt_len} prompt + {args.max_tokens} new tokens, --max-batch {args.max_batch}")
    rows = []
    for mode in ("delta", "separate"):
        r = out[mode]
        rows.append([mode, f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50_s'] * 1e3:.0f}", f"{r['ttft_p99_s'] * 1e3:.0f}",
                     f"{r['token_p50_s'] * 1e3:.0f}", f"{r['token_p99_s'] * 1e3:.0f}", fmt_bytes(r["model_bytes"]),
                     fmt_bytes(r["rss_bytes"])])
    print_table(["server", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "token p50 ms", "token p99 ms", "model bytes",
                 "RSS"], rows)
    print("ratios delta/separate: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    base_plus = out["delta"]["model_bytes"]
    log(f"(one base + {args.models} deltas in memory: {fmt_bytes(base_plus)})")
    write_results("serve", {"layout": {**{k: getattr(args, k) for k in SMOLLM2}, "tied_embeddings": True},
                            "args": {k: getattr(args, k) for k in ("models", "clients", "requests", "prompt_len",
                                                                   "max_tokens", "max_batch", "dtype", "threads")},
                            **info, **out, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
