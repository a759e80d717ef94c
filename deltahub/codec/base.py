"""What a codec is: :class:`TensorCodec` (storage) and :class:`DeltaOperator` (inference apply).

A *codec* says how one tensor of a stored model is kept. It is one module of
:mod:`deltahub.codec` (or of a plug-in) that defines a :class:`TensorCodec` subclass and registers an
instance with :func:`deltahub.codec.registry.register`. The rest of deltahub never branches on a
codec's name: it asks the codec.

Per tensor, a codec declares:

* ``name`` and ``version`` (written into every manifest record; an unknown name or version is
  refused by readers), and ``part_names``: the named parts it stores, each one object of the store
  and one safetensors entry on the Hub (e.g. ``("signs",)``; ``()`` for ``same``);
* ``uses_base``: whether the tensor is rebuilt from the base tensor of the same name;
* :meth:`~TensorCodec.encode` (one tensor at a time: the caller streams the checkpoint) → parts and
  JSON parameters; :meth:`~TensorCodec.decode` (exact, into a new tensor or into ``out``);
  :meth:`~TensorCodec.part_specs` (dtype and shape of every part, to read them back) and
  :meth:`~TensorCodec.stored_nbytes`;
* :meth:`~TensorCodec.check_params` (manifests are input: parameters are validated on read);
* its inference apply: :meth:`~TensorCodec.operator` returns a :class:`DeltaOperator`, an
  ``nn.Module`` that computes ``x·Δᵀ`` and rows of ``Δ`` without building ``Δ`` (the torch path),
  offers a kernel hook (:meth:`DeltaOperator.kernel_linear`, called by the runtime with the
  ``deltahub.kernels`` module when Triton runs: the codec itself imports no kernel), and for
  multi-tenant serving :meth:`DeltaOperator.stack` (several tenants' operators of one weight).

Imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .codecs import CodecError

__all__ = [
    "DeltaOperator",
    "Encoded",
    "JSONValue",
    "LoopedTenantDeltas",
    "PackedTenantDeltas",
    "PartSpec",
    "TenantDeltas",
    "TensorCodec",
    "DenseDeltaOperator",
    "as_output",
    "BitPlanes",
    "PlanesLayout",
]

JSONValue = Any
"""A JSON-serializable value (codec parameters are written into canonical JSON manifests)."""


@dataclass(frozen=True)
class PartSpec:
    """How one stored part of one tensor is laid out: raw little-endian ``dtype`` ``shape``."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PlanesLayout:
    """The shape of a delta kept as sign planes (see :class:`BitPlanes`), known from the manifest
    alone: ``planes`` P (1..8), ``columns`` C of scales per row (1, or ``ceil(K/group)``) and
    ``group`` (columns per scale group when ``columns > 1``, else None)."""

    planes: int
    columns: int
    group: int | None


@dataclass(frozen=True)
class BitPlanes:
    """A delta ``Δ = Σᵢ sᵢ ⊙ Sᵢ`` as P sign planes, the layout deltahub's kernels read (and engines
    that hold deltas in their own tensors, such as the vLLM plug-in).

    Attributes:
        packed: P tensors int32 ``[N, ceil(K/32)]`` (sign layout v1).
        scales: P tensors fp32 ``[R, C]``: ``R`` is 1 (one scale for all rows) or N; ``C`` is 1 or
            ``ceil(K/group)``.
        group: columns per scale group when ``C > 1``, else None.
    """

    packed: list[Tensor]
    scales: list[Tensor]
    group: int | None

    @property
    def layout(self) -> PlanesLayout:
        return PlanesLayout(len(self.packed), int(self.scales[0].shape[1]), self.group)


@dataclass
class Encoded:
    """What :meth:`TensorCodec.encode` gives back for one tensor.

    Attributes:
        parts: part name → tensor to store (contiguous CPU tensor; its raw bytes become one object).
            The keys are exactly the codec's ``part_names``.
        params: JSON-serializable parameters written into the manifest record (e.g. ``{"scale": s}``).
        rel_recon_error: ``‖Δ − Δ̂‖ / ‖Δ‖`` (0 for exact codecs), or None when not defined.
        rel_delta_norm: ``‖Δ‖ / ‖W_base‖``, or None when not defined.
    """

    parts: dict[str, Tensor]
    params: dict[str, JSONValue] = field(default_factory=dict)
    rel_recon_error: float | None = None
    rel_delta_norm: float | None = None


