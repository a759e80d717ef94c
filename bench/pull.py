"""Pulling a delta vs downloading the full fp16 fine-tune, over the project's local fake Hub.

One run, all in-process: the Hub-compatible server of ``tests/hub_server.py`` is started on
127.0.0.1 (port 0) and the ``huggingface_hub`` client is pointed at it the way
``tests/hub_fixtures.py`` does (HF_ENDPOINT, HF_HOME, HF_TOKEN in ``os.environ`` AND the
already-imported ``huggingface_hub.constants``; Xet disabled, so uploads go through plain LFS).

Setup (untimed): a synthetic Llama-style fp16 pair is written (``bench.common``); store A adds the
base, compresses the fine-tune (``--embeddings``, default: the library's default) and pushes the
delta with ``--base-repo``; the full fp16 fine-tune folder is uploaded as a plain model repo with
``HfApi.upload_folder``.

Then ``--repeats`` times (medians reported), each with a FRESH HF cache (HF_HOME) and, for (a), a
fresh store B that already holds the base (``Store.add`` before the timer starts):

(a) ``Store.pull(delta_repo)``: wall time; bytes = sizes of the files fetched
    (``PullResult.bytes``; the cache's blob bytes are recorded too);
(b) ``huggingface_hub.snapshot_download(full_repo)``: wall time; bytes = the cache's blob bytes.

Ratios bytes(full)/bytes(delta) (goal >= 10x) and time(full)/time(delta) (goal >= 5x). Once,
untimed: materializing the pulled delta from store B gives the same file bytes as materializing
it from store A.

The server runs in a thread of this process, so it shares the GIL (and the 2 cores) with the
client; both measurements pay that alike.

Usage:
  python bench/pull.py                           # ~0.87 GB per checkpoint (see --help for layout)
  python bench/pull.py --layers 2 --repeats 1    # quick check
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import os
import shutil
import sys
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
    profile_top,
    scratch_dir,
    setup_torch,
    time_repeats,
    tree_bytes,
    write_checkpoint_pair,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# Llama-2-7B's per-layer proportions at 1/16 of the params: 8 layers of 2048/5632 and a vocab of
# 4000, so the embeddings + LM head are 3.9% of the weights, as in Llama-2-7B (2 x 32000 x 4096 /
# 6.74 B). About 0.87 GB per fp16 checkpoint.
DEFAULT_LAYOUT = LlamaShape(hidden=2048, intermediate=5632, layers=8, vocab=4000, heads=16)
# The fake Hub refuses request bodies above 512 MiB, so the full checkpoint is sharded below that.
FULL_SHARD_BYTES = 400 * 10**6

NAMESPACE = "testuser"
BASE_REPO = f"{NAMESPACE}/bench-base"
DELTA_REPO = f"{NAMESPACE}/bench-delta"
FULL_REPO = f"{NAMESPACE}/bench-full"


def _load_hub_server():
    path = REPO_ROOT / "tests" / "hub_server.py"
    spec = importlib.util.spec_from_file_location("deltahub_bench_hub_server", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod.HubServer


# ---------------------------------------------------------------------------------------- client
def point_client(url: str, hf_home: Path, token: str) -> None:
    """Point ``huggingface_hub`` at ``url`` with cache ``hf_home`` (env AND imported constants)."""
    hf_home.mkdir(parents=True, exist_ok=True)
    home = str(hf_home)
    hub_cache = os.path.join(home, "hub")
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "DELTAHUB_DISABLE_PROGRESS_BARS": "1",
    }
    os.environ.update(env)
    for k in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        os.environ.pop(k, None)

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
    }.items():
        if hasattr(constants, name):
            setattr(constants, name, value)
    hf_api.api.endpoint = url
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if hasattr(_http, "_HUB_ORIGINS"):
        _http._HUB_ORIGINS = _http._HUB_ORIGINS | {_http._url_origin(url)}


def close_client_session() -> None:
    try:
        from huggingface_hub.utils._http import close_session
    except ImportError:  # pragma: no cover
        return
    close_session()


def cache_blob_bytes(hf_home: Path) -> int:
    """Bytes of the blobs in the HF hub cache under ``hf_home`` (every file fetched, once)."""
    hub = hf_home / "hub"
    total = 0
    if hub.exists():
        for blobs in hub.glob("*/blobs"):
            total += tree_bytes(blobs)
    return total


def same_tree(a: Path, b: Path) -> tuple[bool, list[str]]:
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if fa != fb:
        return False, sorted(set(fa) ^ set(fb))
    diff = [f for f in fa if not filecmp.cmp(a / f, b / f, shallow=False)]
    return not diff, diff


# ---------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(parser, DEFAULT_LAYOUT)
    add_workdir_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embeddings", default=None, help="Store.compress embeddings mode (default: library default)")
    parser.add_argument("--profile", action="store_true", help="Profile one extra (untimed) pull and print the top functions")
    args = parser.parse_args()
    setup_torch(args.threads)
    layout = layout_from_args(args)
    log(layout.describe())

    from huggingface_hub import HfApi, snapshot_download

    from deltahub import Store
    from deltahub.ops import compress as _compress

    embeddings = args.embeddings or _compress.DEFAULT_EMBEDDINGS.value
    HubServer = _load_hub_server()

    with scratch_dir("pull", args.workdir, args.keep) as work:
        base_dir, ft_dir = work / "base", work / "ft"
        log(f"writing checkpoint pair into {work}")
        write_checkpoint_pair(layout, base_dir, ft_dir, seed=args.seed, noise=args.noise, max_shard_bytes=FULL_SHARD_BYTES)
        ft_bytes = tree_bytes(ft_dir)
        log(f"fine-tune folder: {fmt_bytes(ft_bytes)}")

        server = HubServer().start()
        log(f"fake Hub at {server.url}")
        try:
            point_client(server.url, work / "hf_home_setup", HubServer.DEFAULT_TOKEN)
            close_client_session()

            # ---- setup: store A, push the delta, upload the full fine-tune
            with Store(work / "store_a") as store_a:
                log("store A: add base")
                store_a.add(base_dir, name="base")
                log(f"store A: compress fine-tune (embeddings={embeddings})")
                store_a.compress(ft_dir, base="base", name="ft", embeddings=embeddings)
                log(f"store A: push delta to {DELTA_REPO}")
                server.create_repo(BASE_REPO)  # push checks that --base-repo exists (an empty stand-in)
                push_res = store_a.push("ft", DELTA_REPO, base_repo=BASE_REPO)
            log(f"push: {push_res.to_json() if hasattr(push_res, 'to_json') else push_res}"[:300])
            api = HfApi()
            log(f"upload_folder of the full fine-tune to {FULL_REPO}")
            api.create_repo(FULL_REPO, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=FULL_REPO, folder_path=str(ft_dir), repo_type="model")
            if server.errors:
                log(f"server errors during setup: {server.errors}")

            # ---- (a) Store.pull of the delta
            delta_info: list[dict] = []

            def before_pull(i: int) -> None:
                for p in (work / "hf_home_pull", work / "store_b"):
                    shutil.rmtree(p, ignore_errors=True)
                point_client(server.url, work / "hf_home_pull", HubServer.DEFAULT_TOKEN)
                close_client_session()
                with Store(work / "store_b") as sb:
                    sb.add(base_dir, name="base")
                os.sync()

            def do_pull(i: int) -> None:
                with Store(work / "store_b") as sb:
                    res = sb.pull(DELTA_REPO, name="ft")
                delta_info.append({"pull_bytes": res.bytes, "files": list(res.downloaded)})

            def after_pull(i: int) -> None:
                delta_info[-1]["cache_blob_bytes"] = cache_blob_bytes(work / "hf_home_pull")
                log(f"  pulled {fmt_bytes(delta_info[-1]['pull_bytes'])}: {delta_info[-1]['files']}")

            log(f"(a) Store.pull({DELTA_REPO}) x{args.repeats}, fresh HF cache + store B with the base each time")
            t_delta = time_repeats(do_pull, args.repeats, before=before_pull, after=after_pull, label="Store.pull")
            if args.profile:
                before_pull(-1)
                profile_top(lambda: do_pull(-1), top=30, label="Store.pull")
                delta_info.pop()

            # correctness, once: materialize from B == from A
            log("checking: materialize from store B == from store A")
            with Store(work / "store_a") as sa:
                sa.materialize("ft", work / "mat_a")
            with Store(work / "store_b") as sb:
                sb.materialize("ft", work / "mat_b")
            identical, diff = same_tree(work / "mat_a", work / "mat_b")
            log(f"  identical: {identical}" + ("" if identical else f" differing: {diff}"))
            for p in (work / "mat_a", work / "mat_b", work / "store_b", work / "hf_home_pull"):
                shutil.rmtree(p, ignore_errors=True)

            # ---- (b) snapshot_download of the full fine-tune
            full_info: list[dict] = []

            def before_full(i: int) -> None:
                shutil.rmtree(work / "hf_home_full", ignore_errors=True)
                point_client(server.url, work / "hf_home_full", HubServer.DEFAULT_TOKEN)
                close_client_session()
                os.sync()

            def do_full(i: int) -> None:
                folder = snapshot_download(FULL_REPO, repo_type="model")
                full_info.append({"folder": folder})

            def after_full(i: int) -> None:
                folder = Path(full_info[-1].pop("folder"))
                files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                full_info[-1]["files"] = files
                full_info[-1]["snapshot_bytes"] = sum((folder / f).stat().st_size for f in files)
                full_info[-1]["cache_blob_bytes"] = cache_blob_bytes(work / "hf_home_full")
                log(f"  downloaded {fmt_bytes(full_info[-1]['cache_blob_bytes'])}: {len(files)} files")
                shutil.rmtree(work / "hf_home_full", ignore_errors=True)

            log(f"(b) snapshot_download({FULL_REPO}) x{args.repeats}, fresh HF cache each time")
            t_full = time_repeats(do_full, args.repeats, before=before_full, after=after_full, label="snapshot_download")
            if server.errors:
                log(f"server errors: {server.errors}")
        finally:
            close_client_session()
            server.stop()

    delta_bytes = delta_info[0]["pull_bytes"]
    full_bytes = full_info[0]["cache_blob_bytes"]
    bytes_ratio = full_bytes / delta_bytes
    time_ratio = t_full.median / t_delta.median
    print()
    print(f"{layout.describe()}; embeddings={embeddings}; {args.repeats} repeats (medians)")
    print_table(
        ["download", "bytes", "time (s)", "MB/s"],
        [
            ["Store.pull(delta)", fmt_bytes(delta_bytes), f"{t_delta.median:.2f}", f"{delta_bytes / 1e6 / t_delta.median:.0f}"],
            ["snapshot_download(full)", fmt_bytes(full_bytes), f"{t_full.median:.2f}", f"{full_bytes / 1e6 / t_full.median:.0f}"],
        ],
    )
    print()
    print_table(
        ["ratio full/delta", "value", "goal", "met"],
        [
            ["bytes", f"{bytes_ratio:.1f}x", ">= 10x", "yes" if bytes_ratio >= 10 else "NO"],
            ["time", f"{time_ratio:.1f}x", ">= 5x", "yes" if time_ratio >= 5 else "NO"],
        ],
    )
    print(f"materialize(store B) == materialize(store A): {identical}")
    print()
    write_results(
        "pull",
        {
            "layout": layout.__dict__ | {"n_params": layout.n_params()},
            "embeddings": embeddings,
            "noise": args.noise,
            "seed": args.seed,
            "repeats": args.repeats,
            "finetune_folder_bytes": ft_bytes,
            "delta": {"bytes": delta_bytes, **t_delta.to_json(), "runs": delta_info},
            "full": {"bytes": full_bytes, **t_full.to_json(), "runs": full_info},
            "bytes_ratio_full_over_delta": bytes_ratio,
            "time_ratio_full_over_delta": time_ratio,
            "goals": {"bytes_ratio_min": 10, "time_ratio_min": 5},
            "goals_met": {"bytes": bytes_ratio >= 10, "time": time_ratio >= 5},
            "materialize_identical": identical,
            "materialize_diff": diff,
        },
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
