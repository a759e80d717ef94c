"""deltahub on vLLM (CPU build): M fine-tunes in one engine as adapters vs M engines of their own.

Run in ``.venv-vllm`` (``scripts/setup-vllm.sh``). A random model of the SmolLM2-135M layout (Llama:
hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, tied embeddings) is the
base; M fine-tunes change its decoder Linear weights by Gaussian noise (what a vLLM adapter slot
carries), stored as sign1 deltas. Each configuration runs in a child process of its own
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine in that process), so its peak RSS is its own:

  adapters   one engine on the base's stub folder (``--load-format deltahub``) with ``enable_lora``;
             C requests, round-robin over the M fine-tunes, generated as one mixed batch.
  separate   one engine on one materialized fine-tune (vLLM's default loader), serving its C/M share;
             M engines = M times that memory, and their tokens/s on the same cores = C·T over M
             times its time (the engines take turns; running them at once on 2 cores only slows
             each).
  stub       one engine on one fine-tune's stub folder (the public-API path; weights streamed from
             the store) serving the same share, twice: ``--apply auto`` (on a CPU the deltas are
             merged into the weights once after loading) and ``--apply on-the-fly`` (base GEMM +
             the planes op every forward, the GPU default): the cost of not materializing.

Every engine: fp32, ``enforce_eager``, ``max_model_len`` 256, ``VLLM_CPU_KVCACHE_SPACE`` 1 GiB (the
KV cache is the same size in all, and part of every RSS). T new tokens per request (greedy,
``ignore_eos``), after one warm-up batch. Printed: the table, ratios, a JSON line; written to
``bench/results/vllm_serve.json``.

Usage:
  .venv-vllm/bin/python bench/vllm_serve.py                    # SmolLM2 layout, M=4, C=8, T=32
  .venv-vllm/bin/python bench/vllm_serve.py --layers 4         # quick check
"""

from __future__ import annotations

import argparse
import json
import re
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
    write_noisy_finetune,
    write_results,
)
from bench.serve import SMOLLM2, _tokenizer  # noqa: E402

LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")

CHILD = r"""
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
engine = dict(enforce_eager=True, gpu_memory_utilization=0.1, dtype="float32", max_model_len=256,
              max_num_seqs=spec["max_num_seqs"], **spec.get("engine", {}))
t0 = time.perf_counter()
llm = LLM(spec["model"], **engine)
start_s = time.perf_counter() - t0
loras = None
if spec.get("adapters"):
    from vllm.lora.request import LoRARequest
    ads = [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(spec["adapters"])]
    loras = [ads[i % len(ads)] for i in range(len(spec["prompts"]))]
params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # warm-up (and adapter loads)
t0 = time.perf_counter()
outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
gen_s = time.perf_counter() - t0
n = sum(len(o.outputs[0].token_ids) for o in outs)
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({"start_s": start_s, "gen_s": gen_s, "tokens": n, "rss_now": rss,
                  "first": [list(o.outputs[0].token_ids[:4]) for o in outs[:2]]}))
"""


