"""Speed of ``Store.compress`` and ``Store.materialize`` against plain file I/O of the same bytes.

A synthetic Llama-style fp16 checkpoint pair (base, fine-tune = base + small noise; default about
1.1 GB each) is written once with the library's safetensors writer, and the base is ``Store.add``-ed.
Then ``--repeats`` rounds (medians reported), each round timing, in this order (interleaved, so a
change of load on a shared machine hits the baselines and the operations alike):

(a) baseline: read every tensor's bytes of BOTH input checkpoints once
    (``SafetensorsReader.read``), vs ``Store.compress(ft, base=...)`` with each codec of
    ``--codecs`` (a new name each round):
      ``sign1``   the default codec (one plane, one scale per matrix)   -> goal <= 2x
      ``planes1`` ``--codec planes``, 1 plane, per-row scales           -> goal <= 2x
      ``planes4`` ``--bits 4``: ``planes``, 4 planes, per-row scales    -> goal <= 3x
    A warm-up read runs first, so the baseline and compress both read from the page cache.
(b) baseline: ``shutil.copytree`` of the fp16 fine-tune checkpoint followed by an fsync of every
    file (materialize makes its output durable, so the baseline does too), vs
    ``Store.materialize(name, out, dtype="float16")`` of the deltas of ``--materialize``
    (default: the sign1 delta, goal <= 1.5x; planes4 for information). A plain copytree (no fsync)
    is timed too, for information. ``os.sync()`` runs (untimed) before every timed step so earlier
    writeback does not leak into the next timing.

Finally (unless ``--no-profile``) one compress per codec and one materialize run under cProfile; the
top functions by cumulative time go to stderr and into the JSON.

Usage:
  python bench/speed.py                       # default ~1.1 GB per checkpoint
  python bench/speed.py --layers 1 --vocab 4000 --hidden 1024 --intermediate 2816 --heads 8 --repeats 1   # smoke
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
    Timing,
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
    tree_bytes,
    write_checkpoint_pair,
    write_results,
)

DEFAULT_LAYOUT = LlamaShape(hidden=2048, intermediate=5632, layers=8, vocab=32000, heads=16)
GOAL_MATERIALIZE = 1.5

#: name -> (Store.compress codec, codec_options, goal vs reading both checkpoints, description)
CODECS: dict[str, tuple[str, dict | None, float, str]] = {
    "sign1": ("sign1", None, 2.0, "sign1 (1 plane, matrix scale)"),
    "planes1": ("planes", {"planes": 1, "scales": "row"}, 2.0, "planes x1, row scales"),
    "planes4": ("planes", {"planes": 4, "scales": "row"}, 3.0, "planes x4, row scales (--bits 4)"),
}


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
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def codec_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CODECS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown codec(s) {bad}; choose from {', '.join(CODECS)}")
    return names


def timed(fn, label: str, times: list[float]) -> float:
    """Run ``fn`` once after an (untimed) ``os.sync``; append and return its wall time."""
    import gc

    drop_dirty_pages()
    gc.collect()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    times.append(dt)
    log(f"  {label}: {dt:.2f} s")
    return dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(p, DEFAULT_LAYOUT)
    add_workdir_args(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--embeddings", choices=["dense", "sign1"], default=None,
                   help="embeddings mode of every compress (default: the library's, sign1)")
    p.add_argument("--codecs", type=codec_list, default=list(CODECS),
                   help=f"codecs to compress with, comma-separated (default: {','.join(CODECS)})")
    p.add_argument("--materialize", type=codec_list, default=["sign1", "planes4"],
                   help="deltas to materialize (of those compressed; default sign1,planes4; the goal is sign1's)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup_torch(args.threads)
    os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")

    import deltahub
    from deltahub import defaults

    embeddings = args.embeddings or defaults.DEFAULT_EMBEDDINGS
    codecs = args.codecs
    mats = [c for c in args.materialize if c in codecs]
    layout = layout_from_args(args)
    log(layout.describe())
    load_start = os.getloadavg()
    res: dict = {
        "goals": {f"compress_{c}_over_read": CODECS[c][2] for c in CODECS}
        | {"materialize_over_copytree_fsync": GOAL_MATERIALIZE},
        "embeddings": embeddings,
        "load_avg_at_start": load_start,
    }
    read_times: list[float] = []
    comp_times: dict[str, list[float]] = {c: [] for c in codecs}
    copy_times: list[float] = []
    copy_sync_times: list[float] = []
    mat_times: dict[str, list[float]] = {c: [] for c in mats}
    deltas: dict[str, dict] = {}
    prof: dict = {}
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

        def rm(path: Path) -> None:
            shutil.rmtree(path, ignore_errors=True)

        def compress(c: str, name: str):
            codec, options, _goal, _desc = CODECS[c]
            return store.compress(ft_dir, base="base", name=name, embeddings=embeddings, codec=codec,
                                  codec_options=options)

        log("warm-up read of both checkpoints (page cache)")
        read_checkpoint(base_dir)
        read_checkpoint(ft_dir)
        for i in range(args.repeats):
            log(f"round {i + 1}/{args.repeats} (load average {os.getloadavg()[0]:.2f})")
            timed(lambda: (read_checkpoint(base_dir), read_checkpoint(ft_dir)), "read both checkpoints", read_times)
            for c in codecs:
                out: list = []
                timed(lambda: out.append(compress(c, f"{c}-{i}")), f"compress {c}", comp_times[c])
                if c not in deltas:
                    r = out[0]
                    deltas[c] = {"name": r.name, "manifest_id": r.manifest_id, "stored_bytes": r.stored_bytes,
                                 "fp16_over_delta": r.ratio, "codecs": r.codecs}
                    log(f"  delta {c}: {fmt_bytes(r.stored_bytes)} ({r.codecs}), fp16/delta = {r.ratio:.2f}x")
                elif out[0].manifest_id != deltas[c]["manifest_id"]:
                    raise SystemExit(f"compress {c} is not deterministic: {out[0].manifest_id} != {deltas[c]['manifest_id']}")
            timed(lambda: shutil.copytree(ft_dir, work / "copy"), "copytree(ft)", copy_times)
            rm(work / "copy")
            timed(lambda: (shutil.copytree(ft_dir, work / "copys"), fsync_tree(work / "copys")), "copytree + fsync",
                  copy_sync_times)
            rm(work / "copys")
            for c in mats:
                timed(lambda: store.materialize(deltas[c]["name"], work / "mat", dtype="float16"), f"materialize {c}",
                      mat_times[c])
                rm(work / "mat")

        if not args.no_profile:
            for c in codecs:
                drop_dirty_pages()
                prof[f"compress_{c}"] = profile_top(lambda: compress(c, f"{c}-prof"), label=f"Store.compress {c}")
            for c in mats[:1]:
                drop_dirty_pages()
                prof[f"materialize_{c}"] = profile_top(
                    lambda: store.materialize(deltas[c]["name"], work / "mat-prof", dtype="float16"),
                    label=f"Store.materialize {c}",
                )
                rm(work / "mat-prof")
        store.close()

    load_end = os.getloadavg()
    read_t, copy_t, copy_sync_t = Timing(read_times), Timing(copy_times), Timing(copy_sync_times)
    print()
    print(
        f"Synthetic {layout.describe()}; fine-tune checkpoint {fmt_bytes(ckpt_bytes)}; embeddings {embeddings}; "
        f"median of {args.repeats} interleaved rounds; inputs read from the page cache (warm-up read first); "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end."
    )

    def verdict(r: float, goal: float) -> str:
        return f"<= {goal:g}x: {'yes' if r <= goal else 'NO'}"

    rows = [["baseline: read both checkpoints", f"{read_t.median:.2f}", "1.00", ""]]
    comp_json = {}
    for c in codecs:
        t = Timing(comp_times[c])
        r = t.median / read_t.median
        rows.append([f"Store.compress {CODECS[c][3]}", f"{t.median:.2f}", f"{r:.2f}", verdict(r, CODECS[c][2])])
        comp_json[c] = {**t.to_json(), "over_read": r, "goal": CODECS[c][2], "delta": deltas[c]}
    rows += [
        ["baseline: copytree(ft) + fsync", f"{copy_sync_t.median:.2f}", "1.00", ""],
        ["(info) copytree(ft), no fsync", f"{copy_t.median:.2f}", f"{copy_t.median / copy_sync_t.median:.2f}", ""],
    ]
    mat_json = {}
    for c in mats:
        t = Timing(mat_times[c])
        r = t.median / copy_sync_t.median
        goal = verdict(r, GOAL_MATERIALIZE) if c == "sign1" else "(info)"
        rows.append([f"Store.materialize({c}, float16)", f"{t.median:.2f}", f"{r:.2f}",
                     f"{goal} ({t.median / copy_t.median:.2f}x vs copytree without fsync)"])
        mat_json[c] = {**t.to_json(), "over_copytree_fsync": r, "over_copytree": t.median / copy_t.median}
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
            "repeats": args.repeats,
            "add_base_s": add_s,
            "read_both": read_t.to_json(),
            "compress": comp_json,
            "copytree": copy_t.to_json(),
            "copytree_fsync": copy_sync_t.to_json(),
            "materialize": mat_json,
            "load_avg_at_end": load_end,
            "profile_top_cumulative": prof,
        }
    )
    write_results("speed", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
