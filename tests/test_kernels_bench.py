"""bench/kernels_gpu.py --smoke: the GPU benchmark script runs end to end on the CPU (Triton
interpreter, tiny shapes) with deltahub NOT importable, as on a GPU machine that has only torch and
triton, and writes its results JSON to --out with every output check passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# block `import deltahub` in the child: the script must load kernels/ by path on its own
_RUN = (
    "import sys, runpy; sys.modules['deltahub'] = None; "
    "sys.argv = ['kernels_gpu.py'] + sys.argv[1:]; "
    "runpy.run_path({script!r}, run_name='__main__')"
)


def test_kernels_gpu_smoke(tmp_path):
    pytest.importorskip("triton", reason="install the test extra: pip install -e .[test]")
    out = tmp_path / "nested" / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = _RUN.format(script=str(REPO / "bench" / "kernels_gpu.py"))
    proc = subprocess.run(
        [sys.executable, "-c", code, "--smoke", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == data
    assert data["info"]["smoke"] is True and data["mismatches"] == []
    assert data["copy"]["gbps"] > 0
    names = {e["kernel"] for e in data["kernels"]}
    assert {"cuBLAS x@W.T (base only)", "sign_matmul (W + delta)", "sign_matmul (delta only)", "apply_delta"} <= names
    assert [d["tenants"] for d in data["decode"]] == [1, 3]
    for d in data["decode"]:
        assert set(d["ms"]) == {"fused_grouped", "fused_rows", "separate", "unfused"}
        assert all(v > 0 for v in d["ms"].values())
        assert d["bound_16B_over_16_plus_B"] == pytest.approx(16 * d["tenants"] / (16 + d["tenants"]))
    assert data["goals_at_max_B"]["tenants"] == 3
    assert "## decode step" in proc.stdout and "16B/(16+B)" in proc.stdout
    planes = data["planes"]  # section 4: P = 1, 2, 4 x row / group-128 scales, single and multi-tenant
    single = [e for e in planes if e["kernel"] == "planes_matmul (W + delta)"]
    multi = [e for e in planes if e["kernel"] == "multi_tenant_planes_matmul"]
    assert sorted((e["planes"], e["scales"]) for e in single) == sorted((p, g) for p in (1, 2, 4) for g in ("row", "group128"))
    assert len(multi) == 6 and all(e["tenants"] == 3 and set(e["ms"]) == {"grouped", "rows"} for e in multi)
    assert all(e["gbps"] > 0 and e["ratio_vs_sign1"] > 0 for e in planes)
    assert "## planes_matmul" in proc.stdout and "## multi_tenant_planes_matmul" in proc.stdout