class TensorCodec:
    """One way of storing a tensor of a delta (or a base). Subclass, set the class attributes,
    implement the methods, and register an instance (:func:`deltahub.codec.registry.register`)."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    part_names: ClassVar[tuple[str, ...]] = ()
    uses_base: ClassVar[bool] = True
    """Decoding reads the base tensor of the same name (the delta manifest pins its hash)."""
    compressible: ClassVar[bool] = False
    """Parts are worth trying zstd on (float tensors); packed bits are not."""
    trainable_params: ClassVar[tuple[str, ...]] = ()
    """Parameters that calibration may train (fp32 scalars), e.g. ``("scale",)``."""
    stores_delta: ClassVar[bool] = True
    """It stores a delta to the base (``sign1``, planes, ...); false for ``same`` and ``dense``."""
    checks_finite: ClassVar[bool] = False
    """``encode`` itself refuses NaN/Inf (:class:`NonFiniteDeltaError`); otherwise compress checks
    the fine-tune's tensor first (the one NaN/Inf rule, unless ``allow_nonfinite``)."""
    progressive: ClassVar[bool] = False
    """Its parts are ordered planes: any prefix is a valid, coarser tensor (:meth:`prefix`)."""

    def parts_for(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        """The parts a tensor with these (checked) parameters stores. Default: ``part_names``."""
        return self.part_names

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse settings ``encode`` would refuse, before anything is written (:class:`CodecError`).
        Default: the codec takes no options."""
        if options:
            raise CodecError(f"codec {self.name} takes no options, got {', '.join(sorted(options))}")

    def equivalent(self, options: Mapping[str, Any]) -> str | None:
        """Another codec that stores exactly what this one would with ``options`` (compress then
        uses it: e.g. one plane with a per-matrix scale is ``sign1``), or None."""
        return None

    def planes(self, params: Mapping[str, JSONValue]) -> int:
        """How many planes the tensor stores (1 for a codec that is not progressive)."""
        return 1

    def part_plane(self, part: str) -> int:
        """The plane a part belongs to (0-based; 0 for a codec that is not progressive): the Hub
        layout puts later planes in later files, so a prefix of planes is a prefix of files."""
        return 0

    def prefix(self, params: Mapping[str, JSONValue], parts: Mapping[str, str], bits: int
               ) -> tuple[dict[str, JSONValue], dict[str, str]]:
        """The parameters and parts of the first ``bits`` planes (a coarser valid tensor). Codecs that
        are not progressive return what they are given."""
        return dict(params), dict(parts)

    # ------------------------------------------------------------------------------- encoding
    def accepts(self, shape: tuple[int, ...], dtype: torch.dtype, base_shape: tuple[int, ...] | None,
                base_dtype: torch.dtype | None) -> bool:
        """Whether this codec can store a fine-tune tensor ``dtype shape`` against a base tensor
        (``None``: the base lacks it). Default: a 2-D floating matrix with the base's shape."""
        return (
            base_shape is not None
            and base_dtype is not None
            and len(shape) == 2
            and tuple(shape) == tuple(base_shape)
            and dtype.is_floating_point
            and base_dtype.is_floating_point
        )

    def encode(self, base: Tensor | None, finetuned: Tensor, **options: Any) -> Encoded:
        """Encode one tensor. ``base`` is the base tensor (``None`` when ``uses_base`` is false);
        ``options``: the codec's own settings given to compress (e.g. planes and scale granularity).
        Raises :class:`CodecError` (or :class:`NonFiniteDeltaError`) on input it cannot store."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- reading
    def check_params(self, params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> dict[str, JSONValue]:
        """Validate the parameters read from a manifest (input: never trusted). Returns a copy.
        Default: no parameters."""
        if params:
            raise CodecError(f"{self.name} takes no parameters, got {sorted(params)}")
        return {}

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype,
                   params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        """The stored layout of every part of a tensor ``dtype shape``."""
        raise NotImplementedError

    def stored_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, JSONValue]) -> int:
        """Bytes of the parts (before zstd) of a tensor ``dtype shape``."""
        return sum(spec.nbytes for spec in self.part_specs(shape, dtype, params).values())

    def decode(self, base: Tensor | None, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """Rebuild the tensor exactly, in ``out_dtype`` (into ``out`` when given; a new tensor
        otherwise: inputs may be read-only views of memory-mapped objects)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- inference
    def operator(self, parts: Mapping[str, Tensor], params: Mapping[str, JSONValue],
                 shape: tuple[int, ...]) -> DeltaOperator | None:
        """The inference apply of a tensor's delta (``None``: the codec has no delta to apply;
        its tensor is used as decoded)."""
        return None

    def planes_layout(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> PlanesLayout | None:
        """The :class:`PlanesLayout` of this tensor's :meth:`DeltaOperator.bit_planes`, from its shape
        and parameters only (``None``: the codec's delta is not sign planes)."""
        return None

    def with_params(self, params: Mapping[str, JSONValue], updates: Mapping[str, float]) -> dict[str, JSONValue]:
        """``params`` with trained values of ``trainable_params`` (rounded to fp32, finite)."""
        out = dict(params)
        for key, value in updates.items():
            if key not in self.trainable_params:
                raise CodecError(f"{self.name} has no trainable parameter {key!r}")
            v = float(torch.tensor(float(value), dtype=torch.float32))
            if not math.isfinite(v):
                raise CodecError(f"{self.name}: trained {key} is not finite")
            out[key] = v
        return out

    def trainable_parts(self, params: Mapping[str, JSONValue]) -> tuple[str, ...]:
        """The parts of a tensor with these (checked) parameters that are **scale tensors** calibration
        may train (fp32, non-negative; e.g. ``planes``: ``scales0 .. scales{k-1}``). Their operator
        (:meth:`operator`) holds each as an fp32 ``nn.Parameter`` of the part's shape, named like the
        part and listed in :attr:`DeltaOperator.trainable_names`. Calibration writes the trained
        tensors as new objects (:meth:`trained_parts`); every other part stays the same object.
        Default: none."""
        return ()

    def trained_parts(self, shape: tuple[int, ...], dtype: torch.dtype, params: Mapping[str, JSONValue],
                      updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Trained values of :meth:`trainable_parts`, checked and ready to store: fp32, contiguous, on
        the CPU, each of the part's layout (:meth:`part_specs`), finite and non-negative.

        Raises:
            CodecError: a part that is not trainable, a wrong shape, or a NaN/Inf/negative value.
        """
        allowed = set(self.trainable_parts(params))
        specs = self.part_specs(shape, dtype, params)
        out: dict[str, Tensor] = {}
        for part, value in updates.items():
            if part not in allowed:
                raise CodecError(f"{self.name} has no trainable part {part!r}")
            t = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
            spec = specs[part]
            if spec.dtype != torch.float32 or tuple(t.shape) != tuple(spec.shape):
                raise CodecError(f"{self.name}: trained {part} is {list(t.shape)}, its layout is "
                                 f"{spec.dtype} {list(spec.shape)}")
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                raise CodecError(f"{self.name}: trained {part} holds {int(bad.sum())} non-finite value(s)")
            if bool((t < 0).any()):
                raise CodecError(f"{self.name}: trained {part} holds {int((t < 0).sum())} negative scale(s)")
            out[part] = t.clone()
        return out

    def rescaled_error(self, params: Mapping[str, JSONValue], initial: Mapping[str, JSONValue],
                       known: Mapping[str, JSONValue], known_error: float | None) -> float | None:
        """``‖Δ − Δ̂‖ / ‖Δ‖`` at trained ``params``, from the error ``known_error`` at parameters
        ``known`` and the encoder's ``initial`` ones, without reading the tensor; None when the
        codec cannot tell (statistics then show no error for calibrated tensors)."""
        return None

    def __repr__(self) -> str:
        return f"<codec {self.name} v{self.version}>"


def as_output(t: Tensor, out_dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``t`` in ``out_dtype``: copied into ``out`` when given (the conversion rounds like ``.to()``),
    else a new tensor (inputs may be read-only views of memory-mapped objects)."""
    if out is not None:
        out.copy_(t)
        return out
    return t.to(out_dtype) if t.dtype != out_dtype else t.clone()


class DeltaOperator(nn.Module):
    """``Δ`` ``[N, K]`` of one tensor, applied without building it (a codec's inference apply).

    Floating parameters of an operator (scales) stay fp32 through ``.to(dtype)``/``.half()``; the
    parameters named in :attr:`trainable_names` (the codec's ``trainable_params``, 0-d, and its
    ``trainable_parts``, tensors) are what calibration trains.
    """

    trainable_names: tuple[str, ...] = ()

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    # ---- the torch path (required)
    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        """``x·Δᵀ``: ``x2d`` ``[M, K]`` → ``[M, N]`` in ``x2d``'s dtype; differentiable in ``x`` and
        the trainable parameters. ``kernels``: the ``deltahub.kernels`` module when the runtime
        runs Triton kernels on ``x``'s device (the codec may use it), else ``None``."""
        raise NotImplementedError

    def rows(self, index: Tensor) -> Tensor:
        """``Δ[index]`` in fp32, ``[len(index), K]`` (embedding lookups)."""
        raise NotImplementedError

    # ---- optional
    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """Kernel hook: ``x·(W + Δ)ᵀ + bias`` in one fused call, or ``None`` (no kernel: the runtime
        uses ``F.linear`` plus :meth:`matmul`)."""
        return None

    def bit_planes(self) -> BitPlanes | None:
        """This delta as sign planes and scales (views, no copy), or ``None`` when the codec keeps it
        otherwise (then use :meth:`matmul` or :meth:`dense`)."""
        return None

    def transposed(self) -> DeltaOperator:
        """The operator of ``Δᵀ`` (GPT-2 ``Conv1D`` stores its weight ``[in, out]``). Default: a
        dense copy of ``Δᵀ`` built row block by row block."""
        return DenseDeltaOperator(self.dense().t().contiguous())

    def dense(self) -> Tensor:
        """The whole ``Δ`` in fp32 ``[N, K]`` (for modules that cannot apply it on the fly)."""
        return self.rows(torch.arange(self.out_features, device=self._device()))

    def trainable(self) -> dict[str, nn.Parameter]:
        """Name → the trainable parameters of this operator: 0-d fp32 for a codec's
        ``trainable_params``, fp32 of the part's shape for its ``trainable_parts`` (same names)."""
        return {n: getattr(self, n) for n in self.trainable_names}

    @classmethod
    def stack(cls, ops: Mapping[int, DeltaOperator], n_tenants: int) -> TenantDeltas:
        """Several tenants' operators of one weight, for multi-tenant serving. Default: the generic
        :class:`LoopedTenantDeltas` (each tenant's rows through its own :meth:`matmul`)."""
        return LoopedTenantDeltas(ops)

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # type: ignore[override]
        keep = {n: p.data for n, p in self._parameters.items() if p is not None and p.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for n, before in keep.items():
            p = self._parameters[n]
            if p is not None and p.dtype != torch.float32:
                p.data = before.to(device=p.device, dtype=torch.float32)
        return out


class DenseDeltaOperator(DeltaOperator):
    """A delta held in full (fp32 ``[N, K]``): the fallback of :meth:`DeltaOperator.transposed`."""

    def __init__(self, delta: Tensor) -> None:
        super().__init__(delta.shape[0], delta.shape[1])
        self.register_buffer("delta", delta.to(torch.float32))

    def matmul(self, x2d: Tensor, kernels: Any = None) -> Tensor:
        return (x2d.to(torch.float32) @ self.delta.t()).to(x2d.dtype)

    def rows(self, index: Tensor) -> Tensor:
        return self.delta.index_select(0, index)

    def transposed(self) -> DeltaOperator:
        return DenseDeltaOperator(self.delta.t().contiguous())


class TenantDeltas(nn.Module):
    """The deltas of one weight ``[N, K]`` for several tenants (multi-tenant serving).

    ``tenants``: the tenant ids held (sorted). :meth:`add_matmul` adds ``x[r]·Δ_tᵀ`` to ``y[r]`` for
    the rows ``r`` of every held tenant ``t``; :meth:`kernel_linear` is the fused kernel hook
    (``None``: not available).
    """

    tenants: list[int]

    def add_matmul(self, y: Tensor, x2d: Tensor, groups: list[tuple[int, Tensor]]) -> None:
        raise NotImplementedError

    def kernel_linear(self, kernels: Any, x2d: Tensor, weight: Tensor, row_tenant: Tensor) -> Tensor | None:
        return None

    def rows(self, tenant: int, index: Tensor) -> Tensor:
        """``Δ_t[index]`` fp32 ``[len(index), K]``."""
        raise NotImplementedError


class PackedTenantDeltas(TenantDeltas):
    """Tenants' packed signs and scales stacked in buffers, with a slot table: ``packed`` and
    ``scales`` (leading dimension: the tenants held, in id order), ``slot`` int64 ``[T]`` (tenant →
    index into them, ``-1`` for tenants not held) and its host copy (no device sync per forward)."""

    def __init__(self, packed: Tensor, scales: Tensor, slot: Tensor, k: int) -> None:
        super().__init__()
        self.in_features = int(k)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("slot", slot)
        self._slots: list[int] = slot.tolist()
        self.tenants = [t for t, s in enumerate(self._slots) if s >= 0]

    @staticmethod
    def slots(tenants: list[int], n_tenants: int) -> Tensor:
        """int64 ``[n_tenants]``: ``tenants[i]`` → ``i``, every other tenant → ``-1``."""
        slot = torch.full((n_tenants,), -1, dtype=torch.int64)
        for i, t in enumerate(tenants):
            slot[t] = i
        return slot


class LoopedTenantDeltas(TenantDeltas):
    """Generic: each tenant's rows go through its own operator's :meth:`DeltaOperator.matmul`."""

    def __init__(self, ops: Mapping[int, DeltaOperator]) -> None:
        super().__init__()
        self.tenants = sorted(ops)
        self.ops = nn.ModuleDict({str(t): ops[t] for t in self.tenants})

    def add_matmul(self, y: Tensor, x2d: Tensor, groups: list[tuple[int, Tensor]]) -> None:
        for t, rows in groups:
            op = self.ops[str(t)] if str(t) in self.ops else None
            if op is None or rows.numel() == 0:
                continue
            z = op.matmul(x2d.index_select(0, rows))
            y.index_add_(0, rows, z.to(y.dtype))

    def rows(self, tenant: int, index: Tensor) -> Tensor:
        return self.ops[str(tenant)].rows(index)
