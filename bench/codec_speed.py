"""Micro-benchmark of deltahub.codec (sign packing, sign1 encode/decode).

Every figure is a median over several repeats and is reported next to a baseline measured
in the same run on the same matrix: ``torch.clone`` of the fp16 ``[N, K]`` matrix (a fresh
allocation, like decode's output). Each repeat times the clone and then the operation, and
the ratio column is the median of the per-repeat ratios (robust to load drifting on a
shared machine). Throughput is "fp16 GB/s": ``N*K*2`` bytes divided by the time, whatever
the operation really reads or writes. Lower ratio is better; the materialize goal is
decode <= 1.5x clone.

Alternatives kept here for comparison (the library uses the winners):
  pack:   numpy.packbits (library)  vs  pure torch (bits * byte weights, summed)
  unpack: int64 table of 8 int8 signs per byte, 1-D gather (library)
          vs  [256, 8] float table, row gather  vs  torch shifts & masks
  decode: int8-sign gather + tiles below torch's grain size on worker threads (library)
          vs  the same on one thread
          vs  [256, 8] float-table row gather in 512K-element tiles with torch's own
              (OpenMP) threads -- the first version; fine on an idle machine, many times
              slower when other processes compete for the cores
          vs  the naive reference formula (unchunked).
  (torch shifts + torch.where for decode was >10x slower than everything else; dropped.)

Usage:  PYTHONPATH=. python bench/codec_speed.py [--shapes 4096x4096,11008x4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import torch

from deltahub.codec import (
    decode_sign1,
    encode_sign1,
    pack_signs,
    packed_shape,
    reference_decode_sign1,
    unpack_signs,
)

DEFAULT_SHAPES = "4096x4096,11008x4096,32000x4096"
NAIVE_MAX_NUMEL = 64 << 20  # the naive reference needs ~12 bytes/element of temporaries


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(fn: Callable[[], object], baseline: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median time of fn, median of per-repeat fn/baseline ratios), baseline run just before."""
    fn()
    times, ratios = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)


# --- alternatives -------------------------------------------------------------------------

