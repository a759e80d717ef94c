"""Delta size: bytes a 1-bit delta takes in the store / bytes of the fp16 fine-tune.

(b, always) A synthetic model with Llama-2-7B's exact tensor layout (32 layers, hidden 4096,
intermediate 11008, vocab 32000, untied embeddings and lm_head, RMSNorm 1-D weights, HF
``LlamaForCausalLM`` names), STREAMED: tensor by tensor, a random fp16 base tensor and a
base + small-noise fine-tune tensor are generated, run through the real codec
(``deltahub.codec.encode_sign1``) and written to a scratch ``deltahub.store.ObjectStore`` with the
same choices as ``deltahub.ops.compress`` (packed signs raw; dense tensors ``Compression.AUTO``;
same name rules for embeddings / LM head, via ``deltahub.ops.compress.is_embedding``). The model
is never built and no checkpoint is written. A delta manifest for each embeddings mode is built
with ``deltahub.formats.manifest`` and stored too. Bytes are the object files' sizes on disk
(16-byte headers included). Reported for ``--embeddings dense`` and ``sign1`` from one pass.

(a, with ``--smollm``) The real SmolLM2-135M pair from ``bench/finetune_pair.ensure_pair``:
``Store.add`` the base, ``Store.compress`` the fine-tune with both embeddings modes, and compare
the store's bytes for each delta with the fine-tune's fp16 size.

Baseline: the fp16 fine-tune's tensor bytes (2 bytes per parameter), counted from the same
layout in the same run. Goal: fp16 / delta >= 10x on the Llama-7B layout.

Usage:
  python bench/size.py                    # full Llama-2-7B layout, streamed (several minutes)
  python bench/size.py --layers 2         # quick check
  python bench/size.py --smollm --layers 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    LLAMA2_7B,
    add_layout_args,
    add_workdir_args,
    fmt_bytes,
    layout_from_args,
    log,
    print_table,
    scratch_dir,
    setup_torch,
    synth_pair,
    tree_bytes,
    write_results,
)
from deltahub.codec import PACKING_V1, Codec, encode_sign1  # noqa: E402
from deltahub.formats.manifest import BaseRef, Manifest, ModelKind, TensorRecord  # noqa: E402
from deltahub.formats.safetensors_io import tensor_bytes  # noqa: E402
from deltahub.ops.compress import _bit_identical, is_embedding  # noqa: E402
from deltahub.store import Compression, ObjectStore  # noqa: E402

GOAL = 10.0
MODES = ("dense", "sign1")


def streamed_llama(args: argparse.Namespace, work: Path) -> dict:
    layout = layout_from_args(args)
    log(layout.describe())
    store = ObjectStore(work / "scratch-store")
    tensors = layout.tensors()
    config = layout.config()
    vocab = config["vocab_size"]
    fp16_total = 0
    # bytes per category; embeddings kept apart per mode
    cat = {"sign1 matrices": 0, "dense 1-D": 0, "same": 0}
    emb = {"dense": 0, "sign1": 0}
    records: dict[str, dict[str, TensorRecord]] = {m: {} for m in MODES}
    base_hashes: dict[str, str] = {}
    seen_objects: dict[str, int] = {}
    recon_err: list[tuple[int, float]] = []
    t_gen = t_enc = t_put = 0.0
    t0 = time.perf_counter()
    done_bytes = 0
    total_bytes = 2 * layout.n_params()
    last = 0.0
    for i, (name, shape) in enumerate(tensors):
        t = time.perf_counter()
        base, ft = synth_pair(name, shape, args.seed, args.noise)
        t_gen += time.perf_counter() - t
        fp16_total += ft.numel() * 2
        # the base tensor's hash is what a delta manifest records (the base's object id)
        base_hashes[name] = hashlib.sha256(tensor_bytes(base)).hexdigest()
        dtype = "float16"
        embedding = is_embedding(name, shape, vocab)
        modes_codec = {}
        for mode in MODES:
            if _bit_identical(ft, base):
                modes_codec[mode] = Codec.SAME
            elif len(shape) == 2 and (mode == "sign1" or not embedding):
                modes_codec[mode] = Codec.SIGN1
            else:
                modes_codec[mode] = Codec.DENSE
        done: dict[Codec, TensorRecord] = {}
        for mode in MODES:
            codec = modes_codec[mode]
            if codec not in done:
                if codec is Codec.SAME:
                    rec = TensorRecord(name, codec, dtype, shape)
                    size = 0
                elif codec is Codec.SIGN1:
                    t = time.perf_counter()
                    enc = encode_sign1(base, ft)
                    t_enc += time.perf_counter() - t
                    t = time.perf_counter()
                    info = store.put(tensor_bytes(enc.packed), Compression.NONE)
                    t_put += time.perf_counter() - t
                    rec = TensorRecord(name, codec, dtype, shape, parts={"signs": info.sha256}, params={"scale": enc.scale})
                    size = info.stored_size
                    recon_err.append((base.numel(), enc.rel_recon_error))
                    del enc
                else:
                    t = time.perf_counter()
                    info = store.put(tensor_bytes(ft), Compression.AUTO)
                    t_put += time.perf_counter() - t
                    rec = TensorRecord(name, codec, dtype, shape, parts={"tensor": info.sha256})
                    size = info.stored_size
                if rec.object is not None:
                    seen_objects[rec.object] = size
                done[codec] = rec
                if embedding:
                    pass
                elif codec is Codec.SIGN1:
                    cat["sign1 matrices"] += size
                elif codec is Codec.DENSE:
                    cat["dense 1-D"] += size
                else:
                    cat["same"] += size
                if embedding:
                    for m in MODES:
                        if modes_codec[m] is codec:
                            emb[m] += size
            records[mode][name] = done[codec]
        del base, ft
        done_bytes += math.prod(shape) * 2
        now = time.perf_counter()
        if now - last > 20 or i == len(tensors) - 1:
            last = now
            el = now - t0
            eta = el / done_bytes * (total_bytes - done_bytes)
            log(
                f"  {i + 1}/{len(tensors)} tensors, {done_bytes / total_bytes:.0%} of {fmt_bytes(total_bytes)} fp16, "
                f"{el:.0f} s elapsed, ~{eta:.0f} s left (gen {t_gen:.0f} s, encode {t_enc:.0f} s, put {t_put:.0f} s)"
            )

    cfg_info = store.put(json.dumps(config, indent=2, sort_keys=True).encode(), Compression.AUTO)
    seen_objects[cfg_info.sha256] = cfg_info.stored_size
    fake_base_manifest = "0" * 64
    out: dict[str, dict] = {}
    for mode in MODES:
        man = Manifest(
            kind=ModelKind.DELTA,
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            dtype="float16",
            files={"config.json": cfg_info.sha256},
            tensors=records[mode],
            base=BaseRef(
                manifest=fake_base_manifest,
                tensors={n: base_hashes[n] for n, r in records[mode].items() if r.codec != "dense"},
            ),
            packing=PACKING_V1,
        )
        minfo = store.put(man.to_bytes(), Compression.AUTO)
        seen_objects[minfo.sha256] = minfo.stored_size
        delta_bytes = cat["sign1 matrices"] + cat["dense 1-D"] + emb[mode] + cfg_info.stored_size + minfo.stored_size
        codecs: dict[str, int] = {}
        for r in records[mode].values():
            codecs[r.codec] = codecs.get(r.codec, 0) + 1
        out[mode] = {
            "delta_bytes": delta_bytes,
            "fp16_bytes": fp16_total,
            "delta_over_fp16": delta_bytes / fp16_total,
            "compression_x": fp16_total / delta_bytes,
            "goal_x": GOAL,
            "goal_met": fp16_total / delta_bytes >= GOAL,
            "breakdown": {
                "sign1_matrices": cat["sign1 matrices"],
                "dense_1d": cat["dense 1-D"],
                "embeddings_and_lm_head": emb[mode],
                "manifest": minfo.stored_size,
                "config": cfg_info.stored_size,
            },
            "codecs": codecs,
        }
    on_disk = tree_bytes(store.objects_dir)
    assert on_disk == sum(seen_objects.values()), (on_disk, sum(seen_objects.values()))
    w = sum(n for n, _ in recon_err)
    return {
        "layout": {
            "hidden": layout.hidden,
            "intermediate": layout.intermediate,
            "layers": layout.layers,
            "vocab": layout.vocab,
            "kv_dim": layout.kv_dim,
            "tie_embeddings": layout.tie_embeddings,
            "n_params": layout.n_params(),
            "n_tensors": len(tensors),
        },
        "noise_std": args.noise,
        "scratch_store_bytes_on_disk": on_disk,
        "mean_rel_recon_error": sum(n * e for n, e in recon_err) / w if w else 0.0,
        "seconds": {"total": time.perf_counter() - t0, "generate": t_gen, "encode_sign1": t_enc, "store_put": t_put},
        "modes": out,
    }


def smollm(work: Path, pair_dir: Path | None) -> dict:
    try:
        from bench.finetune_pair import ensure_pair
    except ImportError as exc:
        log(f"--smollm: bench/finetune_pair.py is not usable ({exc}); skipping the SmolLM2 pair")
        return {"skipped": f"bench.finetune_pair not importable: {exc}"}
    import deltahub
    from deltahub.formats.checkpoint import open_checkpoint

    pair_root = pair_dir or (work / "smollm-pair")
    log(f"SmolLM2 pair: ensure_pair({pair_root}) (may fine-tune on the CPU first)")
    base_dir, ft_dir = ensure_pair(pair_root)
    ck = open_checkpoint(Path(ft_dir))
    ft_disk = sum(e.nbytes for _r, e in ck.tensors.values())
    out: dict = {"base_dir": str(base_dir), "ft_dir": str(ft_dir), "ft_checkpoint_tensor_bytes": ft_disk, "modes": {}}
    with deltahub.Store(work / "smollm-store") as store:
        log("  add base")
        store.add(base_dir, name="smol-base")
        for mode in MODES:
            before = tree_bytes(store.home / "objects")
            t = time.perf_counter()
            res = store.compress(ft_dir, base="smol-base", name=f"smol-ft-{mode}", embeddings=mode)
            dt = time.perf_counter() - t
            grew = tree_bytes(store.home / "objects") - before
            log(f"  compress --embeddings {mode}: {dt:.1f} s, {fmt_bytes(res.stored_bytes)}")
            out["modes"][mode] = {
                "delta_bytes": res.stored_bytes,
                "objects_dir_growth_bytes": grew,
                "fp16_bytes": res.fp16_bytes,
                "delta_over_fp16": res.stored_bytes / res.fp16_bytes,
                "compression_x": res.fp16_bytes / res.stored_bytes,
                "codecs": res.codecs,
                "compress_seconds": dt,
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_args(p, LLAMA2_7B)
    add_workdir_args(p)
    p.add_argument("--smollm", action="store_true", help="also measure the real SmolLM2-135M pair")
    p.add_argument("--pair-dir", type=Path, default=None, help="where ensure_pair keeps the SmolLM2 pair")
    p.add_argument("--no-llama", action="store_true", help="skip the streamed Llama layout")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup_torch(args.threads)

    results: dict = {"goal_x": GOAL}
    rows = []
    with scratch_dir("size", args.workdir, args.keep) as work:
        if args.smollm:
            results["smollm2_135m"] = sm = smollm(work, args.pair_dir)
            for mode, r in sm.get("modes", {}).items():
                rows.append(
                    ["SmolLM2-135M real pair", mode, fmt_bytes(r["fp16_bytes"]), fmt_bytes(r["delta_bytes"]),
                     f"{r['delta_over_fp16']:.4f}", f"{r['compression_x']:.2f}x", "-"]
                )
        if not args.no_llama:
            results["llama_layout_streamed"] = ll = streamed_llama(args, work)
            label = "Llama-2-7B layout" if layout_from_args(args) == LLAMA2_7B else f"Llama layout ({args.layers} layers)"
            for mode, r in ll["modes"].items():
                rows.append(
                    [label + " (synthetic)", mode, fmt_bytes(r["fp16_bytes"]), fmt_bytes(r["delta_bytes"]),
                     f"{r['delta_over_fp16']:.4f}", f"{r['compression_x']:.2f}x",
                     ("yes" if r["goal_met"] else "NO") + f" (>= {GOAL:g}x)"]
                )
    print()
    print("Delta size vs the fp16 fine-tune (baseline: fp16 tensor bytes of the same model)")
    print_table(["model", "embeddings", "fp16 fine-tune", "delta", "delta/fp16", "fp16/delta", "goal met"], rows)
    if "llama_layout_streamed" in results:
        for mode, r in results["llama_layout_streamed"]["modes"].items():
            b = r["breakdown"]
            print(
                f"  {mode:5s} breakdown: sign1 matrices {fmt_bytes(b['sign1_matrices'])}, "
                f"embeddings+lm_head {fmt_bytes(b['embeddings_and_lm_head'])}, 1-D dense {fmt_bytes(b['dense_1d'])}, "
                f"manifest {fmt_bytes(b['manifest'])}"
            )
    print()
    write_results("size", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
