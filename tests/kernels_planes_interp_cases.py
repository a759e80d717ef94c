"""deltahub.kernels, planes codec: the Triton kernels for k sign planes with scales per matrix, row or
group (``planes_matmul``, ``multi_tenant_planes_matmul``) against their torch references, run by
the Triton interpreter on the CPU; and the codec's kernel hooks (``PlanesOperator.kernel_linear``,
``PlanesStack.kernel_linear``) against its torch path and decode-then-matmul.

Run in a child pytest with ``TRITON_INTERPRET=1`` by ``tests/test_kernels.py`` (see
``tests/kernels_interp_cases.py`` for why). Alone: ``TRITON_INTERPRET=1 python -m pytest
tests/kernels_planes_interp_cases.py``. Shapes are small and odd (N, K not multiples of the blocks
or of 32; M = 1 and 17); the parameter lists are sampled, not a full product, to keep CI time low.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        pytest.fail("run with TRITON_INTERPRET=1 set before triton is imported", pytrace=False)
    os.environ["TRITON_INTERPRET"] = "1"  # nothing imported triton yet: not too late

import torch.nn.functional as F  # noqa: E402

import deltahub.kernels as K  # noqa: E402
from deltahub import codec as codecs  # noqa: E402
from deltahub.codec.planes_apply import PlanesStack, PlanesStacks  # noqa: E402
from deltahub.kernels import KernelInputError, ops  # noqa: E402
from kernel_helpers import close, planes_inputs, signs  # noqa: E402

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# (M, N, K, planes, scales, group, dtype): every granularity with k = 1, 2, 3, fp32 and fp16 on
# each, M = 1 and 17, N and K off the blocks and off 32; bf16 on two (the interpreter runs fp32 dots).
SINGLE = [
    (1, 7, 33, 1, "matrix", None, F32),
    (17, 65, 100, 3, "matrix", None, F16),
    (1, 65, 100, 2, "row", None, F16),
    (17, 7, 33, 1, "row", None, F32),
    (3, 33, 70, 3, "row", None, BF16),
    (17, 9, 100, 2, "group", 32, F32),
    (1, 40, 130, 3, "group", 32, F16),
    (17, 20, 200, 1, "group", 64, F16),
    (1, 33, 100, 2, "group", 64, F32),
    (17, 9, 300, 2, "group", 128, F32),
    (1, 65, 130, 3, "group", 128, F16),
    (17, 7, 70, 2, "group", 128, BF16),  # K < G: one group
]


@pytest.mark.parametrize("m,n,k,p,scales,group,dtype", SINGLE)
def test_planes_matmul_matches_reference(m, n, k, p, scales, group, dtype):
    x, w, b, packed, sc, _ = planes_inputs(m, n, k, p, scales, group, dtype, seed=m * 100 + n + k + p)
    close(K.planes_matmul(x, packed, sc, w, b, group_size=group), K.planes_matmul_ref(x, packed, sc, w, b, group_size=group), dtype)
    # delta only, no bias
    close(K.planes_matmul(x, packed, sc, group_size=group), K.planes_matmul_ref(x, packed, sc, group_size=group), dtype)


@pytest.mark.parametrize("group,config", [
    (32, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)),  # 4 groups in one K block
    (64, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=128)),  # 2 groups in one K block
    (128, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)),  # one group over 2 K blocks
])
def test_planes_other_block_sizes(group, config):
    """Per-group scales apply per packed word, so any BLOCK_K works against any G; M=20 spans row blocks."""
    x, w, b, packed, sc, _ = planes_inputs(20, 20, 300, 2, "group", group, F16, seed=group)
    cfg = dict(config, num_warps=4, num_stages=2)
    want = K.planes_matmul_ref(x, packed, sc, w, b, group_size=group)
    close(ops.launch_planes_matmul(x, packed, sc, w, b, group_size=group, config=cfg), want, F16)
    stack, scs, tenant = _stack(20, 20, 300, 2, "group", group, seed=group)
    want = K.multi_tenant_planes_matmul_ref(x, w, stack, scs, tenant, b, group_size=group)
    for strategy in ("grouped", "rows"):
        y = ops.launch_multi_tenant_planes(x, w, stack, scs, tenant, b, group_size=group, strategy=strategy, config=cfg)
        close(y, want, F16)


def test_planes_strided_inputs_and_broadcast_scales():
    """x and W transposed views, planes a non-contiguous view, scales expanded (stride 0) and fp64."""
    gen = torch.Generator().manual_seed(5)
    n, k = 9, 70
    xt = torch.randn(k, 5, generator=gen)
    wt = torch.randn(k, n, generator=gen) * 0.1
    packed = torch.stack([signs(n, k, gen)[0] for _ in range(2)])
    wide = torch.zeros(2, n, 5, dtype=torch.int32)
    wide[:, :, 1:4] = packed
    view = wide[:, :, 1:4]
    row = torch.rand(2, 1, 1, generator=gen).expand(2, n, 1)
    ref = K.planes_matmul_ref(xt.T, packed, row.contiguous(), wt.T)
    close(K.planes_matmul(xt.T, view, row, wt.T), ref, F32)
    close(K.planes_matmul(xt.T, view, row.double(), wt.T), ref, F32)


def test_planes_empty_and_k0():
    x, w, b, packed, sc, _ = planes_inputs(0, 7, 33, 2, "row", None, F32)
    assert K.planes_matmul(x, packed, sc, w, b).shape == (0, 7)
    bias = torch.arange(4, dtype=torch.float32)
    y = K.planes_matmul(torch.randn(3, 0), torch.zeros(2, 4, 0, dtype=torch.int32), torch.ones(2, 4, 1), torch.zeros(4, 0), bias)
    assert torch.equal(y, bias.expand(3, 4))


def test_planes_detect_a_flipped_bit_and_a_wrong_group_scale():
    """The comparisons can fail: one flipped bit of plane 1, or one group's scale changed, moves
    exactly the affected output row beyond the tolerance."""
    x, w, b, packed, sc, _ = planes_inputs(3, 7, 100, 2, "group", 32, F16, seed=11)
    ref = K.planes_matmul_ref(x, packed, sc, w, b, group_size=32)
    flipped = packed.clone()
    flipped[1, 2, 1] ^= 1 << 5  # plane 1, row 2, column 37
    scaled = sc.clone()
    scaled[0, 4, 2] += 0.5  # plane 0, row 4, group 2 (columns 64..95)
    for bad_p, bad_s, row in ((flipped, sc, 2), (packed, scaled, 4)):
        y = K.planes_matmul(x, bad_p, bad_s, w, b, group_size=32)
        with pytest.raises(AssertionError):
            close(y, ref, F16)
        diff = (y.float() - ref.float()).abs()
        others = [c for c in range(7) if c != row]
        assert diff[:, row].max() > 0.01 and diff[:, others].max() < 0.01


# ----------------------------------------------------------------------------- multi-tenant
TENANTS = {1: [2], 17: [2, 0, -1, 2, 2, 1, 0, -1, 0, 2, 1, 1, -1, 0, 2, 2, 0]}


def _stack(m, n, k, p, scales, group, seed, t=3):
    gen = torch.Generator().manual_seed(seed + 1)
    packed = torch.stack([torch.stack([signs(n, k, gen)[0] for _ in range(p)]) for _ in range(t)])
    r = 1 if scales == "matrix" else n
    c = -(-k // group) if scales == "group" else 1
    sc = torch.rand(t, p, r, c, generator=gen) * 0.1 + 0.01
    tenant = torch.tensor(TENANTS[m], dtype=torch.int64) if m in TENANTS else torch.randint(-1, t, (m,), generator=gen)
    return packed, sc, tenant


MULTI = [
    (1, 7, 33, 2, "matrix", None, F16),
    (17, 65, 100, 1, "row", None, F32),
    (17, 9, 130, 3, "group", 32, F16),
    (1, 33, 200, 2, "group", 128, F32),
]


@pytest.mark.parametrize("strategy", ["grouped", "rows"])
@pytest.mark.parametrize("m,n,k,p,scales,group,dtype", MULTI)
def test_multi_tenant_planes_matches_reference(m, n, k, p, scales, group, dtype, strategy):
    x, w, b, _, _, _ = planes_inputs(m, n, k, p, scales, group, dtype, seed=m + n + k)
    stack, sc, tenant = _stack(m, n, k, p, scales, group, seed=m * n)
    y = K.multi_tenant_planes_matmul(x, w, stack, sc, tenant, b, group_size=group, strategy=strategy)
    close(y, K.multi_tenant_planes_matmul_ref(x, w, stack, sc, tenant, b, group_size=group), dtype)
    t32 = tenant.to(torch.int32)  # no base weight, int32 ids, no bias
    y = K.multi_tenant_planes_matmul(x, None, stack, sc, t32, group_size=group, strategy=strategy)
    close(y, K.multi_tenant_planes_matmul_ref(x, None, stack, sc, t32, group_size=group), dtype)


@pytest.mark.parametrize("strategy", ["grouped", "auto"])
def test_multi_tenant_planes_rows_equal_single_runs(strategy):
    """Every row of a mixed batch equals its own delta run alone (planes_matmul); 70 rows > 64 makes
    the grouped strategy sort rows by tenant and unsort the output."""
    m, n, k = 70, 9, 100
    x, w, b, _, _, _ = planes_inputs(m, n, k, 2, "group", 64, F32, seed=21)
    stack, sc, tenant = _stack(m, n, k, 2, "group", 64, seed=8, t=4)
    y = K.multi_tenant_planes_matmul(x, w, stack, sc, tenant, b, group_size=64, strategy=strategy)
    for t in range(-1, 4):
        rows = tenant == t
        if t < 0:
            alone = (x[rows].double() @ w.double().T + b.double()).float()
        else:
            alone = K.planes_matmul(x[rows], stack[t], sc[t], w, b, group_size=64)
        torch.testing.assert_close(y[rows], alone, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ input
@pytest.mark.parametrize("which", ["kernel", "ref"])
def test_planes_bad_input_is_refused_clearly(which):
    f = K.planes_matmul if which == "kernel" else K.planes_matmul_ref
    mt = K.multi_tenant_planes_matmul if which == "kernel" else K.multi_tenant_planes_matmul_ref
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    p = torch.zeros(2, 5, 2, dtype=torch.int32)
    row, grp = torch.ones(2, 5, 1), torch.ones(2, 5, 2)
    cases = [
        (r"packed must be \[P, N, 2\]", lambda: f(x, p[0], row)),
        ("packed must be torch.int32", lambda: f(x, p.long(), row)),
        ("packed holds 9 planes", lambda: f(x, torch.zeros(9, 5, 2, dtype=torch.int32), torch.ones(9, 5, 1))),
        ("scales have 3 rows", lambda: f(x, p, torch.ones(2, 3, 1))),
        ("scales have 2 columns", lambda: f(x, p, grp)),
        ("scales have 2 columns", lambda: f(x, p, grp, group_size=64)),
        ("scales must be a floating tensor", lambda: f(x, p, torch.ones(2, 5, 1, dtype=torch.int32))),
        ("scales must be a floating tensor", lambda: f(x, p, torch.ones(3, 5, 1))),
        ("group_size must be a positive multiple of 32", lambda: f(x, p, grp, group_size=48)),
        ("group_size must be a positive multiple of 32", lambda: f(x, p, grp, group_size=True)),
        ("weight is torch.float16 but x is torch.float32", lambda: f(x, p, row, w.half())),
        (r"bias must be \[N\]", lambda: f(x, p, row, w, torch.zeros(4))),
        ("tenant id 2 is out of range", lambda: mt(x, w, p[None], row[None], torch.tensor([0, 2, -1]))),
        (r"packed must be a stack \[T, P, N, 2\]", lambda: mt(x, w, p, row, torch.tensor([0, 0, -1]))),
        ("scales must be a floating tensor", lambda: mt(x, w, p[None], row, torch.tensor([0, 0, -1]))),
        ("tenant must be int32/int64", lambda: mt(x, w, p[None], row[None], torch.tensor([0.0, 0.0, 0.0]))),
    ]
    assert f(x, p, grp, group_size=32).shape == (3, 5)  # the good call runs
    for text, call in cases:
        with pytest.raises(KernelInputError, match=text) as info:
            call()
        assert info.value.hint, text


# -------------------------------------------------------------------------------- codec hooks
def _encoded(n, k, p, scales, group, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=gen) * 0.1
    ft = base + 0.01 * torch.randn(n, k, generator=gen)
    planes = codecs.get("planes")
    opts = {"planes": p, "scales": scales, **({"group_size": group} if group else {})}
    enc = planes.encode(base, ft, **opts)
    return base, planes, enc


@pytest.mark.parametrize("p,scales,group", [(1, "matrix", None), (2, "row", None), (3, "group", 64), (1, "group", 32)])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_operator_kernel_linear_equals_torch_path_and_decode(p, scales, group, dtype):
    """``PlanesOperator.kernel_linear`` (the interpreted kernel) == its torch path (F.linear +
    matmul) == decode-then-matmul, the independent reference; the planes end up held once."""
    n, k = 33, 130
    base, planes, enc = _encoded(n, k, p, scales, group, seed=p + len(scales))
    op = planes.operator(enc.parts, enc.params, (n, k))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(17, k, generator=gen).to(dtype)
    w, b = base.to(dtype), (torch.randn(n, generator=gen) * 0.1).to(dtype)
    got = op.kernel_linear(K, x, w, b)
    torch_path = (F.linear(x.float(), w.float(), b.float()) + op.matmul(x.float()).float()).to(dtype)
    decoded = planes.decode(w, enc.parts, enc.params, dtype)  # W rounded like the model's, then Δ, then rounded
    want = (x.double() @ decoded.double().T + b.double()).to(dtype)
    close(got, torch_path, dtype)
    close(got, want, dtype)
    close(got, K.planes_matmul_ref(x, torch.stack([enc.parts[f"signs{i}"] for i in range(p)]),
                                   torch.stack([enc.parts[f"scales{i}"] for i in range(p)]), w, b,
                                   group_size=group if scales == "group" else None), dtype)
    if p > 1:  # the operator's planes are now views of one [P, N, W] stack (held once)
        storages = {getattr(op, f"packed{i}").untyped_storage().data_ptr() for i in range(p)}
        assert len(storages) == 1
        assert torch.equal(op.kernel_linear(K, x, w, b), got)  # second call: the view, same result


def test_stack_kernel_linear_equals_torch_path():
    """``PlanesOperator.stack``: tenants with one layout share a PlanesStack; mixed layouts (here 2
    planes per row, 2 planes per group of 32, and 1 plane per matrix) a PlanesStacks. The kernel
    hook equals the torch path (base GEMM + add_matmul) for a batch mixing all tenants and -1."""
    n, k, m = 20, 100, 9
    layouts = [(2, "row", None), (2, "row", None), (2, "group", 32), (1, "matrix", None)]
    ops_, base = {}, None
    for t, (p, scales, group) in enumerate(layouts):
        b0, planes, enc = _encoded(n, k, p, scales, group, seed=40 + t)
        base = b0 if base is None else base
        ops_[t] = planes.operator(enc.parts, enc.params, (n, k))
    one = type(ops_[0]).stack({0: ops_[0], 1: ops_[1]}, len(layouts))
    assert isinstance(one, PlanesStack) and one.tenants == [0, 1]
    mixed = type(ops_[0]).stack(ops_, len(layouts))
    assert isinstance(mixed, PlanesStacks) and mixed.tenants == [0, 1, 2, 3] and len(mixed.parts) == 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen)
    row_tenant = torch.tensor([0, -1, 1, 2, 3, 3, 0, 2, -1])
    for stack in (one, mixed):
        ids = row_tenant.where(torch.isin(row_tenant, torch.tensor(stack.tenants)), torch.tensor(-1))
        want = F.linear(x, base)
        groups = [(t, (ids == t).nonzero().flatten()) for t in torch.unique(ids).tolist() if t >= 0]
        stack.add_matmul(want, x, groups)
        got = stack.kernel_linear(K, x, base, ids)
        close(got, want, F32)
        for t in stack.tenants:  # the torch path of each row equals the tenant's own operator
            rows = (ids == t).nonzero().flatten()
            alone = F.linear(x[rows], base) + ops_[t].matmul(x[rows])
            torch.testing.assert_close(want[rows], alone, rtol=1e-5, atol=1e-5)
            idx = torch.tensor([0, 19, 7])
            torch.testing.assert_close(stack.rows(t, idx), ops_[t].rows(idx), rtol=0, atol=1e-7)
