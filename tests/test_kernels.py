"""deltahub.kernels: the references against an independent dense computation (deltahub.codec),
argument checks, the refusal to run without a GPU or the interpreter, and — in a subprocess with
TRITON_INTERPRET=1 — every Triton kernel against its reference (tests/kernels_interp_cases.py; the
planes kernels and the planes codec's kernel hooks: tests/kernels_planes_interp_cases.py).

The interpreter must be on before triton is first imported (``@triton.jit``, triton's own standard
library included, picks it when a function is defined), and other tests of this process import
triton earlier without it, so the kernel runs happen in a child pytest process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltahub.kernels as K
from deltahub.codec.packing import unpack_signs
from deltahub.kernels import KernelInputError, TritonUnavailableError
from kernel_helpers import DTYPES, close, inputs, planes_inputs, signs

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "tests" / "kernels_interp_cases.py"
PLANES_CASES = REPO / "tests" / "kernels_planes_interp_cases.py"


def test_kernels_match_references_under_the_interpreter(tmp_path):
    """Runs tests/kernels_interp_cases.py (every sign1 kernel vs its reference, 65 cases) and
    tests/kernels_planes_interp_cases.py (the planes kernels and hooks, 39 cases) in one child
    pytest with TRITON_INTERPRET=1; any failure there fails here, with the child's report."""
    pytest.importorskip("triton", reason="install the test extra: pip install -e .[test]")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES), str(PLANES_CASES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 60 + 35, summary
    assert not re.search(r"failed|error|skipped|xfail", summary), summary


# ------------------------------------------------------------------ references vs dense (fp64)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_references_match_dense_computation(dtype):
    """The references against formulas written here from deltahub.codec's unpack_signs, in fp64."""
    m, n, k = 5, 9, 70
    x, w, b, packed, dense = inputs(m, n, k, dtype, seed=4)
    xd, wd, bd = x.double(), w.double(), b.double()
    want = (xd @ wd.T + 0.3 * (xd @ dense.T) + bd).to(dtype)
    close(K.sign_matmul_ref(x, packed, 0.3, w, b), want, dtype)
    close(K.sign_matmul_ref(x, packed, torch.tensor(0.3)), (0.3 * (xd @ dense.T)).to(dtype), dtype)

    gen = torch.Generator().manual_seed(1)
    stacks = [signs(n, k, gen) for _ in range(2)]
    stack = torch.stack([p for p, _ in stacks])
    scales = torch.tensor([0.5, 0.75])
    tenant = torch.tensor([1, -1, 0, 1, 1])
    rows = []
    for i, t in enumerate(tenant.tolist()):
        r = xd[i] @ wd.T + bd
        if t >= 0:
            r = r + float(scales[t]) * (xd[i] @ stacks[t][1].T)
        rows.append(r)
    close(K.multi_tenant_sign_matmul_ref(x, w, stack, scales, tenant, b), torch.stack(rows).to(dtype), dtype)

    want_w = (w.float() + torch.tensor(0.3, dtype=torch.float32) * dense.float()).to(dtype)
    assert torch.equal(K.apply_delta_ref(w, packed, 0.3), want_w)


@pytest.mark.parametrize("p,scales,group", [(1, "row", None), (2, "matrix", None), (3, "group", 32),
                                            (2, "group", 64), (3, "group", 128)])
def test_planes_references_match_dense_codec_operator_and_decode(p, scales, group):
    """planes_matmul_ref and multi_tenant_planes_matmul_ref against (a) a formula written here in
    fp64 from deltahub.codec's unpack_signs, (b) the codec's own torch path (PlanesOperator.matmul)
    and (c) decode-then-matmul, on a real encode (odd N, K)."""
    from deltahub import codec as codecs

    n, k = 9, 300
    x, w, b, _, _, _ = planes_inputs(17, n, k, p, scales, group, torch.float32, seed=p)
    gen = torch.Generator().manual_seed(p)
    ft = w + 0.01 * torch.randn(n, k, generator=gen)
    planes = codecs.get("planes")
    enc = planes.encode(w, ft, planes=p, scales=scales, **({"group_size": group} if group else {}))
    packed = torch.stack([enc.parts[f"signs{i}"] for i in range(p)])
    sc = torch.stack([enc.parts[f"scales{i}"] for i in range(p)])
    dense = torch.zeros(n, k, dtype=torch.float64)
    for i in range(p):
        s = sc[i].double()
        if s.shape[1] > 1:
            s = torch.cat([s[:, j : j + 1].expand(n, min(group, k - j * group)) for j in range(s.shape[1])], dim=1)
        dense += s * unpack_signs(packed[i], k, torch.float64)
    xd = x.double()
    g = group if scales == "group" else None
    close(K.planes_matmul_ref(x, packed, sc, w, b, group_size=g), (xd @ (w.double() + dense).T + b.double()).float(), torch.float32)
    op = planes.operator(enc.parts, enc.params, (n, k))
    close(K.planes_matmul_ref(x, packed, sc, group_size=g), op.matmul(x), torch.float32)
    decoded = planes.decode(w, enc.parts, enc.params, torch.float32)
    close(K.planes_matmul_ref(x, packed, sc, w, group_size=g), x @ decoded.T, torch.float32)
    # multi-tenant: tenant 1 is this delta, tenant 0 its signs flipped, -1 the base
    stack = torch.stack([~packed, packed])  # padding bits set too: unpacking ignores them
    tenant = torch.tensor([1, -1, 0] * 5 + [1, 1])
    y = K.multi_tenant_planes_matmul_ref(x, w, stack, torch.stack([sc, sc]), tenant, b, group_size=g)
    rows = {1: K.planes_matmul_ref(x, packed, sc, w, b, group_size=g),
            0: K.planes_matmul_ref(x, stack[0], sc, w, b, group_size=g),
            -1: (xd @ w.double().T + b.double()).float()}
    for i, t in enumerate(tenant.tolist()):
        close(y[i : i + 1], rows[t][i : i + 1], torch.float32)


def test_unpack_signs_dense_matches_codec():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 31, 32, 33, 100):
        packed, dense = signs(4, k, gen)
        assert torch.equal(K.unpack_signs_dense(packed, k, torch.float64), dense)
    stack = torch.stack([signs(3, 40, gen)[0] for _ in range(2)])
    assert torch.equal(K.unpack_signs_dense(stack, 40)[1], unpack_signs(stack[1], 40))


