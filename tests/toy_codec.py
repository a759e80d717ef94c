"""A codec defined outside deltahub (the registry's proof): ``rowsign``, signs with one scale per row.

Two parts per tensor ``[N, K]``:

* ``signs``  — int32 ``[N, ceil(K/32)]`` packed signs of ``Δ = W_ft − W_base`` (layout v1);
* ``scales`` — fp32 ``[N]``, ``mean|Δ|`` of each row.

``W ≈ (W_base.float() + scales[:, None] · S).to(D)``. One parameter, ``gain`` (a trainable fp32
multiplier of every row scale, 1.0 when encoded), so calibration has something to train. The
inference apply is a plain torch path (no kernel hook): ``x·Δᵀ = gain · (x·Sᵀ) ⊙ scales``.

Only public names of :mod:`deltahub.codec` are used, as a plug-in package would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.codec import CodecError, DeltaOperator, Encoded, PartSpec, TensorCodec, pack_signs, packed_shape, unpack_signs

NAME = "rowsign"


def reference_rowsign(base: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """What the codec must store, computed independently of it: (signs ±1 fp32 [N, K], row scales
    fp32 [N]) of the fp32 difference (a zero difference gets +1, as packing layout v1 says)."""
    delta = ft.to(torch.float32) - base.to(torch.float32)
    signs = torch.where(delta >= 0, 1.0, -1.0)
    scales = torch.tensor([math.fsum(row) / len(row) for row in delta.abs().double().tolist()], dtype=torch.float64)
    return signs, scales.float()


class RowSignOperator(DeltaOperator):
    trainable_names = ("gain",)

    def __init__(self, packed: Tensor, scales: Tensor, gain: float, k: int) -> None:
        super().__init__(packed.shape[0], k)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales.to(torch.float32))
        self.gain = nn.Parameter(torch.tensor(float(gain), dtype=torch.float32), requires_grad=False)

    def _signs(self) -> Tensor:
        return unpack_signs(self.packed, self.in_features, torch.float32)

    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        z = x2d.to(torch.float32) @ self._signs().t()
        return (z * (self.gain * self.scales)).to(x2d.dtype)

    def rows(self, index: Tensor) -> Tensor:
        s = unpack_signs(self.packed.index_select(0, index), self.in_features, torch.float32)
        return (self.gain * self.scales.index_select(0, index))[:, None] * s


class RowSignCodec(TensorCodec):
    name = NAME
    version = 1
    part_names = ("signs", "scales")
    uses_base = True
    trainable_params = ("gain",)

    def encode(self, base: Tensor | None, finetuned: Tensor) -> Encoded:
        assert base is not None
        delta = finetuned.to(torch.float32) - base.to(torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise CodecError("the delta is not finite")
        scales = delta.abs().double().mean(dim=1).float()
        packed = pack_signs(delta)
        approx = scales[:, None] * torch.where(delta >= 0, 1.0, -1.0)
        norm = float(delta.norm())
        err = float((delta - approx).norm()) / norm if norm else 0.0
        return Encoded(parts={"signs": packed, "scales": scales}, params={"gain": 1.0}, rel_recon_error=err)

    def check_params(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
        gain = params.get("gain")
        if set(params) != {"gain"} or not isinstance(gain, float) or not math.isfinite(gain) or len(shape) != 2:
            raise CodecError(f"rowsign takes one finite float 'gain', got {dict(params)}")
        return {"gain": gain}

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, Any]) -> dict[str, PartSpec]:
        n, k = shape
        return {"signs": PartSpec(torch.int32, packed_shape(n, k)), "scales": PartSpec(torch.float32, (n,))}

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, Any],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        assert base is not None
        k = base.shape[1]
        gain = torch.tensor(params["gain"], dtype=torch.float32)
        w = base.to(torch.float32) + (gain * parts["scales"])[:, None] * unpack_signs(parts["signs"], k, torch.float32)
        if out is not None:
            out.copy_(w)
            return out
        return w.to(out_dtype)

    def operator(self, parts: Mapping[str, Tensor], params: Mapping[str, Any], shape: tuple[int, ...]) -> DeltaOperator:
        return RowSignOperator(parts["signs"], parts["scales"], params["gain"], shape[1])
