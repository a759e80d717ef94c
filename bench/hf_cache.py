"""Disk used by a base added from the Hub: references into the HF cache vs a copy in the store.

One run, in-process, over the project's local fake Hub (``tests/hub_server.py``, as ``bench/pull.py``):
a synthetic Llama-style fp16 base is uploaded; then, with a fresh HF cache,

(a) ``Store.add(REPO)`` (the default: weights stay in the HF cache, the store keeps references),
(b) ``Store.add(REPO, copy=True)`` into another store (the HF cache already holds the snapshot),

and for each: disk blocks used (``st_blocks``, so sparse/tiny files count what they really take) by
the HF cache and by the store's ``objects/``, the wall time of the add, and the time of a verified
read of every base tensor (``materialize`` of the base). Medians of ``--repeats``.

Usage:
  python bench/hf_cache.py                 # ~0.87 GB fp16 base
  python bench/hf_cache.py --layers 2      # quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_layout_args,
    add_workdir_args,
    fmt_bytes,
    layout_from_args,
    log,
    print_table,
    scratch_dir,
    setup_torch,
    time_repeats,
    write_checkpoint_pair,
    tree_bytes,
    write_results,
)

_pull_spec = importlib.util.spec_from_file_location("deltahub_bench_pull", Path(__file__).with_name("pull.py"))
assert _pull_spec is not None and _pull_spec.loader is not None
_pull = importlib.util.module_from_spec(_pull_spec)
_pull_spec.loader.exec_module(_pull)

REPO = "testuser/bench-base"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(parser, _pull.DEFAULT_LAYOUT)
    add_workdir_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_torch(2)
    layout = layout_from_args(args)
    log(layout.describe())
    from huggingface_hub import HfApi

    from deltahub import Store

    HubServer = _pull._load_hub_server()
    with scratch_dir("hf_cache", args.workdir, args.keep) as work:
        write_checkpoint_pair(layout, work / "base", work / "ft", seed=0, noise=1e-3, max_shard_bytes=_pull.FULL_SHARD_BYTES)
        shutil.rmtree(work / "ft")
        server = HubServer().start()
        results: dict[str, dict] = {}
        try:
            _pull.point_client(server.url, work / "hf_setup", HubServer.DEFAULT_TOKEN)
            HfApi().create_repo(REPO, exist_ok=True)
            HfApi().upload_folder(repo_id=REPO, folder_path=str(work / "base"))
            hf_home = work / "hf_home"
            _pull.point_client(server.url, hf_home, HubServer.DEFAULT_TOKEN)
            _pull.close_client_session()
            with Store(work / "warm") as warm:  # download once: both modes then start from the HF cache
                warm.add(REPO, name="warm")
            shutil.rmtree(work / "warm")
            hf_bytes = tree_bytes(hf_home / "hub", blocks=True)
            for mode, copy in (("reference (default)", False), ("--copy", True)):
                home = work / ("store_copy" if copy else "store_ref")

                def before(i: int, home: Path = home) -> None:
                    shutil.rmtree(home, ignore_errors=True)
                    os.sync()

                def do_add(i: int, home: Path = home, copy: bool = copy) -> None:
                    with Store(home) as s:
                        s.add(REPO, name="base", copy=copy)

                t_add = time_repeats(do_add, args.repeats, before=before, label=f"add {mode}")

                def do_read(i: int, home: Path = home) -> None:
                    shutil.rmtree(work / "out", ignore_errors=True)
                    with Store(home) as s:
                        s.materialize("base", work / "out")

                t_read = time_repeats(do_read, args.repeats, label=f"materialize base, {mode}")
                shutil.rmtree(work / "out", ignore_errors=True)
                results[mode] = {
                    "store_bytes": tree_bytes(home / "objects", blocks=True),
                    "hf_cache_bytes": tree_bytes(hf_home / "hub", blocks=True),
                    "add_s": t_add.median,
                    "materialize_s": t_read.median,
                }
        finally:
            _pull.close_client_session()
            server.stop()
    ref, cp = results["reference (default)"], results["--copy"]
    print()
    print(f"{layout.describe()}; HF cache holds {fmt_bytes(hf_bytes)}; medians of {args.repeats}")
    print_table(
        ["add from the Hub", "store objects/", "HF cache", "total", "add (s)", "materialize base (s)"],
        [
            [m, fmt_bytes(r["store_bytes"]), fmt_bytes(r["hf_cache_bytes"]), fmt_bytes(r["store_bytes"] + r["hf_cache_bytes"]),
             f"{r['add_s']:.2f}", f"{r['materialize_s']:.2f}"]
            for m, r in results.items()
        ],
    )
    print(f"store bytes, copy / reference: {cp['store_bytes'] / max(1, ref['store_bytes']):.0f}x; "
          f"total disk, copy / reference: {(cp['store_bytes'] + cp['hf_cache_bytes']) / (ref['store_bytes'] + ref['hf_cache_bytes']):.2f}x")
    write_results("hf_cache", {"benchmark": "hf_cache", "layout": layout.describe(), "hf_cache_bytes": hf_bytes,
                               "repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
