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

import numpy as np
import torch
from torch import Tensor, nn

from . import signs
from .base import BitPlanes, DeltaOperator, Encoded, JSONValue, PartSpec, PlanesLayout, TenantDeltas, TensorCodec
from .codecs import CodecError, NonFiniteDeltaError
from .packing import WORD_BITS, pack_signs, packed_shape, sign_lut
from .planes_apply import expand_scales, planes_kernel_linear, stack_planes
from .planes_grad import planes_delta
from .sign1 import run_row_blocks

__all__ = ["PlanesCodec", "PlanesOperator", "GRANULARITIES", "MAX_PLANES"]

GRANULARITIES = ("matrix", "row", "group")
MAX_PLANES = 8
DEFAULT_GROUP_SIZE = 128
DEFAULT_PLANES = 2
#: Measured on the demo's real SmolLM2-135M pair (uncalibrated, held-out perplexity): one plane with
#: per-row scales keeps 97 % of the fine-tune's gain at 18.4 MB, against sign1's 94 % at 17.6 MB;
#: two planes with per-row scales keep 99 % at 36.1 MB (docs/design.md).
DEFAULT_SCALES = "row"


def _scale_shape(n: int, k: int, params: Mapping[str, Any]) -> tuple[int, int]:
    g = params["scales"]
    if g == "matrix":
        return (1, 1)
    if g == "row":
        return (n, 1)
    return (n, -(-k // int(params["group_size"])))


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
        if params["scales"] == "matrix":  # one scale per plane over the whole matrix: not row-separable
            return _encode_whole(base, finetuned, params)
        return _encode_rows(base, finetuned, params)

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
        if n == 0 or k == 0:
            return result
        packed = [parts[f"signs{i}"].contiguous().view(torch.uint8) for i in range(planes)]  # [N, 4W]
        scales = [parts[f"scales{i}"] for i in range(planes)]
        nbytes = packed[0].shape[1]
        wide = nbytes * 8
        direct = result.dtype == torch.float32  # accumulate straight into the output
        rows = max(1, _TILE_ELEMS // max(1, k))
        lut = sign_lut()

        def worker():
            idx_buf = torch.empty(rows * nbytes, dtype=torch.int32)
            sgn_buf = torch.empty(rows * nbytes, dtype=torch.int64)
            sf_buf = torch.empty((rows, k), dtype=torch.float32)
            acc_buf = None if direct else torch.empty((rows, k), dtype=torch.float32)

            def tile(r0: int, r1: int) -> None:
                r = r1 - r0
                acc = result[r0:r1] if acc_buf is None else acc_buf[:r]
                acc.copy_(base[r0:r1])  # exact widening to fp32
                sf = sf_buf[:r]
                idx = idx_buf[: r * nbytes]
                sgn = sgn_buf[: r * nbytes]
                for i in range(planes):
                    idx.copy_(packed[i][r0:r1].reshape(-1))
                    torch.index_select(lut, 0, idx, out=sgn)  # byte -> 8 int8 signs
                    sf.copy_(sgn.view(torch.int8).view(r, wide)[:, :k])  # +-1, fp32
                    s = scales[i]
                    s = s if s.shape[0] == 1 else s[r0:r1]
                    # acc + s*S: the product is exactly +-s, then one fp32 rounding per plane
                    acc.addcmul_(sf, expand_scales(s, k, group))
                if acc_buf is not None:
                    result[r0:r1].copy_(acc)  # the single rounding to out_dtype

            return tile

        run_row_blocks(n, rows, n * k, worker)
        return result

    # ------------------------------------------------------------------ inference
    def planes_layout(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> PlanesLayout:
        n, k = shape
        columns = _scale_shape(n, k, params)[1]
        return PlanesLayout(int(params["planes"]), columns, int(params["group_size"]) if columns > 1 else None)  # type: ignore[arg-type]

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

    def bit_planes(self) -> BitPlanes:
        planes = [self._plane(i) for i in range(self.k)]
        scales = [s.detach() for _p, s in planes]
        return BitPlanes([p for p, _s in planes], scales, self.group if scales[0].shape[1] > 1 else None)

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
            out += expand_scales(s_rows, self.in_features, self.group) * signs.sign_rows(
                packed, index, self.in_features, torch.float32
            )
        return out

    # ---- kernels (deltahub.codec.planes_apply): the runtime hands in deltahub.kernels on a GPU
    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """``x·(W + Δ)ᵀ + bias`` in one ``kernels.planes_matmul`` call (``[M, N]`` in x's dtype)."""
        return planes_kernel_linear(self, kernels, x2d, weight, bias)

    @classmethod
    def stack(cls, ops: Mapping[int, DeltaOperator], n_tenants: int) -> TenantDeltas:
        """Several tenants' planes deltas of one weight (``kernels.multi_tenant_planes_matmul``)."""
        return stack_planes(ops, n_tenants)  # type: ignore[arg-type]

# Encode and decode work on tiles of whole rows of at most this many elements (fp32 residual, fp64
# scratch: they stay in a core's cache between passes), on the codec's worker threads, one intra-op
# thread each (:func:`deltahub.codec.sign1.run_row_blocks`). Row and group scales depend on their
# own rows only, so every plane of a tile is computed before the next tile is read.
_TILE_ELEMS = 1 << 16


def _row_sums(x: Tensor) -> Tensor:
    """Per-row sums of a float64 ``[R, K]`` tensor as ``[R, 1]``, each row reduced alone in the
    same order whatever ``R`` is (a single row is padded with a zero row: torch reduces a
    one-output sum differently)."""
    if x.shape[0] == 1:
        return torch.cat([x, torch.zeros_like(x)]).sum(dim=1, keepdim=True)[:1]
    return x.sum(dim=1, keepdim=True)


def _encode_rows(base: Tensor, finetuned: Tensor, params: dict[str, Any]) -> Encoded:
    """Encode with per-row or per-group scales, tile by tile (see :data:`_TILE_ELEMS`).

    Exactly the planes of the whole-matrix definition (:func:`_encode_whole`): the delta in fp32,
    per plane ``bits = R >= 0``, the scale from float64 sums of ``|R|`` per row (or per group of a
    row), ``R -= ±s`` (one fp32 rounding). The statistics (``‖Δ‖``, ``‖W‖``, the final residual)
    are float64 row sums added exactly (``math.fsum``): independent of tiles and threads.
    """
    n, k = finetuned.shape
    planes = int(params["planes"])
    group = int(params["group_size"]) if params["scales"] == "group" else None
    sn, sc = _scale_shape(n, k, params)
    w = packed_shape(n, k)[1]
    signs_out = [torch.zeros((n, w), dtype=torch.int32) for _ in range(planes)]
    scales_out = [torch.empty((sn, sc), dtype=torch.float32) for _ in range(planes)]
    row_dsq = torch.zeros(n, dtype=torch.float64)
    row_bsq = torch.zeros(n, dtype=torch.float64)
    row_err = torch.zeros(n, dtype=torch.float64)
    if n == 0 or k == 0:
        for sc_t in scales_out:
            sc_t.zero_()
        return Encoded(parts=_parts(signs_out, scales_out), params=params, rel_recon_error=0.0, rel_delta_norm=0.0)
    packed_np = [p.numpy().view(np.uint8) for p in signs_out]  # [N, 4W], share memory
    nbytes = (k + 7) // 8
    rows = max(1, _TILE_ELEMS // k)

    def worker():
        b32_buf = torch.empty((rows, k), dtype=torch.float32)
        r_buf = torch.empty((rows, k), dtype=torch.float32)
        step_buf = torch.empty((rows, k), dtype=torch.float32)
        d64_buf = torch.empty((rows, k), dtype=torch.float64)
        ge_buf = np.empty((rows, k), dtype=np.bool_)

        def tile(r0: int, r1: int) -> None:
            t = r1 - r0
            b32, r, step, d64, ge = b32_buf[:t], r_buf[:t], step_buf[:t], d64_buf[:t], ge_buf[:t]
            b32.copy_(base[r0:r1])  # exact widening
            r.copy_(finetuned[r0:r1])
            r.sub_(b32)
            r.add_(0.0)  # -0.0 -> +0.0 (its bit is 1 either way), so the sign bit below is the bit
            d64.copy_(b32)
            row_bsq[r0:r1] = _row_sums(d64.square_()).reshape(-1)
            for i in range(planes):
                rn = r.numpy()
                np.greater_equal(rn, np.float32(0), out=ge)  # NaN -> False, like the layout says
                packed_np[i][r0:r1, :nbytes] = np.packbits(ge, axis=-1, bitorder="little")
                d64.copy_(r)
                d64.abs_()
                if i == 0:
                    sums = _row_sums(d64)
                    if not bool(torch.isfinite(sums).all()):  # fp32 magnitudes cannot overflow in fp64
                        raise NonFiniteDeltaError("the delta holds NaN or Inf")
                    row_dsq[r0:r1] = _row_sums(d64.square()).reshape(-1)
                if group is None:  # row scales
                    sums = sums if i == 0 else _row_sums(d64)
                    s = (sums / max(1, k)).float()
                elif t == 1:  # a single row: padded, so it is reduced like every other row
                    s = _group_means(torch.cat([d64, torch.zeros_like(d64)]), params)[:1]
                else:
                    s = _group_means(d64, params)
                scales_out[i][r0:r1] = s
                # R -= (+s if bit else -s): the step is exactly +-s; one fp32 rounding
                torch.copysign(expand_scales(s, k, group), r, out=step)
                r.sub_(step)
            d64.copy_(r)
            row_err[r0:r1] = _row_sums(d64.square_()).reshape(-1)

        return tile

    run_row_blocks(n, rows, n * k, worker)
    delta_sq = math.fsum(row_dsq.tolist())
    base_sq = math.fsum(row_bsq.tolist())
    err = math.fsum(row_err.tolist())
    return Encoded(
        parts=_parts(signs_out, scales_out),
        params=params,
        rel_recon_error=math.sqrt(err / delta_sq) if delta_sq else 0.0,
        rel_delta_norm=math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if not delta_sq else None),
    )


def _parts(signs_out: list[Tensor], scales_out: list[Tensor]) -> dict[str, Tensor]:
    parts: dict[str, Tensor] = {}
    for i, (p, s) in enumerate(zip(signs_out, scales_out)):
        parts[f"signs{i}"] = p
        parts[f"scales{i}"] = s
    return parts


def _encode_whole(base: Tensor, finetuned: Tensor, params: dict[str, Any]) -> Encoded:
    """The whole-matrix definition of the encode (used for per-matrix scales, whose means span the
    matrix): ``R₀ = Δ`` in fp32, per plane ``Sᵢ = R >= 0``, ``sᵢ`` = float64 mean of ``|R|`` per
    scale group, ``R -= sᵢ ⊙ Sᵢ``."""
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
        step = expand_scales(s, k, group) * torch.where(bits, 1.0, -1.0)
        r = r - step
    err = float(r.double().pow(2).sum())
    return Encoded(
        parts=parts,
        params=params,
        rel_recon_error=math.sqrt(err / delta_sq) if delta_sq else 0.0,
        rel_delta_norm=math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if not delta_sq else None),
    )
