"""The ``sign1`` codec's inference apply: ``scale·(x·Sᵀ)`` from packed bits, one tenant or many.

* :class:`SignOperator` — one tensor's delta ``s·S`` (``S`` ``[N, K]`` ±1 from int32 ``packed``
  ``[N, ceil(K/32)]``, layout v1; ``s`` a 0-d fp32 parameter). The torch path is the chunked
  product of :mod:`deltahub.codec.signs` (nothing ``[N, K]`` is built); the kernel hooks call
  ``kernels.sign_matmul`` (one fused ``x·Wᵀ + s·(x·Sᵀ) + b``) when the runtime hands in the
  ``deltahub.kernels`` module.
* :class:`SignStack` — the signs of several tenants of one weight ``[T_s, N, W]`` and their scales
  ``[T_s]``: ``kernels.multi_tenant_sign_matmul`` on a GPU, rows grouped by tenant elsewhere.

Gradients (calibration): ``grad_x = s·(g·S)`` and ``grad_s = Σ x ⊙ (g·S)`` from the same chunked
``g·S``; backward saves only ``x`` (no unpacked signs) and always runs the torch path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import signs
from .base import BitPlanes, DeltaOperator, PackedTenantDeltas
from .codecs import CodecError
from .packing import WORD_BITS

__all__ = ["SignOperator", "SignStack", "sign_delta", "transpose_packed", "check_packed"]


def check_packed(packed: Any, n: int, k: int) -> None:
    """``packed`` must be int32 ``[n, ceil(k/32)]``."""
    want = (n, -(-k // WORD_BITS))
    if not isinstance(packed, Tensor) or packed.dtype != torch.int32 or tuple(packed.shape) != want:
        got = f"{packed.dtype} {list(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise CodecError(f"packed signs for a [{n}, {k}] weight must be int32 {list(want)}, got {got}")


class _SignDelta(torch.autograd.Function):
    """``d = scale·(x·Sᵀ)`` with gradients for ``x`` and ``scale`` (none for the packed signs)."""

    @staticmethod
    def forward(ctx: Any, x2d: Tensor, packed: Tensor, scale: Tensor, k: int, kernels: Any) -> Tensor:
        ctx.save_for_backward(x2d, packed, scale)
        ctx.k = k
        if kernels is not None:
            return kernels.sign_matmul(x2d, packed, scale.to(torch.float32)).to(x2d.dtype)
        z = signs.sign_matmul_torch(x2d, packed, k)
        return (z * scale.to(z.dtype)).to(x2d.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None]:
        x2d, packed, scale = ctx.saved_tensors
        need_x, _, need_scale = ctx.needs_input_grad[:3]
        if not (need_x or need_scale):
            return None, None, None, None, None
        gs = signs.sign_matmul_t_torch(grad, packed, ctx.k)  # grad·S, [M, K]
        grad_x = (gs * scale.to(gs.dtype)).to(x2d.dtype) if need_x else None
        grad_scale = None
        if need_scale:
            grad_scale = (gs.to(torch.float32) * x2d.to(torch.float32)).sum().to(scale.dtype)
        return grad_x, None, grad_scale, None, None


def sign_delta(x2d: Tensor, packed: Tensor, scale: Tensor, k: int, kernels: Any = None) -> Tensor:
    """``scale·(x·Sᵀ)`` in ``x``'s dtype, differentiable in ``x`` and ``scale``.

    Args:
        x2d: ``[M, K]`` float. packed: int32 ``[N, ceil(K/32)]``. scale: 0-d fp32. k: ``K``.
        kernels: the ``deltahub.kernels`` module to run the forward on (a GPU), or None.

    Returns:
        ``[M, N]`` in ``x2d.dtype``.
    """
    return _SignDelta.apply(x2d, packed, scale, k, kernels)


def transpose_packed(packed: Tensor, rows: int, cols: int) -> Tensor:
    """Re-pack signs of an ``[R, C]`` matrix packed along C as its transpose ``[C, R]`` packed along R.

    Args:
        packed: int32 ``[R, ceil(C/32)]`` (layout v1). rows: ``R``. cols: ``C``.

    Returns:
        int32 ``[C, ceil(R/32)]`` (layout v1, zero padding bits). Works in blocks of rows, so the
        temporaries stay bounded by :data:`deltahub.codec.signs.CHUNK_BYTES` (at least 8 rows).
    """
    out_words = -(-rows // WORD_BITS)
    out = torch.zeros((cols, out_words), dtype=torch.int32)
    out_bytes = out.numpy().view(np.uint8)  # [C, 4*out_words]
    block = max(8, (signs.CHUNK_BYTES // max(1, 3 * cols)) // 8 * 8)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        bits = (signs.unpack_rows(packed[r0:r1].cpu(), cols, torch.int8) > 0).numpy()  # bool [r, C]
        packed_t = np.packbits(bits.T, axis=-1, bitorder="little")  # uint8 [C, ceil(r/8)]
        out_bytes[:, r0 // 8 : r0 // 8 + packed_t.shape[1]] = packed_t
    return out


class SignOperator(DeltaOperator):
    """``Δ = s·S`` of one ``[N, K]`` tensor.

    Attributes:
        packed: buffer, int32 ``[N, ceil(K/32)]`` (layout v1).
        scale: ``nn.Parameter``, 0-d fp32 (kept fp32 through ``.to(dtype)``).
    """

    trainable_names = ("scale",)

    def __init__(self, packed: Tensor, scale: float | Tensor, in_features: int, trainable: bool = False) -> None:
        if not isinstance(packed, Tensor) or packed.dim() != 2:
            raise CodecError(f"packed signs must be a 2-D int32 tensor, got {type(packed).__name__}")
        super().__init__(packed.shape[0], in_features)
        check_packed(packed, self.out_features, self.in_features)
        self.register_buffer("packed", packed.detach())
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        self.scale = nn.Parameter(s.to(packed.device), requires_grad=trainable)

    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        return sign_delta(x2d, self.packed, self.scale, self.in_features, kernels)

    def rows(self, index: Tensor) -> Tensor:
        return self.scale * signs.sign_rows(self.packed, index, self.in_features, torch.float32)

    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        xw = x2d if x2d.dtype == weight.dtype else x2d.to(weight.dtype)  # never copy W
        return kernels.sign_matmul(xw, self.packed, self.scale, weight, bias).to(x2d.dtype)

    def bit_planes(self) -> BitPlanes:
        return BitPlanes([self.packed], [self.scale.detach().reshape(1, 1)], None)

    def transposed(self) -> SignOperator:
        packed_t = transpose_packed(self.packed, self.out_features, self.in_features)
        return SignOperator(packed_t.to(self.packed.device), self.scale.detach(), self.out_features,
                            trainable=self.scale.requires_grad)

    @classmethod
    def stack(cls, ops: Mapping[int, DeltaOperator], n_tenants: int) -> SignStack:
        return SignStack.build(ops, n_tenants)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"[{self.out_features}, {self.in_features}], scale={float(self.scale):.4g}"


class SignStack(PackedTenantDeltas):
    """The ``sign1`` deltas of one weight ``[N, K]`` for several tenants.

    Attributes:
        packed: int32 ``[T_s, N, ceil(K/32)]`` (the tenants held, in id order).
        scales: fp32 ``[T_s]``.
        slot: int64 ``[T]``: tenant → index into ``packed``, ``-1`` for tenants not held.
    """

    @classmethod
    def build(cls, ops: Mapping[int, SignOperator], n_tenants: int) -> SignStack:
        tenants = sorted(ops)
        first = ops[tenants[0]]
        n, k = first.out_features, first.in_features
        for t in tenants:
            check_packed(ops[t].packed, n, k)
        slot = cls.slots(tenants, n_tenants)
        device = first.packed.device
        packed = torch.stack([ops[t].packed.to(device) for t in tenants])
        scales = torch.tensor([float(ops[t].scale) for t in tenants], dtype=torch.float32)
        return cls(packed, scales.to(device), slot.to(device), k)

    def add_matmul(self, y: Tensor, x2d: Tensor, groups: list[tuple[int, Tensor]]) -> None:
        for t, rows in groups:
            if t < 0 or self._slots[t] < 0:
                continue
            s = self._slots[t]
            z = signs.sign_matmul_torch(x2d.index_select(0, rows), self.packed[s], self.in_features)
            y.index_add_(0, rows, (z * self.scales[s].to(z.dtype)).to(y.dtype))

    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor, row_tenant: Tensor) -> Tensor | None:
        kernel_ids = torch.where(row_tenant >= 0, self.slot[row_tenant.clamp(min=0)], -1)
        return kernels.multi_tenant_sign_matmul(x2d, weight, self.packed, self.scales, kernel_ids, validate=False)

    def rows(self, tenant: int, index: Tensor) -> Tensor:
        i = self._slots[tenant]
        return self.scales[i] * signs.sign_rows(self.packed[i], index, self.in_features, torch.float32)

    def extra_repr(self) -> str:
        return f"sign tenants={len(self.tenants)}"
