"""deltahub.kernels: every Triton kernel against its torch reference, run by the Triton interpreter
on the CPU. Small odd shapes (K, N not multiples of the blocks), all three dtypes, per-dtype
tolerances; apply_delta bit for bit.

Not collected by a plain ``pytest`` run (the file name does not start with ``test_``):
``tests/test_kernels.py`` runs it in a subprocess with ``TRITON_INTERPRET=1`` in the environment,
because the interpreter must be on before triton is first imported (``@triton.jit``, triton's own
standard library included, picks the interpreter when it is defined), and other tests of the same
process import triton earlier without it (transformers does). To run it alone:
``TRITON_INTERPRET=1 python -m pytest tests/kernels_interp_cases.py``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        pytest.fail(
            "run with TRITON_INTERPRET=1 set before triton is imported "
            "(TRITON_INTERPRET=1 python -m pytest tests/kernels_interp_cases.py)",
            pytrace=False,
        )
    os.environ["TRITON_INTERPRET"] = "1"  # nothing imported triton yet: not too late

import deltahub.kernels as K  # noqa: E402
from deltahub.codec.sign1 import decode_sign1  # noqa: E402
from deltahub.kernels import KernelInputError  # noqa: E402
from deltahub.kernels import ops  # noqa: E402
from kernel_helpers import DTYPES, close, inputs, signs  # noqa: E402


def test_interpreter_is_on_for_this_file():
    from deltahub.kernels.tl_sign_matmul import sign_matmul_kernel

    import triton.language as tl

    assert K.interpreter_enabled() and K.triton_available() and K.triton_can_run(torch.zeros(1))
    assert type(sign_matmul_kernel).__name__ == "InterpretedFunction"
    assert type(tl.zeros).__name__ == "InterpretedFunction"  # triton itself imported under it


# --------------------------------------------------------------------------------- sign_matmul
SHAPES = [(1, 1, 1), (1, 7, 33), (3, 65, 31), (17, 7, 100), (3, 1, 100), (17, 65, 33), (1, 65, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_sign_matmul_matches_reference(m, n, k, dtype):
    x, w, b, packed, _ = inputs(m, n, k, dtype, seed=m * 1000 + n * 10 + k)
    scale = 0.37
    close(K.sign_matmul(x, packed, scale, w, b), K.sign_matmul_ref(x, packed, scale, w, b), dtype)
    # delta only, scale as a 0-d tensor (read in the kernel through a pointer)
    st = torch.tensor(scale)
    close(K.sign_matmul(x, packed, st), K.sign_matmul_ref(x, packed, st), dtype)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64), dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=128)])
def test_sign_matmul_other_block_sizes(config):
    """K=100 and N=65 are not multiples of these blocks either; M=40 spans row blocks."""
    x, w, b, packed, _ = inputs(40, 65, 100, torch.float16, seed=3)
    y = ops.launch_sign_matmul(x, packed, 0.2, w, b, config=dict(config, num_warps=4, num_stages=2))
    close(y, K.sign_matmul_ref(x, packed, 0.2, w, b), torch.float16)


def test_sign_matmul_strided_inputs_and_scale_forms():
    gen = torch.Generator().manual_seed(5)
    xt = torch.randn(33, 5, generator=gen)  # x = xt.T is [5, 33], not contiguous
    wt = torch.randn(33, 7, generator=gen) * 0.1
    packed, _ = signs(7, 33, gen)
    ref = K.sign_matmul_ref(xt.T, packed, 0.5, wt.T)
    for scale in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.tensor(0.5, dtype=torch.float64)):
        close(K.sign_matmul(xt.T, packed, scale, wt.T), ref, torch.float32)


def test_sign_matmul_empty_and_k0():
    x, w, b, packed, _ = inputs(0, 7, 33, torch.float32)
    assert K.sign_matmul(x, packed, 1.0, w, b).shape == (0, 7)
    x = torch.randn(3, 0)
    packed = torch.zeros(4, 0, dtype=torch.int32)
    bias = torch.arange(4, dtype=torch.float32)
    y = K.sign_matmul(x, packed, 1.0, torch.zeros(4, 0), bias)
    assert torch.equal(y, bias.expand(3, 4))


def test_sign_matmul_detects_a_flipped_bit():
    """The comparison can fail: one flipped sign bit changes the result beyond the tolerance."""
    x, w, b, packed, _ = inputs(3, 7, 100, torch.float16, seed=11)
    flipped = packed.clone()
    flipped[2, 1] ^= 1 << 5  # column 37 of row 2
    y = K.sign_matmul(x, flipped, 0.5, w, b)
    ref = K.sign_matmul_ref(x, packed, 0.5, w, b)
    with pytest.raises(AssertionError):
        close(y, ref, torch.float16)
    diff = (y.float() - ref.float()).abs()
    assert diff[:, 2].min() > 0.05 and diff[:, [0, 1, 3, 4, 5, 6]].max() < 0.01


# ----------------------------------------------------------------------------- multi-tenant
TENANTS = {
    1: [2],
    3: [1, -1, 1],
    17: [2, 0, -1, 2, 2, 1, 0, -1, 0, 2, 1, 1, -1, 0, 2, 2, 0],
}


@pytest.mark.parametrize("strategy", ["grouped", "rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (3, 65, 31), (17, 7, 100)])
def test_multi_tenant_matches_reference(m, n, k, dtype, strategy):
    x, w, b, _, _ = inputs(m, n, k, dtype, seed=m + n + k)
    gen = torch.Generator().manual_seed(m * n)
    stack = torch.stack([signs(n, k, gen)[0] for _ in range(3)])
    scales = torch.tensor([0.5, 0.25, 0.125])
    tenant = torch.tensor(TENANTS[m], dtype=torch.int64)
    y = K.multi_tenant_sign_matmul(x, w, stack, scales, tenant, b, strategy=strategy)
    close(y, K.multi_tenant_sign_matmul_ref(x, w, stack, scales, tenant, b), dtype)
    # no base weight, int32 ids, no bias
    t32 = tenant.to(torch.int32)
    y = K.multi_tenant_sign_matmul(x, None, stack, scales, t32, strategy=strategy)
    close(y, K.multi_tenant_sign_matmul_ref(x, None, stack, scales, t32), dtype)


@pytest.mark.parametrize("strategy", ["grouped", "rows", "auto"])
def test_multi_tenant_rows_equal_single_tenant_runs(strategy):
    """Every row of a mixed batch equals its own delta run alone (sign_matmul), -1 rows the base;
    70 rows > 64 makes the grouped strategy sort rows by tenant (and unsort the output)."""
    m, n, k = 70, 9, 40
    x, w, b, _, _ = inputs(m, n, k, torch.float32, seed=21)
    gen = torch.Generator().manual_seed(8)
    stack = torch.stack([signs(n, k, gen)[0] for _ in range(4)])
    scales = torch.tensor([0.3, 0.2, 0.1, 0.4])
    tenant = torch.randint(-1, 4, (m,), generator=gen)
    y = K.multi_tenant_sign_matmul(x, w, stack, scales, tenant, b, strategy=strategy)
    for t in range(-1, 4):
        rows = tenant == t
        if t < 0:
            alone = (x[rows].double() @ w.double().T + b.double()).float()
        else:
            alone = K.sign_matmul(x[rows], stack[t], scales[t], w, b)
        torch.testing.assert_close(y[rows], alone, rtol=1e-5, atol=1e-4)


def test_multi_tenant_all_base_rows():
    x, w, b, packed, _ = inputs(5, 7, 33, torch.float16)
    tenant = torch.full((5,), -1)
    y = K.multi_tenant_sign_matmul(x, w, packed[None], torch.tensor([9.0]), tenant, b)
    close(y, K.sign_matmul_ref(x, packed, 0.0, w, b), torch.float16)


# ------------------------------------------------------------------------------------ apply_delta
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (65, 100), (17, 31)])
def test_apply_delta_is_bit_exact(n, k, dtype):
    """Bit for bit: the reference, deltahub's own sign1 reconstruction (decode_sign1) and the kernel."""
    _, w, _, packed, _ = inputs(1, n, k, dtype, seed=n + k)
    scale = 0.0123
    ref = K.apply_delta_ref(w, packed, scale)
    assert torch.equal(ref, decode_sign1(w, packed, scale, dtype))
    assert torch.equal(K.apply_delta(w, packed, scale), ref)
    assert torch.equal(K.apply_delta(w, packed, torch.tensor(scale)), ref)


