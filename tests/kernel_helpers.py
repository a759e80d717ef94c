"""Helpers shared by the kernel tests (tests/test_kernels.py, tests/kernels_interp_cases.py)."""

from __future__ import annotations

import torch

from deltahub.codec.packing import pack_signs, unpack_signs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# kernel vs reference: both sum in fp32 (different order), then round once: at most ~1 ulp apart
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def signs(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed signs ``[n, ceil(k/32)]`` and the same signs dense (fp64, via deltahub.codec)."""
    packed = pack_signs(torch.randn(n, k, generator=gen))
    return packed, unpack_signs(packed, k, torch.float64)


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    packed, dense = signs(n, k, gen)
    return x, w, b, packed, dense


def close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


def planes_inputs(m: int, n: int, k: int, planes: int, scales: str, group: int | None, dtype: torch.dtype, seed: int = 0):
    """``x [m, k]``, ``w [n, k]``, ``b [n]`` in ``dtype``; ``planes`` packed sign planes int32
    ``[P, n, ceil(k/32)]``, their fp32 scales ``[P, R, C]`` for ``scales`` in matrix/row/group
    (``group`` columns per group), and the dense signs fp64 ``[P, n, k]``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    pairs = [signs(n, k, gen) for _ in range(planes)]
    r = 1 if scales == "matrix" else n
    c = -(-k // group) if scales == "group" else 1
    sc = torch.rand(planes, r, c, generator=gen) * 0.1 + 0.01
    return x, w, b, torch.stack([p for p, _ in pairs]), sc, torch.stack([d for _, d in pairs])
