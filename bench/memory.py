"""Peak resident memory of ``add``, ``compress`` and ``materialize`` on a multi-GB model.

A synthetic Llama-style fp16 base + fine-tune pair (default 2.07 B parameters, 4.1 GB per
checkpoint, sharded at 2 GB like ``save_pretrained``) is written once. Each operation then runs in
a fresh ``python -c`` subprocess calling the public API (``deltahub.Store``), and its peak RSS is
read with GNU ``/usr/bin/time -f %M`` (cross-checked with the child's own VmHWM):

  import   baseline: a child that only imports torch + deltahub (the fixed cost)
  add      Store.add(base)
  compress Store.compress(ft, base=...)            goal: peak RSS < 1.5 GB
  materialize Store.materialize(..., dtype=fp16)   goal: peak RSS < 1.5 GB

Printed beside them: the import baseline, the largest single tensor's size (fp16 and fp32), and
each peak as a share of the goal. The design (invariant 5) says memory is bounded by a few
tensors, not by the model; the model here is ~3x the goal, so a whole-model buffer would show.

Disk: about 4.3x one checkpoint at the peak (two checkpoints, the base in the store, the
materialized output; the output is deleted as soon as it is measured). Everything is deleted at
the end unless --keep.

Usage:
  python bench/memory.py                        # ~2.1 B params, ~17 GB of scratch disk
  python bench/memory.py --layers 2 --vocab 8000   # quick check
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    LlamaShape,
    add_layout_args,
    add_workdir_args,
    fmt_bytes,
    layout_from_args,
    log,
    print_table,
    python_child,
    run_child,
    scratch_dir,
    setup_torch,
    tree_bytes,
    write_checkpoint_pair,
    write_results,
)

# 24 layers, hidden 2560, intermediate 6912, vocab 32000, untied: 2.07 B params, 4.14 GB fp16.
DEFAULT_LAYOUT = LlamaShape(hidden=2560, intermediate=6912, layers=24, vocab=32000, heads=20)
GOAL_BYTES = 1.5e9
MIB = 1 << 20

# The child also reports its own VmHWM (peak RSS of its address space since exec) as a cross-check.
PRELUDE = (
    "import atexit, sys, torch; torch.set_num_threads({threads}); import deltahub; from deltahub.api import Store\n"
    "atexit.register(lambda: print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1],"
    " file=sys.stderr))\n"
)
CHILD_CODE = {
    "import": "",
    "add": "Store(sys.argv[1]).add(sys.argv[2], name='base')\n",
    "compress": "Store(sys.argv[1]).compress(sys.argv[2], base='base', name='ft', embeddings=sys.argv[3])\n",
    "materialize": "Store(sys.argv[1]).materialize('ft', sys.argv[2], dtype='float16')\n",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(p, DEFAULT_LAYOUT)
    add_workdir_args(p)
    p.add_argument("--shard-size", type=float, default=2.0, help="checkpoint shard size in GB (default 2)")
    p.add_argument("--embeddings", choices=["dense", "sign1"], default="dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-disk-gb", type=float, default=25.0, help="refuse to start above this scratch estimate")
    args = p.parse_args()
    setup_torch(args.threads)

    layout = layout_from_args(args)
    log(layout.describe())
    ckpt = 2 * layout.n_params()
    need = 4.3 * ckpt
    if need > args.max_disk_gb * 1e9:
        p.error(f"this layout needs about {fmt_bytes(need)} of scratch disk (> --max-disk-gb {args.max_disk_gb:g})")
    largest = layout.largest_tensor_numel()
    prelude = PRELUDE.format(threads=args.threads)
    runs: dict[str, dict] = {}

    def measure(op: str, *argv: str) -> dict:
        log(f"{op}: starting a fresh subprocess")
        run = run_child(python_child(prelude + CHILD_CODE[op], *argv))
        if run.returncode != 0:
            sys.stderr.write(run.stderr[-4000:])
            raise SystemExit(f"{op} failed with exit status {run.returncode}")
        tail = run.stderr.strip().splitlines()
        vmhwm = int(tail[-1]) * 1024 if tail and tail[-1].strip().isdigit() else None
        log(
            f"{op}: peak RSS {fmt_bytes(run.max_rss_bytes)} ({run.max_rss_bytes / MIB:.0f} MiB, {run.method}; "
            f"child's own VmHWM {vmhwm and round(vmhwm / MIB)} MiB), {run.wall_s:.1f} s"
        )
        runs[op] = {
            "max_rss_bytes": run.max_rss_bytes,
            "method": run.method,
            "vmhwm_bytes": vmhwm,
            "wait4_max_rss_bytes": run.wait4_max_rss_bytes,
            "wall_s": run.wall_s,
        }
        return runs[op]

    with scratch_dir("memory", args.workdir, args.keep) as work:
        free = shutil.disk_usage(work).free
        if free < need * 1.1:
            raise SystemExit(f"not enough free disk under {work}: {fmt_bytes(free)} free, ~{fmt_bytes(need)} needed")
        base_dir, ft_dir, home = work / "base", work / "ft", work / "store"
        t = time.perf_counter()
        write_checkpoint_pair(
            layout, base_dir, ft_dir, seed=args.seed, noise=args.noise, max_shard_bytes=int(args.shard_size * 1e9)
        )
        n_shards = len(list(ft_dir.glob("*.safetensors")))
        log(f"wrote checkpoints in {time.perf_counter() - t:.0f} s: {fmt_bytes(tree_bytes(ft_dir))} each, {n_shards} shard(s)")

        measure("import")
        measure("add", str(home), str(base_dir))
        measure("compress", str(home), str(ft_dir), args.embeddings)
        out = work / "materialized"
        measure("materialize", str(home), str(out))
        written = tree_bytes(out)
        peak_disk = tree_bytes(work)
        shutil.rmtree(out, ignore_errors=True)
        store_bytes = tree_bytes(home)

    base_rss = runs["import"]["max_rss_bytes"]
    print()
    print(
        f"Synthetic {layout.describe()}; {n_shards} shard(s) per checkpoint; largest tensor "
        f"{fmt_bytes(2 * largest)} in fp16 ({fmt_bytes(4 * largest)} in fp32). Peak RSS of a fresh subprocess "
        f"per operation ({runs['import']['method']}). Goal: < {fmt_bytes(GOAL_BYTES)}."
    )
    rows = []
    for op in ("import", "add", "compress", "materialize"):
        r = runs[op]
        rss = r["max_rss_bytes"]
        r["above_import_bytes"] = rss - base_rss
        r["above_import_over_largest_fp16_tensor"] = (rss - base_rss) / (2 * largest)
        r["over_goal"] = rss / GOAL_BYTES
        goal = "" if op in ("import", "add") else f"{'yes' if rss < GOAL_BYTES else 'NO'}"
        rows.append(
            [op, f"{rss / MIB:.0f}", f"{(rss - base_rss) / MIB:.0f}", f"{r['above_import_over_largest_fp16_tensor']:.2f}",
             f"{r['over_goal']:.2f}", goal, f"{r['wall_s']:.1f}"]
        )
    print_table(
        ["operation", "peak RSS MiB", "- import MiB", "/ largest tensor", "/ goal", "< goal", "wall s"], rows
    )
    print()
    write_results(
        "memory",
        {
            "layout": {
                "hidden": layout.hidden, "intermediate": layout.intermediate, "layers": layout.layers,
                "vocab": layout.vocab, "n_params": layout.n_params(),
            },
            "checkpoint_bytes": ckpt,
            "shards": n_shards,
            "largest_tensor_fp16_bytes": 2 * largest,
            "goal_bytes": GOAL_BYTES,
            "embeddings": args.embeddings,
            "runs": runs,
            "materialized_bytes": written,
            "store_bytes": store_bytes,
            "peak_scratch_disk_bytes": peak_disk,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