def build(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltahub

    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                      tie_word_embeddings=True, max_position_embeddings=2048, eos_token_id=None, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    base_dir = work / "ck" / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    _tokenizer(base_dir, args.vocab)
    del model
    log(f"base: {n_params / 1e6:.1f} M params (fp32)")
    home = work / "store"
    out: dict = {"n_params": n_params, "stub": {}, "materialized": {}}
    with deltahub.Store(home) as store:
        store.add(base_dir, name="base")
        out["stub"]["base"] = str(store.vllm_prepare("base", work / "stub" / "base", dtype="float32").out_dir)
        for i in range(args.models):
            ft = write_noisy_finetune(base_dir, work / "ck" / f"ft{i}", 1000 + i, args.noise,
                                      only=lambda n: bool(LINEAR.search(n)))
            res = store.compress(ft, base="base", name=f"ft{i}")
            out["delta_stored_bytes"] = res.stored_bytes
            out["stub"][f"ft{i}"] = str(store.vllm_prepare(f"ft{i}", work / "stub" / f"ft{i}", dtype="float32").out_dir)
            if i == 0:
                store.materialize("ft0", work / "mat" / "ft0", dtype="float32")
                out["materialized"]["ft0"] = str(work / "mat" / "ft0")
                out["stub"]["ft0-fly"] = str(store.vllm_prepare("ft0", work / "stub" / "ft0-fly", dtype="float32",
                                                                apply="on-the-fly").out_dir)
            shutil.rmtree(ft)
            log(f"fine-tune {i}: delta {fmt_bytes(res.stored_bytes)}")
    return out


def run(spec: dict, label: str) -> dict:
    log(f"{label}: starting an engine")
    child = run_child(python_child(CHILD, json.dumps(spec)),
                      env={"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if child.returncode != 0:
        raise SystemExit(f"{label} failed ({child.returncode}):\n{child.stderr[-3000:]}")
    res = json.loads(child.stdout.strip().splitlines()[-1])
    res["peak_rss"] = child.max_rss_bytes
    res["tokens_per_s"] = res["tokens"] / res["gen_s"]
    log(f"  {res['tokens_per_s']:.1f} tokens/s, start {res['start_s']:.1f} s, peak RSS {fmt_bytes(res['peak_rss'])}")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in SMOLLM2.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--models", type=int, default=4, help="M: fine-tunes")
    p.add_argument("--requests", type=int, default=8, help="C: requests in the mixed batch (a multiple of M)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32, help="T: new tokens per request")
    p.add_argument("--noise", type=float, default=2e-3, help="std of each fine-tune's change")
    add_workdir_args(p)
    args = p.parse_args()
    import torch

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.requests)]
    share = args.requests // args.models
    with scratch_dir("vllm_serve", args.workdir, args.keep) as work:
        t0 = time.perf_counter()
        info = build(work, args)
        log(f"store built in {time.perf_counter() - t0:.0f} s")
        common = {"max_tokens": args.max_tokens, "max_num_seqs": args.requests}
        adapters = [(f"ft{i}", info["stub"][f"ft{i}"]) for i in range(args.models)]
        out = {
            "adapters": run({**common, "model": info["stub"]["base"], "prompts": prompts, "adapters": adapters,
                             "engine": {"load_format": "deltahub", "enable_lora": True, "max_loras": args.models,
                                        "max_cpu_loras": args.models, "max_lora_rank": 8}}, "adapters (1 engine)"),
            "separate": run({**common, "model": info["materialized"]["ft0"], "prompts": prompts[:share]},
                            "separate (1 of M engines)"),
            "stub": run({**common, "model": info["stub"]["ft0"], "prompts": prompts[:share],
                         "engine": {"load_format": "deltahub"}}, "stub, merged at load (ft0 alone)"),
            "stub_fly": run({**common, "model": info["stub"]["ft0-fly"], "prompts": prompts[:share],
                             "engine": {"load_format": "deltahub"}}, "stub, on the fly (ft0 alone)"),
        }
    a, s, st, fly = out["adapters"], out["separate"], out["stub"], out["stub_fly"]
    m = args.models
    m_engines = {"peak_rss": m * s["peak_rss"], "tokens_per_s": args.requests * args.max_tokens / (m * s["gen_s"])}
    ratios = {"memory_one_engine_over_m_engines": a["peak_rss"] / m_engines["peak_rss"],
              "tokens_per_s_one_engine_over_m_engines": a["tokens_per_s"] / m_engines["tokens_per_s"],
              "stub_over_materialized_tokens_per_s": st["tokens_per_s"] / s["tokens_per_s"],
              "stub_over_materialized_rss": st["peak_rss"] / s["peak_rss"],
              "on_the_fly_over_materialized_tokens_per_s": fly["tokens_per_s"] / s["tokens_per_s"],
              "on_the_fly_over_materialized_rss": fly["peak_rss"] / s["peak_rss"]}
    print(f"SmolLM2 layout: {args.layers} layers, {info['n_params'] / 1e6:.1f} M params, fp32, vLLM CPU build; "
          f"M={m} fine-tunes (Linear deltas, sign1 {fmt_bytes(info['delta_stored_bytes'])} each), C={args.requests} "
          f"requests x {args.prompt_len} prompt + {args.max_tokens} new tokens, KV cache 1 GiB per engine")
    print_table(["configuration", "tokens/s", "peak RSS", "engine start s"], [
        [f"1 engine, {m} adapters (mixed batch of {args.requests})", f"{a['tokens_per_s']:.1f}", fmt_bytes(a["peak_rss"]),
         f"{a['start_s']:.1f}"],
        [f"{m} engines, materialized ({share} requests each)", f"{m_engines['tokens_per_s']:.1f}",
         fmt_bytes(m_engines["peak_rss"]), f"{s['start_s']:.1f} each"],
        [f"1 engine, ft0 materialized ({share} requests)", f"{s['tokens_per_s']:.1f}", fmt_bytes(s["peak_rss"]),
         f"{s['start_s']:.1f}"],
        [f"1 engine, ft0 stub, merged at load ({share} requests)", f"{st['tokens_per_s']:.1f}", fmt_bytes(st["peak_rss"]),
         f"{st['start_s']:.1f}"],
        [f"1 engine, ft0 stub, base + planes on the fly ({share} requests)", f"{fly['tokens_per_s']:.1f}",
         fmt_bytes(fly["peak_rss"]), f"{fly['start_s']:.1f}"],
    ])
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    result = {"layout": {k: getattr(args, k) for k in SMOLLM2}, "models": m, "requests": args.requests,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, **{k: v for k, v in info.items()
              if k in ("n_params", "delta_stored_bytes")}, **out, "m_engines": m_engines, "ratios": ratios}
    print(json.dumps({"ratios": ratios}))
    write_results("vllm_serve", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
