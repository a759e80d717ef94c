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
