"""Speed of ``Store.compress`` and ``Store.materialize`` against plain file I/O of the same bytes.

A synthetic Llama-style fp16 checkpoint pair (base, fine-tune = base + small noise; default about
1.1 GB each) is written once with the library's safetensors writer, and the base is ``Store.add``-ed.
Then, each repeated ``--repeats`` times (median reported):

(a) baseline: read every tensor's bytes of BOTH input checkpoints once
    (``SafetensorsReader.read``), vs ``Store.compress(ft, base=...)``  -> ratio, goal <= 2x.
    A warm-up read runs first, so the baseline and compress both read from the page cache.
(b) baseline: ``shutil.copytree`` of the fp16 fine-tune checkpoint, vs
    ``Store.materialize(name, out, dtype="float16")``                   -> ratio, goal <= 1.5x.
    ``os.sync()`` runs (untimed) before every repeat so earlier writeback does not leak into the
    next timing. Note materialize fsyncs its output and copytree does not; a copytree + fsync
    figure is printed as well, for information.

Finally one compress and one materialize run under cProfile; the top functions by cumulative time
go to stderr.

Usage:
  python bench/speed.py                       # default ~1.1 GB per checkpoint
  python bench/speed.py --layers 2 --repeats 1 --vocab 8000    # quick check
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
    LlamaShape,
    add_layout_args,
    add_workdir_args,
    drop_dirty_pages,
    fmt_bytes,
    layout_from_args,
    log,
    print_table,
    profile_top,
    scratch_dir,
    setup_torch,
    time_repeats,
    tree_bytes,
    write_checkpoint_pair,
    write_results,
)

DEFAULT_LAYOUT = LlamaShape(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=16)
GOAL_COMPRESS = 2.0
GOAL_MATERIALIZE = 1.5


def read_checkpoint(ckpt_dir: Path) -> int:
    """Read every tensor's bytes of a checkpoint once; returns the bytes read."""
    from deltahub.formats.checkpoint import open_checkpoint

    ck = open_checkpoint(ckpt_dir)
    n = 0
    for name in sorted(ck.tensors):
        n += ck.read(name).numel() * ck.dtype(name).itemsize
    return n


