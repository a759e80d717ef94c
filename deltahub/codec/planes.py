"""Codec ``planes`` (v1): progressive sign planes, ``Δ ≈ Σᵢ sᵢ ⊙ Sᵢ`` (residual binarization).

Plane ``i`` binarizes what the planes before it left: ``R₀ = Δ = W_ft − W_base`` (fp32),
``Sᵢ = sign(Rᵢ)`` (a zero gets ``+1``, packing layout v1), ``sᵢ = mean|Rᵢ|`` over each scale group,
``Rᵢ₊₁ = Rᵢ − sᵢ ⊙ Sᵢ``. Each plane lowers ``‖R‖`` (``mean|R|`` is the least-squares scale of
``sign(R)``), so **any prefix of the planes is a valid, coarser delta**: ``--bits k`` reads (and a pull
fetches) only the parts of the first ``k`` planes.

Parameters: ``planes`` (``k`` ≥ 1), ``scales`` (``"matrix"`` one scale per plane, ``"row"`` one per
output row, ``"group"`` one per row and ``group_size`` columns, a multiple of 32) and ``group_size``
(``"group"`` only). Parts, per plane ``i``: ``signs{i}`` int32 ``[N, ceil(K/32)]`` and ``scales{i}``
fp32 ``[R, C]`` with ``R`` = 1 (matrix) or ``N``, ``C`` = 1 or ``ceil(K/group_size)``.

Decoding is exact and deterministic: ``acc = W_base.float(); acc += expand(sᵢ) ⊙ Sᵢ`` for each plane
in order (fp32, one rounding per plane), then ``.to(D)``. A one-plane, per-matrix delta is what the
``sign1`` codec stores; compress writes it as ``sign1`` (same objects) rather than as ``planes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import signs
from .base import DeltaOperator, Encoded, JSONValue, PartSpec, TensorCodec
from .codecs import CodecError, NonFiniteDeltaError
from .packing import WORD_BITS, pack_signs, packed_shape
from .planes_grad import planes_delta

__all__ = ["PlanesCodec", "PlanesOperator", "GRANULARITIES", "MAX_PLANES"]

GRANULARITIES = ("matrix", "row", "group")
MAX_PLANES = 8
DEFAULT_GROUP_SIZE = 128
DEFAULT_PLANES = 2
#: Measured on the demo's real SmolLM2-135M pair (uncalibrated, held-out perplexity): one plane with
#: per-row scales keeps 97 % of the fine-tune's gain at 18.4 MB, against sign1's 94 % at 17.6 MB;
#: two planes with per-row scales keep 99 % at 36.1 MB (docs/design.md).
DEFAULT_SCALES = "row"
_ROWS_PER_CHUNK_ELEMS = 1 << 22  # rows decoded at once: ~16 MiB of fp32 temporaries


def _scale_shape(n: int, k: int, params: Mapping[str, Any]) -> tuple[int, int]:
    g = params["scales"]
    if g == "matrix":
        return (1, 1)
    if g == "row":
        return (n, 1)
    return (n, -(-k // int(params["group_size"])))


def _expand(scales: Tensor, n: int, k: int, group: int | None) -> Tensor:
    """Scales ``[R, C]`` → broadcastable to ``[n, k]`` (groups of ``group`` columns)."""
    if scales.shape[1] == 1:
        return scales
    assert group is not None
    return scales.repeat_interleave(group, dim=1)[:, :k]


def _group_means(absr: Tensor, params: Mapping[str, Any]) -> Tensor:
    """``mean|R|`` per scale group, accumulated in float64, as fp32 ``[R, C]``."""
    n, k = absr.shape
    a = absr.double()
    g = params["scales"]
    if g == "matrix":
        return (a.sum() / max(1, n * k)).float().reshape(1, 1)
    if g == "row":
        return (a.sum(dim=1, keepdim=True) / max(1, k)).float()
    size = int(params["group_size"])
    c = -(-k // size)
    pad = c * size - k
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    sums = a.reshape(n, c, size).sum(dim=2)
    counts = torch.full((c,), float(size), dtype=torch.float64)
    counts[-1] = size - pad
    return (sums / counts).float()


class PlanesCodec(TensorCodec):
    name = "planes"
    version = 1
    uses_base = True
    checks_finite = True
    progressive = True

    # ------------------------------------------------------------------ parameters and layout
    def check_params(self, params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> dict[str, JSONValue]:
        if len(shape) != 2:
            raise CodecError("a planes tensor must be 2-D")
        known = {"planes", "scales", "group_size"}
        extra = sorted(set(params) - known)
        if extra:
            raise CodecError(f"planes has no parameter {extra[0]!r}")
        k = params.get("planes")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_PLANES:
            raise CodecError(f"planes must be an int in 1..{MAX_PLANES}, got {k!r}")
        g = params.get("scales")
        if g not in GRANULARITIES:
            raise CodecError(f"scales must be one of {', '.join(GRANULARITIES)}, got {g!r}")
        out: dict[str, JSONValue] = {"planes": k, "scales": g}
        if g == "group":
            size = params.get("group_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < WORD_BITS or size % WORD_BITS or size > 1 << 20:
                raise CodecError(f"group_size must be a multiple of {WORD_BITS} (32 .. 2^20), got {size!r}")
            out["group_size"] = size
        elif "group_size" in params:
            raise CodecError("group_size goes with scales='group' only")
        return out

    def parts_for(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        k = int(params["planes"])  # type: ignore[arg-type]
        return tuple(f"signs{i}" for i in range(k)) + tuple(f"scales{i}" for i in range(k))

    def trainable_parts(self, params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        """Every plane's scales (``scales0 .. scales{k-1}``): calibration trains them all together."""
        return tuple(f"scales{i}" for i in range(int(params["planes"])))  # type: ignore[arg-type]

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        if not dtype.is_floating_point:
            raise CodecError(f"a planes tensor must be floating point, not {dtype}")
        n, k = shape
        out = {}
        for i in range(int(params["planes"])):  # type: ignore[arg-type]
            out[f"signs{i}"] = PartSpec(torch.int32, packed_shape(n, k))
            out[f"scales{i}"] = PartSpec(torch.float32, _scale_shape(n, k, params))
        return out

    @staticmethod
    def _params(options: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters of a tensor encoded with compress's ``options`` (defaults filled in)."""
        unknown = sorted(set(options) - {"planes", "scales", "group_size"})
        if unknown:
            raise CodecError(f"codec planes has no option {unknown[0]!r} (it takes planes, scales, group_size)")
        params: dict[str, Any] = {"planes": options.get("planes", DEFAULT_PLANES), "scales": options.get("scales", DEFAULT_SCALES)}
        if params["scales"] == "group":
            size = options.get("group_size")
            params["group_size"] = DEFAULT_GROUP_SIZE if size is None else size
        elif options.get("group_size") is not None:
            raise CodecError("group_size goes with scales='group' only")
        return params

    def check_options(self, options: Mapping[str, Any]) -> None:
        self.check_params(self._params(options), (1, 1))

    def equivalent(self, options: Mapping[str, Any]) -> str | None:
        if options.get("planes", DEFAULT_PLANES) == 1 and options.get("scales", DEFAULT_SCALES) == "matrix":
            return "sign1"  # same signs, same scale: sign1's objects, readable by every deltahub
        return None

    def planes(self, params: Mapping[str, JSONValue]) -> int:
        return int(params["planes"])  # type: ignore[arg-type]

    def part_plane(self, part: str) -> int:
        return int(part.removeprefix("signs").removeprefix("scales"))

    def prefix(self, params: Mapping[str, JSONValue], parts: Mapping[str, str], bits: int
               ) -> tuple[dict[str, JSONValue], dict[str, str]]:
        k = min(int(bits), int(params["planes"]))  # type: ignore[arg-type]
        if k < 1:
            raise CodecError(f"a prefix needs at least one plane, got {bits}")
        keep = {f"signs{i}" for i in range(k)} | {f"scales{i}" for i in range(k)}
        return {**params, "planes": k}, {p: oid for p, oid in parts.items() if p in keep}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        if base is None:
            raise CodecError("codec planes needs the base tensor")
        params = self.check_params(self._params(options), tuple(finetuned.shape))
        if base.shape != finetuned.shape:
            raise CodecError(f"shape mismatch: base is {list(base.shape)}, finetuned is {list(finetuned.shape)}")
        r = finetuned.to(torch.float32) - base.to(torch.float32)
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteDeltaError("the delta holds NaN or Inf")
        n, k = r.shape
        group = int(params["group_size"]) if params["scales"] == "group" else None
        delta_sq = float(r.double().pow(2).sum())
        base_sq = float(base.double().pow(2).sum())
        parts: dict[str, Tensor] = {}
        for i in range(int(params["planes"])):
            bits = r >= 0
            s = _group_means(r.abs(), params)
            parts[f"signs{i}"] = pack_signs(r)
            parts[f"scales{i}"] = s.contiguous()
            step = _expand(s, n, k, group) * torch.where(bits, 1.0, -1.0)
            r = r - step
        err = float(r.double().pow(2).sum())
        return Encoded(
            parts=parts,
            params=params,
            rel_recon_error=math.sqrt(err / delta_sq) if delta_sq else 0.0,
            rel_delta_norm=math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if not delta_sq else None),
        )

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        if base is None:
            raise CodecError("codec planes needs the base tensor")
        n, k = base.shape
        planes = int(params["planes"])  # type: ignore[arg-type]
        group = int(params["group_size"]) if params["scales"] == "group" else None  # type: ignore[arg-type]
        for i in range(planes):
            if f"signs{i}" not in parts or f"scales{i}" not in parts:
                raise CodecError(f"codec planes needs parts signs{i} and scales{i}")
        result = out if out is not None else torch.empty((n, k), dtype=out_dtype)
        rows = max(1, _ROWS_PER_CHUNK_ELEMS // max(1, k))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            acc = base[r0:r1].to(torch.float32)
            for i in range(planes):
                s = parts[f"scales{i}"]
                s = s if s.shape[0] == 1 else s[r0:r1]
                acc = acc + _expand(s, r1 - r0, k, group) * signs.unpack_rows(parts[f"signs{i}"][r0:r1], k, torch.float32)
            result[r0:r1].copy_(acc)
        return result

    # ------------------------------------------------------------------ inference
    def operator(self, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> DeltaOperator:
        planes = int(params["planes"])  # type: ignore[arg-type]
        group = int(params["group_size"]) if params["scales"] == "group" else None  # type: ignore[arg-type]
        return PlanesOperator([parts[f"signs{i}"] for i in range(planes)], [parts[f"scales{i}"] for i in range(planes)],
                              shape[1], group)


class PlanesOperator(DeltaOperator):
    """``x·Δᵀ = Σᵢ (x·Sᵢᵀ) ⊙ sᵢ`` from the packed planes (torch path; per-group scales apply to each
    group's partial product), and ``Δ[idx]`` for embeddings. Nothing ``[N, K]`` is built.

    ``packed{i}``: buffers, int32 ``[N, ceil(K/32)]``; ``scales{i}``: fp32 ``nn.Parameter`` s of the
    stored part's shape (frozen unless calibration trains them: :attr:`trainable_names`); with
    gradients the product runs through :func:`deltahub.codec.planes_grad.planes_delta`."""

    def __init__(self, packed: list[Tensor], scales: list[Tensor], in_features: int, group: int | None) -> None:
        super().__init__(packed[0].shape[0], in_features)
        self.k = len(packed)
        self.group = group
        self.trainable_names = tuple(f"scales{i}" for i in range(self.k))
        for i, (p, s) in enumerate(zip(packed, scales, strict=True)):
            self.register_buffer(f"packed{i}", p.detach())
            setattr(self, f"scales{i}", nn.Parameter(s.detach().to(torch.float32), requires_grad=False))

    def _plane(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"packed{i}"), getattr(self, f"scales{i}")

    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        k = self.in_features
        planes = [self._plane(i) for i in range(self.k)]
        if torch.is_grad_enabled() and (x2d.requires_grad or any(s.requires_grad for _, s in planes)):
            return planes_delta(x2d, [p for p, _ in planes], [s for _, s in planes], k, self.group)
        y = torch.zeros((x2d.shape[0], self.out_features), dtype=torch.float32, device=x2d.device)
        for i in range(self.k):
            packed, s = self._plane(i)
            if s.shape[1] == 1:
                z = signs.sign_matmul_torch(x2d, packed, k).to(torch.float32)
                y += z * s.reshape(1, -1) if s.shape[0] > 1 else z * s.reshape(())
                continue
            g = int(self.group)  # type: ignore[arg-type]
            for j in range(s.shape[1]):
                c0, c1 = j * g, min(k, (j + 1) * g)
                z = signs.sign_matmul_torch(x2d[:, c0:c1], packed[:, c0 // WORD_BITS : -(-c1 // WORD_BITS)], c1 - c0)
                y += z.to(torch.float32) * s[:, j].reshape(1, -1)
        return y.to(x2d.dtype)

    def rows(self, index: Tensor) -> Tensor:
        out = torch.zeros((index.numel(), self.in_features), dtype=torch.float32, device=index.device)
        for i in range(self.k):
            packed, s = self._plane(i)
            s_rows = s if s.shape[0] == 1 else s.index_select(0, index)
            out += _expand(s_rows, index.numel(), self.in_features, self.group) * signs.sign_rows(
                packed, index, self.in_features, torch.float32
            )
        return out
