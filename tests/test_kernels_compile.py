"""Every Triton kernel of deltahub.kernels compiled ahead of time for sm_80 and sm_90 (no GPU needed).

The interpreter accepts code the compiler rejects (non-constexpr globals, layouts that cannot be
converted, shared memory or register limits at ptxas time), so each kernel is compiled for real with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to a cubin, in a subprocess
that does not have ``TRITON_INTERPRET`` set and uses an empty Triton cache (a cached kernel would
prove nothing).

What is compiled: for sm_90 (the H100/H200 the GPU benchmark runs on) every autotuning config of
every kernel, specialized as Triton does for contiguous tensors on a GPU (unit strides as constants,
16-divisible pointers and sizes), in fp16 with all optional inputs; for sm_80 the first config of
each kernel so (to keep the test fast on 2 cores); and for both targets, on one config per kernel,
the other dtypes (bf16, and fp32 with IEEE ``tl.dot``) and the variants without base weight / bias /
scale pointer, unspecialized. The planes kernels (``tl_planes``): every config of
``planes_matmul_kernel`` for sm_90, the first config of each multi-tenant one, and variants (bf16,
fp32, 1 plane per row without base or bias, 8 planes) on both targets.
Running the kernels needs a GPU: ``bench/kernels_gpu.py`` does that.

Run as a script (``python tests/test_kernels_compile.py --cc 90``) it compiles and prints one JSON
line of results; the test runs it for both targets at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# argument-name -> signature type; "X" = the activation dtype
_PTR_TYPES = {
    "x_ptr": "X", "w_ptr": "X", "b_ptr": "X", "y_ptr": "X", "o_ptr": "X",
    "p_ptr": "i32", "scale_ptr": "fp32", "scales_ptr": "fp32", "s_ptr": "fp32", "t_ptr": "i64",
}
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_pw", "stride_yn", "stride_ok"}
_TL = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _cases(all_configs: bool) -> list[dict]:
    """(kernel, dtype, flags, config, specialized) to compile; imported lazily by the child."""
    from deltahub.kernels import tl_common as c

    cases = []

    def add(kernel, configs, flags, variants, every_config=True):
        for cfg in configs if all_configs and every_config else configs[:1]:  # fp16, everything on, specialized
            cases.append(dict(kernel=kernel, dtype="float16", flags=flags, config=cfg, specialized=True))
        for dtype, override in variants:  # other dtypes / flags on the first config, generic
            cases.append(dict(kernel=kernel, dtype=dtype, flags={**flags, **override}, config=configs[0], specialized=False))

    mm = dict(HAS_WEIGHT=True, HAS_BIAS=True, SCALE_FROM_PTR=True, FP32_DOT=False, BF16_FIX=False)
    add("tl_sign_matmul.sign_matmul_kernel", c.SIGN_MATMUL_DECODE + c.SIGN_MATMUL_PREFILL, mm, [
        ("bfloat16", {}),
        ("float32", {"FP32_DOT": True}),
        ("float16", {"HAS_WEIGHT": False, "HAS_BIAS": False, "SCALE_FROM_PTR": False}),
    ])
    mt = dict(HAS_WEIGHT=True, HAS_BIAS=True, FP32_DOT=False, BF16_FIX=False)
    mt_variants = [
        ("bfloat16", {}),
        ("float32", {"FP32_DOT": True}),
        ("float16", {"HAS_WEIGHT": False, "HAS_BIAS": False}),
    ]
    add("tl_multi_tenant.mt_grouped_kernel", c.MT_GROUPED_DECODE + c.MT_GROUPED_PREFILL, mt, mt_variants)
    add("tl_multi_tenant.mt_rows_kernel", c.MT_ROWS_CONFIGS, mt, mt_variants)
    # planes: every config of the single-delta kernel on sm_90 (2 planes, per-group scales); the
    # multi-tenant ones on their first config; variants: other dtypes, 1 plane per row without
    # base/bias, and 8 planes (the most registers)
    pl = dict(NUM_PLANES=2, HAS_WEIGHT=True, HAS_BIAS=True, GROUPED=True, FP32_DOT=False, BF16_FIX=False)
    add("tl_planes.planes_matmul_kernel", c.PLANES_DECODE + c.PLANES_PREFILL, pl, [
        ("bfloat16", {}),
        ("float32", {"FP32_DOT": True}),
        ("float16", {"NUM_PLANES": 1, "HAS_WEIGHT": False, "HAS_BIAS": False, "GROUPED": False}),
        ("float16", {"NUM_PLANES": 8}),
    ])
    pl_variants = [
        ("float32", {"FP32_DOT": True, "GROUPED": False}),
        ("float16", {"NUM_PLANES": 8, "HAS_WEIGHT": False, "HAS_BIAS": False}),
    ]
    add("tl_planes.mt_planes_grouped_kernel", c.MT_PLANES_GROUPED_DECODE, pl, pl_variants, every_config=False)
    add("tl_planes.mt_planes_rows_kernel", c.MT_PLANES_ROWS_CONFIGS, pl, pl_variants, every_config=False)
    ad = dict(SCALE_FROM_PTR=True, BF16_FIX=False)
    add("tl_apply_delta.apply_delta_kernel", c.APPLY_DELTA_CONFIGS, ad, [
        ("bfloat16", {"SCALE_FROM_PTR": False}),
        ("float32", {}),
    ])
    return cases


def _compile_one(case: dict, cc: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, fn_name = case["kernel"].split(".")
    fn = getattr(importlib.import_module(f"deltahub.kernels.{mod_name}"), fn_name)
    blocks = {k: v for k, v in case["config"].items() if k.startswith("BLOCK_") and v}
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in case["flags"] or name in blocks:
            signature[name] = "constexpr"
            constexprs[name] = case["flags"].get(name, blocks.get(name))
        elif case["specialized"] and name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _PTR_TYPES:
            t = _PTR_TYPES[name]
            signature[name] = "*" + (_TL[case["dtype"]] if t == "X" else t)
            if case["specialized"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale_val":
            signature[name] = "fp32"
        else:  # sizes and strides
            signature[name] = "i32"
            if case["specialized"] and name not in ("M", "M_BUCKET"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": case["config"]["num_warps"], "num_stages": case["config"]["num_stages"]}
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options=options,
    )
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared": compiled.metadata.shared,
        "ptx_has_mma": "mma" in compiled.asm["ptx"],
    }


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, required=True, help="compute capability, e.g. 80 or 90")
    args = ap.parse_args()
    assert "TRITON_INTERPRET" not in os.environ, "compile without the interpreter"
    results = []
    for case in _cases(all_configs=args.cc >= 90):
        entry = {"case": case}
        try:
            entry.update(_compile_one(case, args.cc))
        except Exception as exc:  # report every failure, not only the first
            entry["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        results.append(entry)
    print(json.dumps({"cc": args.cc, "results": results}))


def _expects_mma(case: dict) -> bool:
    """fp16/bf16 ``tl.dot`` lowers to mma/wgmma; fp32 IEEE dots, apply_delta, and the rows kernel
    without a base weight (its sign part runs on CUDA cores) have none."""
    kernel, flags = case["kernel"], case["flags"]
    if kernel.endswith("apply_delta_kernel") or flags.get("FP32_DOT"):
        return False
    return not (kernel.endswith(("mt_rows_kernel", "mt_planes_rows_kernel")) and not flags["HAS_WEIGHT"])


def _child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)  # empty: really compile
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; 1 is its default
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    import pytest

    pytest.importorskip("triton", reason="install the test extra: pip install -e .[test]")
    procs = {}
    for cc in (80, 90):  # both targets at once (CI has 2 cores)
        procs[cc] = subprocess.Popen(
            [sys.executable, __file__, "--cc", str(cc)],
            cwd=REPO,
            env=_child_env(tmp_path / f"cache{cc}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    failures, counts = [], {}
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{cc} compile driver failed:\n{err[-4000:]}"
        report = json.loads(out.strip().splitlines()[-1])
        counts[cc] = len(report["results"])
        for r in report["results"]:
            if "error" in r:
                failures.append(f"sm_{cc} {r['case']}: {r['error']}")
            else:
                assert r["cubin_bytes"] > 0
                # the fp16/bf16 matmuls must reach the tensor cores (mma/wgmma) on both targets
                if _expects_mma(r["case"]):
                    assert r["ptx_has_mma"], f"sm_{cc} {r['case']}: no mma instruction in the PTX"
    assert not failures, "\n\n".join(failures)
    assert counts[90] >= 30 + 20 and counts[80] >= 15 + 11, counts


if __name__ == "__main__":
    _main()
