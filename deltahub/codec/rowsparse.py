"""Codec ``rowsparse`` (v1): an embedding table or LM head ``[V', H]`` as its changed rows only.

Rows of a token embedding (or of an LM head) are independent: the rows of tokens a fine-tune never
saw often do not change at all, and a fine-tune that adds tokens (a resized vocabulary, ``V' > V``)
has rows no base row exists for. Against a base ``[V, H]`` (``V ≤ V'``, same ``H``):

* a row ``r < V`` is **unchanged** when the fine-tune's row is bit-identical to the base row cast to
  the fine-tune's dtype (and, when the dtypes differ, ``Δ_r = W_ft[r].float() − W_base[r].float()`` is
  all zeros): it costs one bit of the ``rows`` bitmap and decodes to the base row, bit for bit;
* a **changed** row ``r < V`` is binarized like ``planes`` with per-row scales: packed signs of
  ``Δ_r`` (layout v1, a zero gets ``+1``) and ``s_r = mean|Δ_r|`` (float64 sum, rounded to fp32);
* a row ``r ≥ V`` (an **added** token) is stored dense, in the fine-tune's dtype.

Parameters: ``base_rows`` = ``V`` and ``changed`` = ``R`` (the number of changed rows). Parts:

* ``rows``: int32 ``[ceil(V/32)]``, a bitmap of the changed rows packed like signs (layout v1: bit
  ``j`` of word ``w`` is row ``32w + j``, LSB first; 1 = changed; padding bits zero). A bitmap rather
  than a list of indices: it costs ``V/8`` bytes whatever ``R`` is (6 kB for a 49k vocabulary),
  where int32 indices cost ``4R`` (196 kB when every row changed, as after a full AdamW fine-tune);
  indices would be smaller only below ``V/32`` changed rows, where both are negligible;
* ``signs``: int32 ``[R, ceil(H/32)]`` and ``scales``: fp32 ``[R, 1]``, in row order (only when ``R > 0``);
* ``added``: the fine-tune's dtype ``[V' − V, H]`` (only when ``V' > V``).

Decoding is exact and deterministic: ``acc = W_base.float()``; for changed rows
``acc[r] = acc[r] + s_r·S_r`` (fp32, one rounding); ``out[:V] = acc.to(D)``, ``out[V:] = added.to(D)``.
Unchanged rows never see an addition, so ``-0.0`` and NaN payloads of the base survive.

Inference (:class:`RowSparseOperator`): ``Δ`` is ``s_r·S_r`` on the changed rows and zero elsewhere;
``rows(idx)`` unpacks only the looked-up changed rows, ``matmul`` (a tied LM head) multiplies by the
changed rows only; nothing ``[V, H]`` is built. A resized vocabulary has rows with no base row to add
a delta to, so :meth:`RowSparseCodec.operator` returns ``None`` for it and delta mode uses that tensor
as decoded (base + delta rows + added rows, the same memory as the base table it replaces).
Nothing is trainable yet (calibration trains scalar parameters only; the per-row scales are a part).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import signs
from .base import DeltaOperator, Encoded, JSONValue, PartSpec, TensorCodec
from .codecs import CodecError, NonFiniteDeltaError
from .packing import WORD_BITS, pack_signs, packed_shape

__all__ = ["RowSparseCodec", "RowSparseOperator", "pack_row_mask", "unpack_row_mask"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 20  # rows handled at once: ~4 MiB of fp32 temporaries (and as much again)
_MAX_ROWS = 1 << 31
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HINT = "the manifest or its parts are damaged; run `deltahub verify`, then pull or compress again"


def pack_row_mask(mask: Tensor) -> Tensor:
    """A bool ``[V]`` mask → int32 ``[ceil(V/32)]`` (layout v1: LSB first, padding bits zero)."""
    v = int(mask.numel())
    words = -(-v // WORD_BITS)
    packed = np.packbits(mask.reshape(-1).numpy().astype(np.uint8), bitorder="little")
    buf = np.zeros(words * (WORD_BITS // 8), dtype=np.uint8)
    buf[: packed.size] = packed
    return torch.from_numpy(buf.view(np.int32).copy())


def unpack_row_mask(packed: Tensor, v: int) -> Tensor:
    """int32 ``[ceil(V/32)]`` → bool ``[V]``. Raises :class:`CodecError` when a padding bit is set."""
    bits = np.unpackbits(packed.contiguous().view(torch.uint8).numpy(), bitorder="little")
    if bits[v:].any():
        raise CodecError("the rows bitmap has bits set past the base's last row", _HINT)
    return torch.from_numpy(bits[:v].astype(np.bool_))


def _changed_rows(base: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """For one row block: which rows changed (bool ``[r]``) and the fp32 delta ``[r, H]``."""
    d = ft.to(torch.float32) - base.to(torch.float32)
    view = _INT_VIEW[ft.element_size()]
    cast = base.to(ft.dtype)
    changed = (cast.view(view) != ft.view(view)).any(dim=1)
    if base.dtype != ft.dtype:  # a base row that rounds to the fine-tune's is unchanged only if Δ = 0
        changed |= (d != 0).any(dim=1)
    return changed, d


class RowSparseCodec(TensorCodec):
    """Codec ``rowsparse`` (v1): unchanged rows free, changed rows as signs + a scale per row, added
    rows dense. See the module's docstring for the layout."""

    name = "rowsparse"
    version = 1
    part_names = ("rows", "signs", "scales", "added")
    uses_base = True
    compressible = True  # the added rows are float weights; a sparse bitmap is mostly zeros

    # ------------------------------------------------------------------ parameters and layout
    def accepts(self, shape: tuple[int, ...], dtype: torch.dtype, base_shape: tuple[int, ...] | None,
                base_dtype: torch.dtype | None) -> bool:
        """A 2-D floating table with the base's width and at least the base's rows (a resized
        vocabulary adds rows at the end)."""
        return (
            base_shape is not None
            and base_dtype is not None
            and len(shape) == 2
            and len(base_shape) == 2
            and shape[1] == base_shape[1] >= 1
            and shape[0] >= base_shape[0] >= 1
            and dtype.is_floating_point
            and base_dtype.is_floating_point
        )

    def check_params(self, params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> dict[str, JSONValue]:
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise CodecError(f"a rowsparse tensor must be a non-empty 2-D table, got shape {list(shape)}")
        extra = sorted(set(params) - {"base_rows", "changed"})
        if extra:
            raise CodecError(f"rowsparse has no parameter {extra[0]!r}")
        v, r = params.get("base_rows"), params.get("changed")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= min(shape[0], _MAX_ROWS):
            raise CodecError(f"base_rows must be an int in 1..{shape[0]} (the table's rows), got {v!r}")
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= v:
            raise CodecError(f"changed must be an int in 0..{v} (base_rows), got {r!r}")
        return {"base_rows": v, "changed": r}

    def parts_for(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        out = ["rows"]
        if int(params["changed"]) > 0:  # type: ignore[arg-type]
            out += ["signs", "scales"]
        if shape[0] > int(params["base_rows"]):  # type: ignore[arg-type]
            out.append("added")
        return tuple(out)

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        if not dtype.is_floating_point:
            raise CodecError(f"a rowsparse tensor must be floating point, not {dtype}")
        v, r = int(params["base_rows"]), int(params["changed"])  # type: ignore[arg-type]
        n, h = shape
        specs = {
            "rows": PartSpec(torch.int32, (-(-v // WORD_BITS),)),
            "signs": PartSpec(torch.int32, packed_shape(r, h)),
            "scales": PartSpec(torch.float32, (r, 1)),
            "added": PartSpec(dtype, (n - v, h)),
        }
        return {p: specs[p] for p in self.parts_for(shape, params)}

    # ------------------------------------------------------------------ encode / decode
    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        """``base`` ``[V, H]``, ``finetuned`` ``[V', H]`` (``V' ≥ V``), floating, on the CPU.

        Raises :class:`NonFiniteDeltaError` when a changed row's delta holds NaN/Inf (compress then
        stores the tensor dense under ``allow_nonfinite``), :class:`CodecError` on other bad input."""
        self.check_options(options)
        if base is None:
            raise CodecError("codec rowsparse needs the base tensor")
        if not self.accepts(tuple(finetuned.shape), finetuned.dtype, tuple(base.shape), base.dtype):
            raise CodecError(
                f"rowsparse stores a floating [V', H] table against a floating [V, H] base with V <= V'; got "
                f"{finetuned.dtype} {list(finetuned.shape)} against {base.dtype} {list(base.shape)}"
            )
        v, h = base.shape
        rows = max(1, _CHUNK_ELEMS // h)
        masks: list[Tensor] = []
        packed: list[Tensor] = []
        scales: list[Tensor] = []
        delta_sq = base_sq = err_sq = 0.0
        for r0 in range(0, v, rows):
            r1 = min(v, r0 + rows)
            changed, d = _changed_rows(base[r0:r1], finetuned[r0:r1])
            masks.append(changed)
            b = base[r0:r1].reshape(-1).to(torch.float32)
            base_sq += float(torch.dot(b, b))  # a statistic: an fp32 dot product suffices
            if not bool(changed.any()):
                continue
            dc = d[changed] if not bool(changed.all()) else d
            a = dc.abs().double()
            abs_sum = a.sum(dim=1, keepdim=True)  # float64, exact for the scale's rounding
            if not bool(torch.isfinite(abs_sum).all()):  # a row sum is finite iff the row is
                bad = int((~torch.isfinite(abs_sum.reshape(-1))).nonzero()[0])
                row = int(changed.nonzero()[bad]) + r0
                raise NonFiniteDeltaError(f"the delta of row {row} holds NaN or Inf")
            s = (abs_sum / h).float()  # mean|Δ_r|, one rounding to fp32
            packed.append(pack_signs(dc))
            scales.append(s)
            sq_sum = a.square_().sum(dim=1, keepdim=True)
            delta_sq += float(sq_sum.sum())
            sd = s.double()
            err_sq += float((sq_sum - 2 * sd * abs_sum + sd * sd * h).sum())  # ‖Δ_r − s_r·S_r‖²
        mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
        r = int(mask.sum())
        parts: dict[str, Tensor] = {"rows": pack_row_mask(mask)}
        if r:
            parts["signs"] = torch.cat(packed).contiguous()
            parts["scales"] = torch.cat(scales).contiguous()
        if finetuned.shape[0] > v:
            parts["added"] = finetuned[v:].contiguous().clone()
        logger.debug("rowsparse encode [%d, %d] against %d base rows: %d changed, %d added",
                     finetuned.shape[0], h, v, r, finetuned.shape[0] - v)
        return Encoded(
            parts=parts,
            params={"base_rows": int(v), "changed": r},
            rel_recon_error=math.sqrt(max(err_sq, 0.0) / delta_sq) if delta_sq else 0.0,
            rel_delta_norm=math.sqrt(delta_sq / base_sq) if base_sq else (0.0 if not delta_sq else None),
        )

    def _check_inputs(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue]
                      ) -> tuple[int, int, Tensor]:
        """``(V, H, changed row ids int64 [R])`` after checking the base and the parts against the
        parameters (the layout is input: a wrong size is a :class:`CodecError`, never a misread)."""
        if base is None:
            raise CodecError("codec rowsparse needs the base tensor")
        v, r = int(params["base_rows"]), int(params["changed"])  # type: ignore[arg-type]
        if base.dim() != 2 or base.shape[0] != v or not base.is_floating_point():
            raise CodecError(f"rowsparse expects a floating base table of {v} rows, got {base.dtype} {list(base.shape)}", _HINT)
        h = int(base.shape[1])
        n = v + (int(parts["added"].shape[0]) if "added" in parts else 0)
        specs = self.part_specs((n, h), parts["added"].dtype if "added" in parts else torch.float32, params)
        for name, spec in specs.items():
            t = parts.get(name)
            if t is None:
                raise CodecError(f"codec rowsparse needs its part {name!r}", _HINT)
            if tuple(t.shape) != spec.shape or (name != "added" and t.dtype != spec.dtype):
                raise CodecError(f"rowsparse part {name!r} is {t.dtype} {list(t.shape)}, expected {spec.dtype} {list(spec.shape)}", _HINT)
        mask = unpack_row_mask(parts["rows"], v)
        idx = mask.nonzero().reshape(-1)
        if idx.numel() != r:
            raise CodecError(f"the rows bitmap marks {idx.numel()} changed rows, the manifest says {r}", _HINT)
        if r and not bool(torch.isfinite(parts["scales"]).all()):
            raise CodecError("a rowsparse scale is not finite", _HINT)
        return v, h, idx

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        v, h, idx = self._check_inputs(base, parts, params)
        assert base is not None
        added = parts.get("added")
        n = v + (0 if added is None else int(added.shape[0]))
        if out is not None and (tuple(out.shape) != (n, h) or out.dtype != out_dtype):
            raise CodecError(f"out must be {out_dtype} [{n}, {h}], got {out.dtype} {list(out.shape)}")
        result = out if out is not None else torch.empty((n, h), dtype=out_dtype)
        rows = max(1, _CHUNK_ELEMS // h)
        ids = idx.tolist()
        p0 = 0
        for r0 in range(0, v, rows):
            r1 = min(v, r0 + rows)
            acc = base[r0:r1].to(torch.float32, copy=True)  # a copy: the base may be read-only, or fp32 itself
            p1 = bisect.bisect_left(ids, r1, lo=p0)  # the changed rows of this block: ids[p0:p1]
            if p1 > p0:
                local = idx[p0:p1] - r0
                s = parts["scales"][p0:p1]
                acc[local] = acc[local] + s * signs.unpack_rows(parts["signs"][p0:p1], h, torch.float32)
            result[r0:r1].copy_(acc)
            p0 = p1
        if added is not None:
            result[v:].copy_(added)
        return result

    # ------------------------------------------------------------------ inference
    def operator(self, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
                 shape: tuple[int, ...]) -> DeltaOperator | None:
        """The delta ``[V, H]`` (``None`` for a resized vocabulary: added rows have no base row, so
        the tensor is used as decoded)."""
        v, r = int(params["base_rows"]), int(params["changed"])  # type: ignore[arg-type]
        if shape[0] != v:
            return None
        h = int(shape[1])
        if "rows" not in parts or (r and ("signs" not in parts or "scales" not in parts)):
            raise CodecError("codec rowsparse needs its parts rows, signs and scales", _HINT)
        idx = unpack_row_mask(parts["rows"], v).nonzero().reshape(-1)
        if idx.numel() != r:
            raise CodecError(f"the rows bitmap marks {idx.numel()} changed rows, the manifest says {r}", _HINT)
        packed = parts["signs"] if r else torch.zeros(packed_shape(0, h), dtype=torch.int32)
        scales = parts["scales"] if r else torch.zeros((0, 1), dtype=torch.float32)
        return RowSparseOperator(idx, packed, scales, v, h)


class RowSparseOperator(DeltaOperator):
    """``Δ`` ``[V, H]``: ``s_r·S_r`` on the changed rows (ids ``index`` int64 ``[R]``, signs int32
    ``[R, ceil(H/32)]``, scales fp32 ``[R, 1]``), zero elsewhere. Nothing ``[V, H]`` is built:
    ``rows`` unpacks the looked-up changed rows, ``matmul`` the changed rows in chunks."""

    def __init__(self, index: Tensor, packed: Tensor, scales: Tensor, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        self.register_buffer("index", index.to(torch.int64).detach())
        self.register_buffer("packed", packed.detach())
        self.register_buffer("scales", scales.detach().to(torch.float32))
        where = torch.full((out_features,), -1, dtype=torch.int64)
        where[self.index] = torch.arange(self.index.numel())
        self.register_buffer("where", where)  # row id → position among the changed rows, or -1

    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        """``x·Δᵀ``: ``[M, H]`` → ``[M, V]`` in ``x``'s dtype (zero columns for unchanged rows)."""
        y = torch.zeros((x2d.shape[0], self.out_features), dtype=torch.float32, device=x2d.device)
        if self.index.numel() == 0:
            return y.to(x2d.dtype)
        z = signs.sign_matmul_torch(x2d, self.packed, self.in_features).to(torch.float32) * self.scales.reshape(1, -1)
        return y.index_copy(1, self.index, z).to(x2d.dtype)

    def rows(self, index: Tensor) -> Tensor:
        """``Δ[index]`` fp32 ``[L, H]``; unchanged rows are ``-0.0`` (so ``W[i] + Δ[i]`` keeps every
        bit of ``W[i]``, negative zeros included)."""
        out = torch.full((index.numel(), self.in_features), -0.0, dtype=torch.float32, device=index.device)
        pos = self.where.index_select(0, index.reshape(-1))
        sel = (pos >= 0).nonzero().reshape(-1)
        if sel.numel():
            p = pos.index_select(0, sel)
            out[sel] = self.scales.index_select(0, p) * signs.sign_rows(self.packed, p, self.in_features, torch.float32)
        return out
