"""Embeddings and LM heads: ``--embeddings rowsparse`` against today's ``sign1`` (and ``dense``).

On a real pair (SmolLM2-135M-Instruct and its 200-step Shakespeare fine-tune, built by
``bench/calibrate.py`` under ``bench/results/calibrate-pair``), three fine-tunes of one base:

* ``full``: the fine-tune as trained (every parameter, AdamW with weight decay; SmolLM2 ties its LM
  head to its embeddings, so the one table also gets the head's gradient for every token);
* ``frozen``: the same, with the embedding rows of every token that never occurs in the training
  text copied back from the base (bit for bit) -- what a fine-tune that freezes the rows of unseen
  tokens (sparse embedding updates, or no weight decay on them) stores;
* ``added``: ``frozen`` plus ``--added`` new tokens (a resized vocabulary: rows appended to the table,
  initialised as HF's ``resize_token_embeddings`` does, near the mean row; config ``vocab_size`` grown).

Each is compressed three ways in the same run (``--embeddings sign1``, today's default, the baseline;
``dense``; ``rowsparse``); every other tensor is stored the same way (``sign1`` matrices, dense or
``same`` 1-D tensors). Measured: the bytes of the embedding table as stored, the whole delta, and
held-out fidelity (``--eval-samples`` x ``--eval-seq-len`` tokens of four plays not trained on):
perplexity, KL(fine-tune ‖ delta) on the fine-tune's top-128 + tail, and the share of the
fine-tune's improvement kept on log-perplexity, each against that variant's own fine-tune.

Usage::

    python bench/embeddings.py                       # ~15-25 min on 2 shared cores
    python bench/embeddings.py --no-fidelity         # bytes only (~3 min)

Prints a table and a final JSON line; writes ``bench/results/embeddings.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    scratch_dir,
    setup_torch,
    write_results,
)

MODES = ("sign1", "dense", "rowsparse")  # sign1 first: today's default, the baseline of every ratio
VARIANTS = ("full", "frozen", "added")


def _link_files(src: Path, dst: Path) -> None:
    """``dst`` holds every file of ``src`` but the weights (hard links, else copies)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def make_variants(base_dir: Path, ft_dir: Path, work: Path, seen: set[int], added: int, seed: int) -> tuple[dict[str, Path], dict]:
    """Write the ``frozen`` and ``added`` fine-tunes (see the module docstring) under ``work``."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(base_dir / "model.safetensors")
    ft = load_file(ft_dir / "model.safetensors")
    tables = [n for n in ft if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    info: dict = {"tables": tables}
    vocab = int(ft[tables[0]].shape[0])
    unseen = torch.tensor(sorted(set(range(vocab)) - seen), dtype=torch.long)
    info["vocab"] = vocab
    info["tokens_seen_in_training"] = vocab - int(unseen.numel())
    for n in tables:
        ft[n][unseen] = base[n][unseen]
    frozen = work / "frozen"
    _link_files(ft_dir, frozen)
    save_file(ft, frozen / "model.safetensors", metadata={"format": "pt"})
    g = torch.Generator().manual_seed(seed)
    for n in tables:
        t = ft[n]
        new = t.float().mean(0, keepdim=True) + 0.02 * t.float().std() * torch.randn(added, t.shape[1], generator=g)
        ft[n] = torch.cat([t, new.to(t.dtype)])
    grown = work / "added"
    _link_files(ft_dir, grown)
    (grown / "config.json").unlink()
    cfg = json.loads((ft_dir / "config.json").read_text())
    cfg["vocab_size"] = vocab + added
    (grown / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(ft, grown / "model.safetensors", metadata={"format": "pt"})
    info["added_tokens"] = added
    return {"full": ft_dir, "frozen": frozen, "added": grown}, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p)
    p.add_argument("--pair-dir", type=Path, default=RESULTS_DIR / "calibrate-pair",
                   help="folder with base/ and finetune/ (bench/calibrate.py builds it)")
    p.add_argument("--added", type=int, default=64, help="tokens added in the 'added' variant")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--no-fidelity", action="store_true", help="bytes only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup_torch(args.threads)
    os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltahub
    from deltahub.calibrate.data import load_samples
    from deltahub.calibrate.evaluate import improvement_kept
    from deltahub.calibrate.targets import DEFAULT_TOP_K, score_model
    from deltahub.formats.manifest import parse_manifest
    from deltahub.ops.compress import is_embedding
    from deltahub.ops.load import load_model

    from bench.finetune_pair import prepare  # demo/prepare.py: the plays, their split and tokenization

    base_dir, ft_dir = args.pair_dir / "base", args.pair_dir / "finetune"
    if not (args.pair_dir / "finetune.json").exists():
        raise SystemExit(f"no fine-tune under {args.pair_dir}: run `python bench/calibrate.py` once to build the pair")
    results: dict = {"pair": str(args.pair_dir), "settings": {k: str(v) for k, v in vars(args).items()}}
    with scratch_dir("embeddings", args.workdir, args.keep) as work:
        tok = AutoTokenizer.from_pretrained(ft_dir)
        train_texts, held_texts = prepare.load_texts()
        seen = set(prepare.tokenize_texts(tok, train_texts).tolist())
        seen |= {i for i in (tok.eos_token_id, tok.bos_token_id) if i is not None}
        dirs, info = make_variants(base_dir, ft_dir, work, seen, args.added, args.seed)
        results["variants"] = info
        log(f"{info['tokens_seen_in_training']} of {info['vocab']} tokens occur in the training plays")

        store = deltahub.Store(work / "store")
        store.add(base_dir, name="base")
        runs: dict[str, dict[str, dict]] = {}
        for variant in VARIANTS:
            for mode in MODES:
                name = f"{variant}-{mode}"
                t0 = time.perf_counter()
                res = store.compress(dirs[variant], base="base", name=name, embeddings=mode)
                seconds = time.perf_counter() - t0
                man = parse_manifest(store._ctx.objects.read(res.manifest_id))
                vocab = man.tensors[info["tables"][0]].shape[0]
                tensors = store.show(name, tensors=True)["tensors"]
                emb = [t for t in tensors if is_embedding(t["name"], tuple(t["shape"]), vocab)]
                row = {
                    "manifest_id": res.manifest_id,
                    "delta_bytes": res.stored_bytes, "ratio_vs_fp16": res.ratio, "compress_s": seconds,
                    "embedding_bytes": sum(t["stored_bytes"] for t in emb),
                    "embedding_codecs": sorted({t["codec"] for t in emb}),
                    "changed_rows": {t["name"]: man.tensors[t["name"]].params.get("changed") for t in emb
                                     if "changed" in man.tensors[t["name"]].params},
                }
                runs.setdefault(variant, {})[mode] = row
                log(f"{name}: embeddings {fmt_bytes(row['embedding_bytes'])} ({row['embedding_codecs']}), "
                    f"delta {fmt_bytes(res.stored_bytes)} ({res.ratio:.2f}x), {seconds:.0f} s")
        results["runs"] = runs

        if not args.no_fidelity:
            held = work / "heldout.txt"
            held.write_text("".join(held_texts), encoding="utf-8")
            tokens = load_samples(held, tok, args.eval_samples, args.eval_seq_len, "eval").tokens
            results["heldout"] = {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
            t0 = time.perf_counter()
            base_stats = score_model(lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tokens, 4,
                                     "cpu", desc="base")
            results["heldout"]["ppl_base"] = base_stats.perplexity
            log(f"base: ppl {base_stats.perplexity:.3f} ({time.perf_counter() - t0:.0f} s)")
            ctx = store._ctx
            for variant in VARIANTS:
                ft_stats = score_model(lambda v=variant: AutoModelForCausalLM.from_pretrained(dirs[v], dtype=torch.float32),
                                       tokens, 4, "cpu", keep_top_k=DEFAULT_TOP_K, desc=f"fine-tune {variant}")
                runs[variant]["finetune"] = {"ppl": ft_stats.perplexity}
                log(f"fine-tune {variant}: ppl {ft_stats.perplexity:.3f}")
                for mode in MODES:
                    name = f"{variant}-{mode}"
                    twin = next((m for m in MODES[: MODES.index(mode)]
                                 if runs[variant][m]["manifest_id"] == runs[variant][mode]["manifest_id"]), None)
                    if twin is not None:  # the same delta (a resized table is dense under sign1 and dense)
                        runs[variant][mode].update({k: runs[variant][twin][k] for k in ("ppl", "kl_mean", "kept_logppl")})
                        log(f"{name}: the same manifest as {variant}-{twin}")
                        continue
                    st = score_model(lambda n=name: load_model(ctx, n, dtype=torch.float32), tokens, 4, "cpu",
                                     against=ft_stats.targets, desc=name)
                    runs[variant][mode].update({
                        "ppl": st.perplexity, "kl_mean": st.mean_kl,
                        "kept_logppl": improvement_kept(base_stats.mean_nll, ft_stats.mean_nll, st.mean_nll),
                    })
                    log(f"{name}: ppl {st.perplexity:.3f}, KL {st.mean_kl:.4f}")
        store.close()

    rows = []
    for variant in VARIANTS:
        ref = runs[variant]["sign1"]
        for mode in MODES:
            r = runs[variant][mode]
            changed = ", ".join(f"{c}/{info['vocab']}" for c in r["changed_rows"].values()) or "-"
            rows.append([
                variant, mode, "+".join(r["embedding_codecs"]), changed, fmt_bytes(r["embedding_bytes"]),
                f"{r['embedding_bytes'] / ref['embedding_bytes']:.3f}", fmt_bytes(r["delta_bytes"]), f"{r['ratio_vs_fp16']:.2f}x",
                *( [f"{r['ppl']:.3f}", f"{r['kl_mean']:.4f}", "-" if r["kept_logppl"] is None else f"{100 * r['kept_logppl']:.1f} %"]
                   if "ppl" in r else ["-", "-", "-"]),
            ])
    if "heldout" in results:
        h = results["heldout"]
        print(f"\nheld-out: {h['samples']} x {h['seq_len']} tokens of 4 unseen plays; base ppl {h['ppl_base']:.3f}; "
              + "; ".join(f"fine-tune {v} ppl {runs[v]['finetune']['ppl']:.3f}" for v in VARIANTS))
    print_table(["fine-tune", "--embeddings", "codec", "changed rows", "embedding bytes", "vs sign1", "delta",
                 "vs fp16", "ppl", "KL(ft||delta)", "kept (log-ppl)"], rows)
    write_results("embeddings", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
