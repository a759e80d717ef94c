"""Size against fidelity on a real pair: sign planes x scale granularity, a size budget against a
uniform allocation of the same bytes, and a truncated-SVD delta of the same bytes (issue 11).

Pair: SmolLM2-135M-Instruct and the 200-step Shakespeare fine-tune of ``bench/calibrate.py`` (built
once, cached under ``--pair-dir``). Held-out text: the four plays the fine-tune never saw,
``--eval-samples`` x ``--eval-seq-len`` tokens. For every delta, loaded with deltahub's
``load_model`` (materialize mode, fp32):

  bytes of tensor data (``Manifest.tensor_nbytes``: what a pull fetches) and bits per parameter;
  share of the fine-tune's gain kept on held-out log-perplexity; mean KL(fine-tune || delta)
  (top-128 + tail, nats/token).

Runs, all in this process (baselines measured here):

1. **grid** -- ``compress --bits k --scales g`` for k = 1..4 x g in matrix / row / group-128
   (uncalibrated; 1 x matrix is ``sign1``);
2. **budget vs uniform** -- one ``compress --max-size <all>`` (4 planes, per-row scales, the order
   planes pay in by measured sensitivity) read at sizes equal to uniform allocations of 1.25, 1.5,
   2, 2.5 and 3 planes per matrix (``load_model(max_size=S)``), against the uniform allocation of the
   same bytes (a 4-plane uniform delta read at ``max_size=S``: plane 1 of every matrix, then plane 2
   by tensor name, ...);
3. **SVD** -- every matrix's delta replaced by its best rank-r approximation (fp16 factors) with r
   chosen so that its bytes equal the 1-plane per-row delta's (the same bytes per matrix).

Calibrated figures come from ``bench/calibrate.py`` (``--codec``) -- calibration costs minutes per run.

Usage:
  python bench/fidelity.py                      # ~30-40 min on 2 cores once the pair is cached
  python bench/fidelity.py --only budget --eval-samples 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_workdir_args,
    fmt_bytes,
    log,
    print_table,
    scorer,
    scratch_dir,
    setup_torch,
    write_results,
)

GRANULARITIES = (("matrix", None), ("row", None), ("group", 128))
BUDGET_POINTS = (1.25, 1.5, 2.0, 2.5, 3.0)  # in planes per matrix of the uniform allocation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair-dir", type=Path, default=RESULTS_DIR / "calibrate-pair")
    p.add_argument("--ft-steps", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--sens-samples", type=int, default=64, help="calibration sequences the sensitivity is measured on")
    p.add_argument("--sens-data", choices=["train", "bundled"], default="train",
                   help="text of the sensitivity measurement: the fine-tune's training plays or the bundled corpus")
    p.add_argument("--max-planes", type=int, default=4)
    p.add_argument("--only", choices=["grid", "budget", "svd"], action="append", default=None)
    p.add_argument("--threads", type=int, default=2)
    add_workdir_args(p)
    args = p.parse_args()
    setup_torch(args.threads)
    only = set(args.only or ["grid", "budget", "svd"])

    import torch
    from transformers import AutoModelForCausalLM

    import deltahub
    from deltahub.api import CalibrationOptions
    from deltahub.calibrate.data import load_samples
    from deltahub.calibrate.evaluate import improvement_kept
    from deltahub.calibrate.targets import DEFAULT_TOP_K
    from deltahub.formats.manifest import parse_manifest
    from deltahub.ops.load import load_model

    from bench.calibrate import ensure_pair

    base_dir, ft_dir, ft_meta, prepare = ensure_pair(args.pair_dir, args.ft_steps)
    results: dict = {"pair": {"finetune": ft_meta}, "settings": {k: str(v) for k, v in vars(args).items()}}
    with scratch_dir("fidelity", args.workdir, args.keep) as work:
        train_texts, held_texts = prepare.load_texts()
        held_file, train_file = work / "heldout.txt", work / "train.txt"
        held_file.write_text("".join(held_texts), encoding="utf-8")
        train_file.write_text("".join(train_texts), encoding="utf-8")
        store = deltahub.Store(work / "store")
        store.add(base_dir, name="base")
        ctx = store._ctx
        tok = store.load_tokenizer("base")
        tokens = load_samples(held_file, tok, args.eval_samples, args.eval_seq_len, "eval").tokens
        log(f"held-out: {tokens.shape[0]} x {tokens.shape[1]} tokens")

        scored = scorer(tokens)

        ft_stats = scored("fine-tune", lambda: AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32),
                          keep_top_k=DEFAULT_TOP_K)
        targets = ft_stats.targets
        base_stats = scored("base", lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))

        def manifest(name: str):
            return parse_manifest(ctx.objects.read(store.show(name)["manifest_id"]))

        n_params = sum(rec.numel for rec in manifest("base").tensors.values())

        def figures(label: str, loader, nbytes: int) -> dict:
            st = scored(label, loader, against=targets)
            return {
                "label": label, "tensor_bytes": nbytes, "bits_per_param": 8 * nbytes / n_params,
                "ppl": st.perplexity, "kl": st.mean_kl,
                "kept_logppl": improvement_kept(base_stats.mean_nll, ft_stats.mean_nll, st.mean_nll),
            }

        def stored(name: str, **kw) -> dict:
            m = manifest(name).select(kw.get("bits"), kw.get("max_size"))
            return figures(kw.pop("label", name), lambda: load_model(ctx, name, dtype=torch.float32, **kw), m.tensor_nbytes())

        results["heldout"] = {"samples": tokens.shape[0], "seq_len": tokens.shape[1], "ppl_base": base_stats.perplexity,
                              "ppl_finetune": ft_stats.perplexity}

        if "grid" in only:
            grid = []
            for k in range(1, args.max_planes + 1):
                for g, size in GRANULARITIES:
                    name = f"u{k}-{g}"
                    t0 = time.perf_counter()
                    opts = {"planes": k, "scales": g, **({"group_size": size} if size else {})}
                    store.compress(ft_dir, base="base", name=name, codec="planes", codec_options=opts)
                    log(f"compressed {name} in {time.perf_counter() - t0:.0f} s")
                    row = stored(name)
                    row.update(planes=k, scales=g)
                    grid.append(row)
            results["grid"] = grid

        if "budget" in only or "svd" in only:
            store.compress(ft_dir, base="base", name="uniform", codec="planes",
                           codec_options={"planes": args.max_planes, "scales": "row"})
            uniform = manifest("uniform")
            per_plane = (uniform.prefix_sizes()[-1] - uniform.prefix_sizes()[0]) / max(1, args.max_planes - 1)
            one_plane = uniform.prefix_sizes()[0]

        if "budget" in only:
            t0 = time.perf_counter()
            sens = CalibrationOptions(data=train_file if args.sens_data == "train" else None, samples=args.sens_samples)
            store.compress(ft_dir, base="base", name="budget", max_size=10**12, calibration=sens,
                           codec_options={"planes": args.max_planes, "scales": "row"})
            budget_seconds = time.perf_counter() - t0
            log(f"budgeted compress (sensitivity + allocation + encode) in {budget_seconds:.0f} s")
            points = []
            for planes in BUDGET_POINTS:
                size = int(one_plane + (planes - 1) * per_plane)
                u = stored("uniform", max_size=size, label=f"uniform {planes:g} planes")
                b = stored("budget", max_size=size, label=f"budget {planes:g} planes")
                points.append({"planes": planes, "max_size": size, "uniform": u, "budget": b})
            results["budget"] = {"compress_seconds": budget_seconds, "points": points}

        if "svd" in only:
            results["svd"] = svd_baseline(base_dir, ft_dir, uniform, n_params, figures, one_plane)
        store.close()

    print(f"\nheld-out: {results['heldout']['samples']} x {results['heldout']['seq_len']} tokens; base ppl "
          f"{results['heldout']['ppl_base']:.3f}, fine-tune {results['heldout']['ppl_finetune']:.3f}")

    def row(r: dict) -> list[str]:
        return [r["label"], fmt_bytes(r["tensor_bytes"]), f"{r['bits_per_param']:.3f}", f"{r['ppl']:.3f}",
                f"{r['kl']:.4f}", f"{100 * (r['kept_logppl'] or 0):.1f} %"]

    headers = ["delta", "tensor data", "bits/param", "ppl", "KL(ft||delta)", "gain kept"]
    if "grid" in results:
        print("\nplanes x scale granularity (uncalibrated)")
        print_table(headers, [row(r) for r in results["grid"]])
    if "budget" in results:
        print("\nbudget (sensitivity-ordered) vs uniform allocation of the same bytes")
        rows = []
        for pt in results["budget"]["points"]:
            rows += [row(pt["uniform"]), row(pt["budget"])]
        print_table(headers, rows)
        wins = sum(pt["budget"]["kl"] < pt["uniform"]["kl"] for pt in results["budget"]["points"])
        results["budget"]["budget_beats_uniform_kl"] = f"{wins}/{len(results['budget']['points'])}"
        print(f"budgeted beats uniform (KL) at {wins} of {len(results['budget']['points'])} sizes")
    if "svd" in results:
        print("\ntruncated SVD of the same bytes as 1 plane per row")
        print_table(headers, [row(results["svd"])])
    write_results("fidelity", results)
    return 0


def svd_baseline(base_dir: Path, ft_dir: Path, uniform, n_params: int, figures, one_plane: int) -> dict:
    """Every matrix of the 1-plane per-row delta replaced by a rank-r truncated SVD of its delta (fp16
    factors ``U_r Σ_r`` [N, r] and ``V_r`` [r, K]), r = the 1-plane part's bytes / ((N + K) * 2);
    everything else as the 1-plane delta stores it. Same bytes (within one rank per matrix)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from deltahub.formats.safetensors_io import dtype_from_name

    base = load_file(str(next(Path(base_dir).glob("*.safetensors"))))
    ft = load_file(str(next(Path(ft_dir).glob("*.safetensors"))))
    one = uniform.at_bits(1)
    state = {}
    nbytes = one.tensor_nbytes()
    for name, rec in one.tensors.items():
        if not rec.impl.progressive or not rec.parts:
            state[name] = ft[name]
            continue
        n, k = rec.shape
        own = rec.impl.stored_nbytes(rec.shape, dtype_from_name(rec.dtype), rec.params)
        r = max(1, own // ((n + k) * 2))
        delta = ft[name].float() - base[name].float()
        u, s, vh = torch.svd_lowrank(delta, q=min(r + 8, min(n, k)), niter=4)
        approx = ((u[:, :r] * s[:r]).half().float() @ vh.T[:r].half().float())
        state[name] = (base[name].float() + approx).to(ft[name].dtype)
        nbytes += (n + k) * 2 * r - own
    log(f"SVD: {len(state)} tensors, {nbytes} bytes (1-plane per-row delta: {one_plane})")

    def loader():
        model = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        return model.eval()

    return figures("truncated SVD, same bytes as 1 plane/row", loader, nbytes)


if __name__ == "__main__":
    raise SystemExit(main())