_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def torch_pack_signs(delta: torch.Tensor, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Pure-torch packing (same layout v1): bits * [1, 2, .., 128] summed per byte."""
    n, k = delta.shape
    _, w = packed_shape(n, k)
    out = torch.empty((n, w * 4), dtype=torch.uint8)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        bits = torch.zeros((r1 - r0, w * 32), dtype=torch.uint8)
        bits[:, :k] = delta[r0:r1] >= 0
        out[r0:r1] = (bits.view(r1 - r0, w * 4, 8) * _BYTE_WEIGHTS).sum(-1, dtype=torch.uint8)
    return out.view(torch.int32)


def torch_unpack_signs(packed: torch.Tensor, k: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Pure-torch unpacking: shifts and masks, then 2*bit - 1."""
    n, w = packed.shape
    by = packed.view(torch.uint8)
    out = torch.empty((n, k), dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        bits = (by[r0:r1].unsqueeze(-1) >> _SHIFTS) & 1
        out[r0:r1] = bits.view(r1 - r0, w * 32)[:, :k].to(torch.float32) * 2 - 1
    return out


def _float_lut(scale: torch.Tensor) -> torch.Tensor:
    byte = torch.arange(256).unsqueeze(1)
    return ((((byte >> torch.arange(8)) & 1) * 2 - 1).to(torch.float32) * scale).contiguous()


def rowlut_unpack_signs(packed: torch.Tensor, k: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Unpacking with a [256, 8] float table (row gather)."""
    n, w = packed.shape
    lut = _float_lut(torch.tensor(1.0))
    by = packed.view(torch.uint8)
    out = torch.empty((n, k), dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        idx = by[r0:r1].reshape(-1).to(torch.int32)
        out[r0:r1] = torch.index_select(lut, 0, idx).view(r1 - r0, w * 32)[:, :k]
    return out


def rowlut_decode(
    base: torch.Tensor, packed: torch.Tensor, scale: float, out_dtype: torch.dtype,
    tile_elems: int = 1 << 19,
) -> torch.Tensor:
    """First version: [256, 8] float table of +-s, 512K-element tiles, torch's threads."""
    n, k = base.shape
    w = packed.shape[1]
    lut = _float_lut(torch.tensor(scale, dtype=torch.float32))
    by = packed.view(torch.uint8)
    rows = max(1, min(n, tile_elems // (w * 32)))
    out = torch.empty((n, k), dtype=out_dtype)
    idx_buf = torch.empty(rows * w * 4, dtype=torch.int32)
    sgn_buf = torch.empty((rows * w * 4, 8), dtype=torch.float32)
    acc_buf = torch.empty((rows, k), dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        r = r1 - r0
        idx = idx_buf[: r * w * 4]
        idx.copy_(by[r0:r1].reshape(-1))
        sgn = sgn_buf[: r * w * 4]
        torch.index_select(lut, 0, idx, out=sgn)
        acc = acc_buf[:r]
        acc.copy_(base[r0:r1])
        acc.add_(sgn.view(r, w * 32)[:, :k])
        out[r0:r1].copy_(acc)
    return out


def single_thread_decode(
    base: torch.Tensor, packed: torch.Tensor, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """The library decode on the calling thread only."""
    return decode_sign1(base, packed, scale, out_dtype, threads=1)


# --- benchmark ----------------------------------------------------------------------------


def bench_shape(n: int, k: int, repeats: int, alternatives: bool) -> None:
    gen = torch.Generator().manual_seed(n * 100003 + k)
    base = torch.randn((n, k), generator=gen).to(torch.float16)
    ft = (base.float() + 0.01 * torch.randn((n, k), generator=gen)).to(torch.float16)
    delta = ft.float() - base.float()
    nbytes = n * k * 2
    print(f"\n== [{n} x {k}]  fp16 matrix = {nbytes / 2**20:.0f} MiB, torch threads = "
          f"{torch.get_num_threads()}")

    def clone() -> object:
        return base.clone()

    t_clone = median_time(clone, repeats)
    dst = torch.empty_like(base)
    t_copy = median_time(lambda: dst.copy_(base), repeats)
    del dst

    def row(label: str, fn: Callable[[], object], reps: int = repeats) -> None:
        t, ratio = paired(fn, clone, reps)
        print(f"  {label:<46s} {t * 1e3:9.2f} ms {nbytes / t / 1e9:7.2f} fp16-GB/s"
              f"  x clone {ratio:6.2f}")

    print(f"  {'baseline: torch.clone(fp16)':<46s} {t_clone * 1e3:9.2f} ms "
          f"{nbytes / t_clone / 1e9:7.2f} fp16-GB/s  x clone   1.00")
    print(f"  {'(info) copy_ into preallocated fp16':<46s} {t_copy * 1e3:9.2f} ms "
          f"{nbytes / t_copy / 1e9:7.2f} fp16-GB/s  x clone {t_copy / t_clone:6.2f} (unpaired)")

    packed = pack_signs(delta)
    row("pack_signs numpy.packbits [library]", lambda: pack_signs(delta))
    if alternatives:
        assert torch.equal(torch_pack_signs(delta), packed)
        row("pack_signs pure torch", lambda: torch_pack_signs(delta))

    row("unpack_signs fp32 int8-sign gather [library]", lambda: unpack_signs(packed, k))
    if alternatives:
        signs = unpack_signs(packed, k)
        assert torch.equal(torch_unpack_signs(packed, k), signs)
        assert torch.equal(rowlut_unpack_signs(packed, k), signs)
        del signs
        row("unpack_signs fp32 float-table row gather", lambda: rowlut_unpack_signs(packed, k))
        row("unpack_signs fp32 shifts", lambda: torch_unpack_signs(packed, k))
    del delta

    enc = encode_sign1(base, ft)
    row("encode_sign1 fp16/fp16 [library]", lambda: encode_sign1(base, ft), max(1, repeats // 2))
    del ft

    p, sc = enc.packed, enc.scale
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(out_dtype).replace("torch.", "")
        row(f"decode_sign1 fp16->{name} [library]", lambda: decode_sign1(base, p, sc, out_dtype))
        if out_dtype == torch.float16 and alternatives:
            got = decode_sign1(base, p, sc, out_dtype)
            assert torch.equal(single_thread_decode(base, p, sc, out_dtype), got)
            assert torch.equal(rowlut_decode(base, p, sc, out_dtype), got)
            del got
            row(f"decode fp16->{name} library, 1 thread",
                lambda: single_thread_decode(base, p, sc, out_dtype))
            row(f"decode fp16->{name} float-table, torch threads",
                lambda: rowlut_decode(base, p, sc, out_dtype))
            if n * k <= NAIVE_MAX_NUMEL:
                row(f"decode fp16->{name} naive reference",
                    lambda: reference_decode_sign1(base, p, sc, out_dtype), max(1, repeats // 2))

    base_bf16 = base.to(torch.bfloat16)
    row("decode_sign1 bf16->bf16 [library]",
        lambda: decode_sign1(base_bf16, p, sc, torch.bfloat16))

    # Without page faults: both write into a reused, already-touched buffer.
    buf = torch.empty_like(base)
    buf.zero_()
    t_copy2, _ = paired(lambda: buf.copy_(base), clone, repeats)
    t_dec2, ratio = paired(lambda: decode_sign1(base, p, sc, torch.float16, out=buf), clone, repeats)
    print(f"  {'decode fp16->fp16 into reused out=':<46s} {t_dec2 * 1e3:9.2f} ms "
          f"{nbytes / t_dec2 / 1e9:7.2f} fp16-GB/s  x clone {ratio:6.2f}  "
          f"x copy_ into the same buffer {t_dec2 / t_copy2:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-alternatives", action="store_true",
                        help="time the alternatives on every shape, not just the first")
    args = parser.parse_args()
    torch.manual_seed(0)
    for i, spec in enumerate(args.shapes.split(",")):
        n, k = (int(v) for v in spec.lower().split("x"))
        bench_shape(n, k, args.repeats, alternatives=i == 0 or args.all_alternatives)


if __name__ == "__main__":
    main()