# ----------------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(3, 40)
    w = torch.randn(5, 40)
    p = torch.zeros(5, 2, dtype=torch.int32)
    return [
        ("x must be 2-D", lambda f: f(x[0], p, 1.0)),
        ("x must be float16", lambda f: f(x.double(), p, 1.0)),
        ("packed must be torch.int32", lambda f: f(x, p.long(), 1.0)),
        ("packed must be [N, 2]", lambda f: f(x, torch.zeros(5, 3, dtype=torch.int32), 1.0)),
        ("weight must be [N, K]", lambda f: f(x, p, 1.0, w[:, :39])),
        ("weight is torch.float16 but x is torch.float32", lambda f: f(x, p, 1.0, w.half())),
        ("bias must be [N]", lambda f: f(x, p, 1.0, w, torch.zeros(4))),
        ("scale must hold one value", lambda f: f(x, p, torch.ones(2))),
        ("scale must be a number", lambda f: f(x, p, "0.5")),
    ]


@pytest.mark.parametrize("which", ["kernel", "ref"])
def test_bad_input_is_refused_clearly(which):
    f = K.sign_matmul if which == "kernel" else K.sign_matmul_ref
    for text, call in _bad_cases():
        with pytest.raises(KernelInputError, match=text.replace("[", r"\[").replace("]", r"\]")) as info:
            call(f)
        assert info.value.hint, text


