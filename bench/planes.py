"""Bytes against weight-space fidelity of the ``planes`` codec, and the ``lossless`` codec's ratio.

For a real (base, fine-tune) pair of HF checkpoint folders, over every 2-D floating matrix with the
base's shape (embeddings included, as ``compress`` does by default):

* for 1–4 sign planes × scale granularity (matrix, row, group of 128): the bytes the parts take and
  the relative error ``‖Δ − Δ̂‖ / ‖Δ‖`` over all matrices (the codec's own encode and exact decode);
* the ``lossless`` codec at fp16, bf16 and fp32 (the pair cast to each): the bytes after the store's
  zstd (level 3 where it saves ≥ 5 %, per part) against the fine-tune's own bytes in that dtype.

Weight-space error is a proxy: the model-output measure (perplexity, KL) of the same deltas is in the
demo's table (``bench/README.md``). Usage::

    python bench/planes.py BASE_DIR FT_DIR [--max-tensors N]

Prints a table and a final JSON line; writes ``bench/results/planes.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_bytes, log, machine_info, print_table, setup_torch, write_results  # noqa: E402

from deltahub import codec as codecs  # noqa: E402
from deltahub.formats.checkpoint import open_checkpoint  # noqa: E402

GRANULARITY = [("matrix", None), ("row", None), ("group", 128)]


def _zstd_size(data: bytes) -> int:
    """What the store keeps for a compressible part: zstd level 3 if it saves ≥ 5 %, else raw."""
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    return len(packed) if len(packed) <= 0.95 * len(data) else len(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("ft", type=Path)
    ap.add_argument("--max-tensors", type=int, default=0, help="only the first N matrices (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    setup_torch(args.threads)
    base_ck, ft_ck = open_checkpoint(args.base), open_checkpoint(args.ft)
    names = [n for n in sorted(ft_ck.tensors) if n in base_ck.tensors and len(ft_ck.shape(n)) == 2
             and ft_ck.shape(n) == base_ck.shape(n) and ft_ck.dtype(n).is_floating_point]
    if args.max_tensors:
        names = names[: args.max_tensors]
    planes = codecs.get("planes")
    lossless = codecs.get("lossless")
    err_sq: dict[tuple[str, int], float] = {}
    nbytes: dict[tuple[str, int], int] = {}
    delta_sq = 0.0
    n_weights = 0
    ll_bytes = {"float16": 0, "bfloat16": 0, "float32": 0}
    own_bytes = dict.fromkeys(ll_bytes, 0)
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        base, ft = base_ck.read(name), ft_ck.read(name)
        delta = ft.float() - base.float()
        delta_sq += float(delta.double().pow(2).sum())
        n_weights += delta.numel()
        for gran, group in GRANULARITY:
            enc = planes.encode(base, ft, planes=4, scales=gran, group_size=group)
            for k in range(1, 5):
                params, keep = planes.prefix(enc.params, {p: p for p in enc.parts}, k)
                parts = {p: enc.parts[p] for p in keep}
                got = planes.decode(base, parts, params, torch.float32)
                err_sq[(gran, k)] = err_sq.get((gran, k), 0.0) + float((got - ft.float()).double().pow(2).sum())
                nbytes[(gran, k)] = nbytes.get((gran, k), 0) + sum(t.numel() * t.element_size() for t in parts.values())
        for dname, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
            b, f = base.to(dtype), ft.to(dtype)
            enc = lossless.encode(b, f)
            ll_bytes[dname] += sum(_zstd_size(t.numpy().tobytes()) for t in enc.parts.values())
            own_bytes[dname] += f.numel() * f.element_size()
        if i % 20 == 0:
            log(f"  {i + 1}/{len(names)} matrices, {time.perf_counter() - t0:.0f} s")
    rows = []
    out: dict[str, object] = {"matrices": len(names), "weights": n_weights, "planes": {}, "lossless": {}}
    for gran, _group in GRANULARITY:
        for k in range(1, 5):
            rel = math.sqrt(err_sq[(gran, k)] / delta_sq) if delta_sq else 0.0
            bpw = 8 * nbytes[(gran, k)] / n_weights
            rows.append([gran, k, f"{bpw:.3f}", fmt_bytes(nbytes[(gran, k)]), f"{rel:.4f}"])
            out["planes"][f"{gran}-{k}"] = {"bits_per_weight": bpw, "bytes": nbytes[(gran, k)], "rel_error": rel}  # type: ignore[index]
    print_table(["scales", "planes", "bits/weight", "bytes", "rel. error ‖Δ−Δ̂‖/‖Δ‖"], rows)
    rows = []
    for dname in ll_bytes:
        ratio = own_bytes[dname] / ll_bytes[dname] if ll_bytes[dname] else math.inf
        rows.append([dname, fmt_bytes(own_bytes[dname]), fmt_bytes(ll_bytes[dname]), f"{ratio:.2f}x"])
        out["lossless"][dname] = {"own_bytes": own_bytes[dname], "stored_bytes": ll_bytes[dname], "ratio": ratio}  # type: ignore[index]
    print()
    print_table(["lossless dtype", "fine-tune's own", "stored (zstd)", "ratio"], rows)
    out["machine"] = machine_info()
    write_results("planes", out)  # also prints the final JSON line
    return 0


if __name__ == "__main__":
    sys.exit(main())
