"""GPU benchmark of deltahub's Triton kernels (issue 5). Runs unattended with only torch + triton.

    python bench/kernels_gpu.py --out results.json        # on a CUDA machine (H100: ~3-6 min)
    python bench/kernels_gpu.py --smoke --out smoke.json  # CPU, TRITON_INTERPRET=1, tiny shapes

It needs no deltahub install and no network: the kernels are loaded by path from ``kernels/`` next
to this folder (as the package ``dh_kernels``), and this script imports nothing else of the repo.

Measured, in one run (medians; CUDA-event timing; ``triton.testing.do_bench`` flushes L2):

1. **Bandwidth baseline**: a device-to-device copy of ``--copy-gb`` (bytes = read + write).
2. **Kernel throughput** for ``N = K`` in ``--sizes`` (4096, 8192) at batch ``M`` in
   ``--kernel-batches`` (1, 8, 32), fp16: ``sign_matmul`` with the base weight (bytes = fp16 W +
   packed bits + x + y) and delta only, cuBLAS ``x @ W.T`` (the plain base GEMV/GEMM), and
   ``apply_delta`` (W read + out written + bits). GB/s and % of the copy bandwidth; the fused
   kernel's time over cuBLAS's (ideal: 1 + 1/16, the extra bits).
3. **Decode step** of a Llama-7B-shaped stack (``--layers`` layers of q/k/v/o 4096x4096,
   gate/up 11008x4096, down 4096x11008) for B = ``--tenants`` (1, 8, 16, 32, 64) tenants, one row
   (one token) each, every row a different fine-tune:

   (a) fused multi-tenant kernel (shared base read once, each tenant's bits once), each strategy;
   (b) B separate fp16 models: B cuBLAS GEMVs per linear over distinct weights (a pool of
       ``--separate-pool-gb`` of weight copies, cycled; each copy is far larger than L2, so every
       GEMV reads its weights from memory, as B real models would);
   (c) the unfused approach (the BitDelta reference's structure): the base GEMM for the batch, then
       per tenant a separate sign GEMM kernel reading the packed bits, then the scale-and-add.

   Each step is captured in a CUDA graph (no launch overhead; ``--no-graph`` to disable). Printed:
   speed-up of (a) over (b) beside the memory-traffic bound ``16B/(16+B)`` and its fraction of it,
   and the speed-up of (a) over (c). Goals (issue 5): >= 80% of the bound and >= 4x over (c) at B=64.
4. **Planes kernels** (issue 11, codec ``planes``): ``planes_matmul`` (base + delta, fp16) for
   ``--planes`` (1, 2, 4) sign planes with per-row and per-group-of-128 scales, ``N = K`` in
   ``--planes-sizes`` (4096, 8192) at batch ``M`` in ``--kernel-batches``: GB/s (bytes = fp16 W + P planes of bits +
   scales + x + y) and % of the copy bandwidth, and its time over sign1's fused kernel (same N, K,
   M; ideal ``(16 + P + scale bytes) / 17``); and ``multi_tenant_planes_matmul`` (rows and grouped)
   for B = max(``--tenants``) tenants, one row each, over ``multi_tenant_sign_matmul``.

Outputs are checked against the kernels' torch references (and (a) against (c)) before timing; a
mismatch is reported in the JSON and the exit status is 1. Results: a table per section on
stdout, then one JSON line; the same JSON is written to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_T0 = time.perf_counter()
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    print(f"\n## {title}")
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def load_kernels():
    """Import ``kernels/`` by path as the package ``dh_kernels`` (no deltahub install needed)."""
    init = REPO / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location("dh_kernels", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dh_kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ timing
class Timer:
    """Median time of a callable: ``triton.testing.do_bench`` (L2 flushed) or CUDA-graph replays on
    a GPU; ``time.perf_counter`` on the CPU (smoke mode: the numbers mean nothing there)."""

    def __init__(self, device: str, reps: int, graphs: bool) -> None:
        self.device, self.reps, self.graphs = device, reps, graphs

    def kernel_ms(self, fn) -> float:
        if self.device != "cuda":
            return self._cpu_ms(fn)
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, self.reps * 10), return_mode="median"))

    def step_ms(self, fn) -> tuple[float, str]:
        """A whole decode step: (median ms, how it was timed)."""
        if self.device != "cuda":
            return self._cpu_ms(fn), "cpu perf_counter"
        import torch

        fn()  # autotune + warm up, outside any graph
        torch.cuda.synchronize()
        if self.graphs:
            try:
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()  # warm-up on the side stream, as torch recommends before capture
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):
                    fn()
                return self._events_ms(graph.replay), "cuda graph"
            except Exception as exc:  # noqa: BLE001 - report and time eagerly instead
                log(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
                torch.cuda.synchronize()
        return self._events_ms(fn), "eager"

    def _events_ms(self, fn) -> float:
        import torch

        for _ in range(3):
            fn()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _cpu_ms(self, fn) -> float:
        times = []
        for _ in range(max(1, self.reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# ------------------------------------------------------------------------------------------- data
def random_packed(torch, shape: tuple[int, ...], k: int, gen, device: str):
    """Random int32 packed signs ``[..., ceil(k/32)]`` with zero padding bits (layout v1)."""
    words = (k + 31) // 32
    p = torch.randint(-(2**31), 2**31, (*shape, words), dtype=torch.int64, generator=gen).to(torch.int32)
    if k % 32:
        p[..., -1] &= (1 << (k % 32)) - 1
    return p.to(device)


def rel_err(torch, y, ref) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _fmt(x: float, d: int = 1) -> str:
    return f"{x:.{d}f}"


# ------------------------------------------------------------------------------------------ bench
def bench_copy(torch, timer: Timer, device: str, gb: float) -> dict:
    n = int(gb * GB) // 2
    src = torch.randn(n, dtype=torch.float16, device=device) if device == "cpu" else torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer.kernel_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return {"bytes": moved, "ms": ms, "gbps": moved / (ms * 1e-3) / GB}


def bench_kernels(torch, K, timer: Timer, device: str, sizes: list[int], batches: list[int], copy_gbps: float, tol: float):
    gen = torch.Generator().manual_seed(0)
    rows, out, bad = [], [], []
    for size in sizes:
        n = k = size
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.float16)
        packed = random_packed(torch, (n,), k, gen, device)
        scale = torch.tensor(0.003, device=device)
        bits = packed.numel() * 4
        wbytes = w.numel() * 2
        for m in batches:
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.float16)
            io = 2 * m * k + 2 * m * n
            err = rel_err(torch, K.sign_matmul(x, packed, scale, w), K.sign_matmul_ref(x, packed, scale, w))
            err_d = rel_err(torch, K.sign_matmul(x, packed, scale), K.sign_matmul_ref(x, packed, scale))
            if max(err, err_d) > tol:
                bad.append(f"sign_matmul {n}x{k} M={m}: rel err {err:.2e} / {err_d:.2e}")
            cases = [
                ("cuBLAS x@W.T (base only)", lambda: torch.nn.functional.linear(x, w), wbytes + io),
                ("sign_matmul (W + delta)", lambda: K.sign_matmul(x, packed, scale, w), wbytes + bits + io),
                ("sign_matmul (delta only)", lambda: K.sign_matmul(x, packed, scale), bits + io),
            ]
            times = {}
            for name, fn, moved in cases:
                ms = timer.kernel_ms(fn)
                times[name] = ms
                gbps = moved / (ms * 1e-3) / GB
                entry = {"kernel": name, "n": n, "k": k, "m": m, "ms": ms, "bytes": moved, "gbps": gbps,
                         "frac_of_copy": gbps / copy_gbps}
                out.append(entry)
                rows.append([name, f"{n}x{k}", m, f"{ms * 1e3:.1f}", _fmt(gbps), f"{100 * gbps / copy_gbps:.0f}%"])
            ratio = times["sign_matmul (W + delta)"] / times["cuBLAS x@W.T (base only)"]
            out.append({"kernel": "ratio fused/cuBLAS", "n": n, "k": k, "m": m, "ratio": ratio, "ideal": 1 + 1 / 16})
            rows.append(["  time fused / cuBLAS", f"{n}x{k}", m, f"{ratio:.3f} (ideal {1 + 1 / 16:.3f})", "", ""])
        # apply_delta: read W + write out + bits
        dst = torch.empty_like(w)
        if not torch.equal(K.apply_delta(w, packed, scale, out=dst), K.apply_delta_ref(w, packed, scale)):
            bad.append(f"apply_delta {n}x{k}: not bit-identical to apply_delta_ref")
        ms = timer.kernel_ms(lambda: K.apply_delta(w, packed, scale, out=dst))
        moved = 2 * wbytes + bits
        gbps = moved / (ms * 1e-3) / GB
        out.append({"kernel": "apply_delta", "n": n, "k": k, "ms": ms, "bytes": moved, "gbps": gbps, "frac_of_copy": gbps / copy_gbps})
        rows.append(["apply_delta", f"{n}x{k}", "-", f"{ms * 1e3:.1f}", _fmt(gbps), f"{100 * gbps / copy_gbps:.0f}%"])
        del w, packed, dst
    print_table("kernel throughput (fp16)", ["kernel", "N x K", "M", "time us", "GB/s", "of copy"], rows)
    return out, bad


def random_plane_scales(torch, lead: tuple[int, ...], n: int, k: int, granularity: str, gen, device: str):
    """fp32 scales ``[*lead, R, C]``: ``"row"`` → ``[N, 1]``, ``"group128"`` → ``[N, ceil(K/128)]``."""
    c = -(-k // 128) if granularity == "group128" else 1
    return (torch.rand(*lead, n, c, generator=gen) * 0.004 + 0.001).to(device)


def bench_planes(torch, K, timer: Timer, device: str, args, copy_gbps: float, tol: float):
    """Section 4: the planes kernels beside sign1's (see the module docstring)."""
    gen = torch.Generator().manual_seed(2)
    rows, mt_rows, out, bad = [], [], [], []
    for size in args.planes_sizes:
        n, k = args.planes_n or size, size
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.float16)
        sign = random_packed(torch, (n,), k, gen, device)
        scale = torch.tensor(0.003, device=device)
        bits = sign.numel() * 4
        for m in args.kernel_batches:
            x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.float16)
            io = 2 * m * k + 2 * m * n
            t_sign = timer.kernel_ms(lambda: K.sign_matmul(x, sign, scale, w))
            for p in args.planes:
                packed = random_packed(torch, (p, n), k, gen, device)
                for gran in ("row", "group128"):
                    sc = random_plane_scales(torch, (p,), n, k, gran, gen, device)
                    g = 128 if gran == "group128" else None
                    err = rel_err(torch, K.planes_matmul(x, packed, sc, w, group_size=g),
                                  K.planes_matmul_ref(x, packed, sc, w, group_size=g))
                    if err > tol:
                        bad.append(f"planes_matmul {n}x{k} M={m} P={p} {gran}: rel err {err:.2e}")
                    ms = timer.kernel_ms(lambda: K.planes_matmul(x, packed, sc, w, group_size=g))
                    moved = 2 * n * k + p * bits + sc.numel() * 4 + io
                    gbps = moved / (ms * 1e-3) / GB
                    ideal = moved / (2 * n * k + bits + io)
                    out.append({"kernel": "planes_matmul (W + delta)", "n": n, "k": k, "m": m, "planes": p, "scales": gran,
                                "ms": ms, "bytes": moved, "gbps": gbps, "frac_of_copy": gbps / copy_gbps,
                                "sign1_ms": t_sign, "ratio_vs_sign1": ms / t_sign, "ideal_ratio_vs_sign1": ideal})
                    rows.append([f"P={p} {gran}", f"{n}x{k}", m, f"{ms * 1e3:.1f}", _fmt(gbps),
                                 f"{100 * gbps / copy_gbps:.0f}%", f"{ms / t_sign:.2f} (ideal {ideal:.2f})"])
                del packed
        # multi-tenant: B tenants, one row each (a decode step of one square linear)
        b = max(args.tenants)
        x = torch.randn(b, k, generator=gen).to(device=device, dtype=torch.float16)
        tenant = torch.arange(b, dtype=torch.int32, device=device)
        signs_t = random_packed(torch, (b, n), k, gen, device)
        scales_t = (torch.rand(b, generator=gen) * 0.004 + 0.001).to(device)
        t_mt_sign = min(timer.kernel_ms(lambda s=s: K.multi_tenant_sign_matmul(x, w, signs_t, scales_t, tenant,
                                                                               validate=False, strategy=s))
                        for s in args.strategies)
        for p in args.planes:
            packed = random_packed(torch, (b, p, n), k, gen, device)
            for gran in ("row", "group128"):
                sc = random_plane_scales(torch, (b, p), n, k, gran, gen, device)
                g = 128 if gran == "group128" else None
                ref = K.multi_tenant_planes_matmul_ref(x, w, packed, sc, tenant, group_size=g)
                times = {}
                for strategy in args.strategies:
                    fn = lambda s=strategy: K.multi_tenant_planes_matmul(x, w, packed, sc, tenant, group_size=g,  # noqa: E731
                                                                       validate=False, strategy=s)
                    err = rel_err(torch, fn(), ref)
                    if err > tol:
                        bad.append(f"multi_tenant_planes {n}x{k} B={b} P={p} {gran} {strategy}: rel err {err:.2e}")
                    times[strategy] = timer.kernel_ms(fn)
                best = min(times, key=times.get)
                moved = 2 * n * k + b * (p * (n * ((k + 31) // 32) * 4) + sc[0].numel() * 4) + 4 * b * (k + n)
                gbps = moved / (times[best] * 1e-3) / GB
                out.append({"kernel": "multi_tenant_planes_matmul", "n": n, "k": k, "tenants": b, "planes": p,
                            "scales": gran, "ms": times, "best_strategy": best, "bytes": moved, "gbps": gbps,
                            "frac_of_copy": gbps / copy_gbps, "sign1_ms": t_mt_sign,
                            "ratio_vs_sign1": times[best] / t_mt_sign})
                mt_rows.append([f"P={p} {gran}", f"{n}x{k}", b, *(f"{times[s] * 1e3:.1f}" for s in args.strategies),
                                f"{t_mt_sign * 1e3:.1f}", _fmt(gbps), f"{100 * gbps / copy_gbps:.0f}%",
                                f"{times[best] / t_mt_sign:.2f}"])
            del packed
        del w, sign, signs_t
    print_table("planes_matmul (fp16, base + delta) vs sign1's sign_matmul", ["planes / scales", "N x K", "M", "time us", "GB/s",
                "of copy", "time / sign1"], rows)
    print_table("multi_tenant_planes_matmul (fp16, one row per tenant) vs multi_tenant_sign_matmul",
                ["planes / scales", "N x K", "B", *(f"{s} us" for s in args.strategies), "sign1 us", "GB/s", "of copy",
                 "time / sign1"], mt_rows)
    return out, bad


def llama_linears(hidden: int, inter: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of one Llama layer's linears."""
    return [("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden), ("o", hidden, hidden),
            ("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]


def bench_decode(torch, K, timer: Timer, device: str, args, tol: float):
    gen = torch.Generator().manual_seed(1)
    lin = llama_linears(args.hidden, args.intermediate) * args.layers
    tmax = max(args.tenants)
    base = [(torch.randn(n, k, generator=gen) * 0.02).to(device=device, dtype=torch.float16) for _, n, k in lin]
    packed = [random_packed(torch, (tmax, n), k, gen, device) for _, n, k in lin]
    scales = (torch.rand(tmax, generator=gen) * 0.004 + 0.001).to(device)
    scale_list = scales.tolist()
    model_bytes = sum(2 * n * k for _, n, k in lin)
    delta_bytes = sum(p[0].numel() * 4 for p in packed)
    pool_n = max(1, min(tmax, int(args.separate_pool_gb * GB // model_bytes)))
    log(f"decode stack: {len(lin)} linears, {model_bytes / GB:.2f} GB fp16 per model, "
        f"{delta_bytes / 1e6:.1f} MB per delta; pool of {pool_n} separate model copies for (b)")
    pool = [[(w.clone() if i else w) for w in base] for i in range(pool_n)]  # copy 0 is the base itself

    rows, out, bad = [], [], []
    for b in args.tenants:
        xs = {k: torch.randn(b, k, generator=gen).to(device=device, dtype=torch.float16) for k in {k for _, _, k in lin}}
        tenant = torch.arange(b, dtype=torch.int32, device=device)
        sc = scales[:b].contiguous()

        def fused(strategy):
            def step():
                for (_, _, k), w, p in zip(lin, base, packed):
                    K.multi_tenant_sign_matmul(xs[k], w, p[:b], sc, tenant, validate=False, strategy=strategy)
            return step

        def separate():
            for i in range(b):
                model = pool[i % pool_n]
                for (_, _, k), w in zip(lin, model):
                    torch.nn.functional.linear(xs[k][i : i + 1], w)

        def unfused_one(k, w, p):
            y = torch.nn.functional.linear(xs[k], w)
            for i in range(b):
                y[i : i + 1].add_(K.sign_matmul(xs[k][i : i + 1], p[i], 1.0), alpha=scale_list[i])
            return y

        def unfused():
            for (_, _, k), w, p in zip(lin, base, packed):
                unfused_one(k, w, p)

        # correctness on the first and the last linear: (a) vs the reference and vs (c)
        for j in sorted({0, len(lin) - 1}):
            _, _, k = lin[j]
            ref = K.multi_tenant_sign_matmul_ref(xs[k], base[j], packed[j][:b], sc, tenant)
            y_unfused = unfused_one(k, base[j], packed[j])
            for strategy in args.strategies:
                y = K.multi_tenant_sign_matmul(xs[k], base[j], packed[j][:b], sc, tenant, strategy=strategy)
                for label, other in (("reference", ref), ("unfused", y_unfused)):
                    e = rel_err(torch, y, other)
                    if e > tol:
                        bad.append(f"decode B={b} linear {j} {strategy} vs {label}: rel err {e:.2e}")

        t = {}
        how = ""
        for strategy in args.strategies:
            t[f"fused_{strategy}"], how = timer.step_ms(fused(strategy))
        t["separate"], _ = timer.step_ms(separate)
        t["unfused"], _ = timer.step_ms(unfused)
        best = min(args.strategies, key=lambda s: t[f"fused_{s}"])
        ta = t[f"fused_{best}"]
        bound = 16 * b / (16 + b)
        speedup = t["separate"] / ta
        vs_unfused = t["unfused"] / ta
        moved = model_bytes + b * delta_bytes
        entry = {"tenants": b, "ms": t, "best_strategy": best, "timing": how, "speedup_vs_separate": speedup,
                 "bound_16B_over_16_plus_B": bound, "frac_of_bound": speedup / bound, "speedup_vs_unfused": vs_unfused,
                 "fused_bytes": moved, "fused_gbps": moved / (ta * 1e-3) / GB}
        out.append(entry)
        rows.append([b, *(f"{t[f'fused_{s}']:.3f}" for s in args.strategies), f"{t['separate']:.3f}", f"{t['unfused']:.3f}",
                     f"{speedup:.2f}x", f"{bound:.2f}x", f"{100 * speedup / bound:.0f}%", f"{vs_unfused:.2f}x",
                     _fmt(entry["fused_gbps"])])
        log(f"B={b}: fused {ta:.3f} ms ({best}), separate {t['separate']:.3f} ms, unfused {t['unfused']:.3f} ms")
        del xs
    headers = ["B", *(f"(a) {s} ms" for s in args.strategies), "(b) separate ms", "(c) unfused ms",
               "(a) vs (b)", "bound 16B/(16+B)", "of bound", "(a) vs (c)", "(a) GB/s"]
    print_table(f"decode step, {args.layers} Llama-7B-shaped layers, fp16, one row per tenant", headers, rows)
    return out, bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernels_gpu.json", help="results JSON file")
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: checks the script, not speed")
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 8192])
    ap.add_argument("--kernel-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--tenants", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 16, 32, 64])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=2, help="Llama layers in the decode stack (per-layer cost is what counts)")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=["grouped", "rows"],
                    help="multi-tenant kernel strategies to time (a)")
    ap.add_argument("--separate-pool-gb", type=float, default=24.0, help="memory for (b)'s distinct model copies")
    ap.add_argument("--planes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4],
                    help="sign planes per delta for the planes kernels (section 4)")
    ap.add_argument("--planes-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 8192],
                    help="N = K of the planes kernels' matrices (section 4)")
    ap.add_argument("--planes-n", type=int, default=0, help="N of the planes kernels' matrices (0: N = K)")
    ap.add_argument("--copy-gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-graph", action="store_true", help="time decode steps eagerly, not as CUDA graphs")
    args = ap.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.sizes, args.kernel_batches, args.tenants = [48], [3], [1, 3]
        args.hidden, args.intermediate, args.layers = 40, 72, 1
        args.copy_gb, args.separate_pool_gb, args.reps = 0.001, 0.001, 1
        args.planes_sizes, args.planes_n, args.planes = [160], 24, [1, 2, 4]  # K = 160: a partial 2nd group of 128

    import torch
    import triton

    K = load_kernels()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if not K.triton_can_run(torch.zeros(1, device=device)):
        print(f"Triton cannot run: {K.triton_unavailable_reason(torch.zeros(1, device=device))}", file=sys.stderr)
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer(device, args.reps, graphs=not args.no_graph)
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu (interpreter) {platform.processor()}",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "smoke": args.smoke, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    log(f"device {info['device']}, torch {torch.__version__}, triton {triton.__version__}")
    tol = 2e-2  # fp16 outputs, fp32 sums in different orders: ~1e-3 expected

    copy = bench_copy(torch, timer, device, args.copy_gb)
    print_table("bandwidth baseline", ["op", "bytes", "time ms", "GB/s"],
                [["device-to-device copy", f"{copy['bytes'] / GB:.2f} GB", f"{copy['ms']:.3f}", _fmt(copy["gbps"])]])
    kernels, bad_k = bench_kernels(torch, K, timer, device, args.sizes, args.kernel_batches, copy["gbps"], tol)
    decode, bad_d = bench_decode(torch, K, timer, device, args, tol)
    planes, bad_p = bench_planes(torch, K, timer, device, args, copy["gbps"], tol)
    at_max = decode[-1]
    goals = {
        "tenants": at_max["tenants"],
        "frac_of_bound": at_max["frac_of_bound"], "frac_of_bound_goal": 0.8,
        "speedup_vs_unfused": at_max["speedup_vs_unfused"], "speedup_vs_unfused_goal": 4.0,
        "met": at_max["frac_of_bound"] >= 0.8 and at_max["speedup_vs_unfused"] >= 4.0,
    }
    print(f"\nat B={goals['tenants']}: {100 * goals['frac_of_bound']:.0f}% of the 16B/(16+B) bound (goal 80%), "
          f"{goals['speedup_vs_unfused']:.2f}x the unfused approach (goal 4x)" + (" [smoke: times mean nothing]" if args.smoke else ""))
    results = {"info": info, "copy": copy, "kernels": kernels, "decode": decode, "goals_at_max_B": goals,
               "planes": planes, "mismatches": bad_k + bad_d + bad_p}
    for m in results["mismatches"]:
        print(f"MISMATCH: {m}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    log(f"wrote {args.out}")
    return 1 if results["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