def test_without_gpu_or_interpreter_the_kernels_refuse(monkeypatch):
    """No silent fallback: with the interpreter off and no CUDA, the Triton functions raise a clear
    error naming the alternatives; the references still run."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    x, w, b, packed, _ = inputs(2, 5, 40, torch.float32)
    assert not K.triton_available() and not K.triton_can_run(x)
    assert "no CUDA device" in K.triton_unavailable_reason(x)
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1") as info:
        K.sign_matmul(x, packed, 1.0, w)
    assert "_ref" in info.value.hint
    with pytest.raises(TritonUnavailableError):
        K.apply_delta(w, packed, 1.0)
    with pytest.raises(TritonUnavailableError):
        K.multi_tenant_sign_matmul(x, w, packed[None], torch.ones(1), torch.zeros(2, dtype=torch.long))
    assert K.sign_matmul_ref(x, packed, 1.0, w).shape == (2, 5)
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET=1"):
        K.planes_matmul(x, packed[None], torch.ones(1, 5, 1), w)
    with pytest.raises(TritonUnavailableError):
        K.multi_tenant_planes_matmul(x, w, packed[None, None], torch.ones(1, 1, 1, 1), torch.zeros(2, dtype=torch.long))
    assert K.planes_matmul_ref(x, packed[None], torch.ones(1, 5, 1), w).shape == (2, 5)


def test_tensors_beyond_int32_offsets_are_refused():
    """The kernels use 32-bit offsets: a matrix spanning more elements is refused (before anything
    runs), never misread. Meta tensors: no memory is allocated."""
    big = torch.empty(65536, 32768, dtype=torch.float16, device="meta")  # 2^31 elements
    packed = torch.empty(65536, 1024, dtype=torch.int32, device="meta")
    with pytest.raises(KernelInputError, match="weight spans 2147483648 elements"):
        K.apply_delta(big, packed, 1.0)
    x = torch.empty(1, 32768, dtype=torch.float16, device="meta")
    with pytest.raises(KernelInputError, match="weight spans"):
        K.sign_matmul(x, packed, 1.0, big)
    stack = torch.empty(3, 65536, 1024, dtype=torch.int32, device="meta")  # tenant axis: int64, fine
    with pytest.raises(KernelInputError, match="weight spans"):
        K.multi_tenant_sign_matmul(x, big, stack, torch.ones(3, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    planes = torch.empty(2, 65536, 1024, dtype=torch.int32, device="meta")
    with pytest.raises(KernelInputError, match="weight spans"):
        K.planes_matmul(x, planes, torch.ones(2, 65536, 1, device="meta"), big)
    with pytest.raises(KernelInputError, match="planes spans"):  # the plane axis uses int32 offsets
        K.planes_matmul(x, torch.empty(64, 65536, 1024, dtype=torch.int32, device="meta")[::8],
                        torch.ones(8, 65536, 1, device="meta"))
    small = torch.empty(65536, 4096, dtype=torch.float16, device="meta")
    with pytest.raises(TritonUnavailableError):  # offsets fine: refused only for the meta device
        K.multi_tenant_sign_matmul(
            torch.empty(1, 4096, dtype=torch.float16, device="meta"), small,
            torch.empty(3, 65536, 128, dtype=torch.int32, device="meta"),
            torch.ones(3, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"), validate=False,
        )


def test_interpreter_switched_on_too_late_is_reported(monkeypatch):
    """TRITON_INTERPRET=1 set after triton and the kernel modules were imported cannot take effect
    (``@triton.jit`` decided at import): say so, instead of failing inside triton."""
    import importlib

    importlib.import_module("deltahub.kernels.tl_common")  # imported here without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, _, packed, _ = inputs(2, 5, 40, torch.float32)
    assert not K.triton_can_run(x)
    with pytest.raises(TritonUnavailableError, match="set after triton was imported"):
        K.sign_matmul(x, packed, 1.0, w)