def test_apply_delta_out_in_place_and_other_dtype():
    _, w, _, packed, _ = inputs(1, 20, 70, torch.float16, seed=2)
    ref16 = K.apply_delta_ref(w, packed, 0.5)
    out32 = torch.empty(20, 70, dtype=torch.float32)
    assert K.apply_delta(w, packed, 0.5, out=out32) is out32
    assert torch.equal(out32, K.apply_delta_ref(w, packed, 0.5, out=torch.empty(20, 70)))
    w2 = w.clone()
    assert K.apply_delta(w2, packed, 0.5, out=w2) is w2  # in place
    assert torch.equal(w2, ref16)
    y = ops.launch_apply_delta(w, packed, 0.5, config=dict(BLOCK_M=8, BLOCK_K=64, num_warps=2, num_stages=1))
    assert torch.equal(y, ref16)


@pytest.mark.parametrize("f", [K.multi_tenant_sign_matmul, K.multi_tenant_sign_matmul_ref])
def test_multi_tenant_bad_input(f):
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    stack = torch.zeros(2, 5, 2, dtype=torch.int32)
    scales = torch.ones(2)
    with pytest.raises(KernelInputError, match="tenant id 2 is out of range"):
        f(x, w, stack, scales, torch.tensor([0, 2, -1]))
    with pytest.raises(KernelInputError, match="tenant id -2 is out of range"):
        f(x, w, stack, scales, torch.tensor([0, -2, -1]))
    with pytest.raises(KernelInputError, match="tenant must be int32/int64"):
        f(x, w, stack, scales, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(KernelInputError, match="scales must be"):
        f(x, w, stack, torch.ones(3), torch.tensor([0, 1, 1]))
    with pytest.raises(KernelInputError, match="stack"):
        f(x, w, stack[0], scales, torch.tensor([0, 1, 1]))


def test_apply_delta_bad_input():
    w = torch.randn(5, 40)
    p = torch.zeros(5, 2, dtype=torch.int32)
    for f in (K.apply_delta, K.apply_delta_ref):
        with pytest.raises(KernelInputError, match="packed must be"):
            f(w, p[:4], 1.0)
        with pytest.raises(KernelInputError, match="out must be"):
            f(w, p, 1.0, out=torch.empty(5, 41))
    with pytest.raises(KernelInputError, match="strategy"):
        K.multi_tenant_sign_matmul(torch.randn(1, 40), w, p[None], torch.ones(1), torch.zeros(1, dtype=torch.long), strategy="x")
    with pytest.raises(KernelInputError, match="multiple of 32"):
        ops.launch_sign_matmul(torch.randn(1, 40), p, 1.0, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=48))