def fsync_tree(root: Path) -> None:
    for dirpath, _d, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(p, DEFAULT_LAYOUT)
    add_workdir_args(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--embeddings", choices=["dense", "sign1"], default="dense")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup_torch(args.threads)
    os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")

    import deltahub

    layout = layout_from_args(args)
    log(layout.describe())
    res: dict = {"goals": {"compress_over_read": GOAL_COMPRESS, "materialize_over_copytree": GOAL_MATERIALIZE}}
    with scratch_dir("speed", args.workdir, args.keep) as work:
        base_dir, ft_dir = work / "base", work / "ft"
        t = time.perf_counter()
        write_checkpoint_pair(layout, base_dir, ft_dir, seed=args.seed, noise=args.noise)
        log(f"wrote checkpoints in {time.perf_counter() - t:.1f} s: {fmt_bytes(tree_bytes(ft_dir))} each")
        ckpt_bytes = tree_bytes(ft_dir)

        store = deltahub.Store(work / "store")
        drop_dirty_pages()
        t = time.perf_counter()
        store.add(base_dir, name="base")
        add_s = time.perf_counter() - t
        log(f"Store.add(base): {add_s:.1f} s (informational, not repeated)")
        drop_dirty_pages()

        # ---------------------------------------------------------------- (a) compress
        log("warm-up read of both checkpoints (page cache)")
        read_checkpoint(base_dir)
        read_checkpoint(ft_dir)
        read_t = time_repeats(lambda i: (read_checkpoint(base_dir), read_checkpoint(ft_dir)), args.repeats, label="read both checkpoints")
        results: list = []
        comp_t = time_repeats(
            lambda i: results.append(store.compress(ft_dir, base="base", name=f"ft-{i}", embeddings=args.embeddings)),
            args.repeats,
            before=lambda i: drop_dirty_pages(),
            label="Store.compress",
        )
        cres = results[0]
        log(f"delta: {fmt_bytes(cres.stored_bytes)} ({cres.codecs}), fp16/delta = {cres.ratio:.2f}x")

        # ---------------------------------------------------------------- (b) materialize
        def rm(path: Path) -> None:
            shutil.rmtree(path, ignore_errors=True)

        copy_t = time_repeats(
            lambda i: shutil.copytree(ft_dir, work / f"copy-{i}"),
            args.repeats,
            before=lambda i: drop_dirty_pages(),
            after=lambda i: rm(work / f"copy-{i}"),
            label="shutil.copytree(ft)",
        )
        copy_sync_t = time_repeats(
            lambda i: (shutil.copytree(ft_dir, work / f"copys-{i}"), fsync_tree(work / f"copys-{i}")),
            args.repeats,
            before=lambda i: drop_dirty_pages(),
            after=lambda i: rm(work / f"copys-{i}"),
            label="copytree + fsync",
        )
        mat_t = time_repeats(
            lambda i: store.materialize("ft-0", work / f"mat-{i}", dtype="float16"),
            args.repeats,
            before=lambda i: drop_dirty_pages(),
            after=lambda i: rm(work / f"mat-{i}"),
            label="Store.materialize(fp16)",
        )

        # ---------------------------------------------------------------- profiles
        prof: dict = {}
        if not args.no_profile:
            drop_dirty_pages()
            prof["compress"] = profile_top(
                lambda: store.compress(ft_dir, base="base", name="ft-prof", embeddings=args.embeddings),
                label="Store.compress",
            )
            drop_dirty_pages()
            prof["materialize"] = profile_top(
                lambda: store.materialize("ft-0", work / "mat-prof", dtype="float16"), label="Store.materialize"
            )
            rm(work / "mat-prof")
        store.close()

    r_comp = comp_t.median / read_t.median
    r_mat = mat_t.median / copy_t.median
    r_mat_sync = mat_t.median / copy_sync_t.median
    print()
    print(
        f"Synthetic {layout.describe()}; fine-tune checkpoint {fmt_bytes(ckpt_bytes)}; "
        f"median of {args.repeats}; inputs read from the page cache (warm-up read first)."
    )
    rows = [
        ["baseline: read both checkpoints", f"{read_t.median:.2f}", "1.00", ""],
        [f"Store.compress (embeddings {args.embeddings})", f"{comp_t.median:.2f}", f"{r_comp:.2f}",
         f"<= {GOAL_COMPRESS:g}x: {'yes' if r_comp <= GOAL_COMPRESS else 'NO'}"],
        ["baseline: shutil.copytree(ft)", f"{copy_t.median:.2f}", "1.00", ""],
        ["(info) copytree + fsync", f"{copy_sync_t.median:.2f}", f"{copy_sync_t.median / copy_t.median:.2f}", ""],
        ["Store.materialize(dtype=float16)", f"{mat_t.median:.2f}", f"{r_mat:.2f}",
         f"<= {GOAL_MATERIALIZE:g}x: {'yes' if r_mat <= GOAL_MATERIALIZE else 'NO'} "
         f"({r_mat_sync:.2f}x vs copytree+fsync)"],
    ]
    print_table(["operation", "median s", "ratio", "goal"], rows)
    print()
    res.update(
        {
            "layout": {
                "hidden": layout.hidden, "intermediate": layout.intermediate, "layers": layout.layers,
                "vocab": layout.vocab, "n_params": layout.n_params(),
            },
            "checkpoint_bytes": ckpt_bytes,
            "page_cache": "warm: a warm-up read precedes the timed reads and compresses",
            "add_base_s": add_s,
            "read_both": read_t.to_json(),
            "compress": comp_t.to_json(),
            "compress_over_read": r_comp,
            "copytree": copy_t.to_json(),
            "copytree_fsync": copy_sync_t.to_json(),
            "materialize": mat_t.to_json(),
            "materialize_over_copytree": r_mat,
            "materialize_over_copytree_fsync": r_mat_sync,
            "delta_bytes": cres.stored_bytes,
            "delta_codecs": cres.codecs,
            "profile_top_cumulative": prof,
        }
    )
    write_results("speed", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
