"""Rebuilding a stored model's tensors one at a time (shared by ``materialize`` and ``load_model``).

For a delta, tensor ``name`` in output dtype ``D`` is its codec's exact decode
(:meth:`deltahub.codec.TensorCodec.decode`) of the parts stored for it and, when the codec
``uses_base``, the base tensor of the same name; e.g. ``same``: ``W_base.to(D)``, ``dense``:
``W_ft.to(D)``, ``sign1``: ``(W_base.to(float32) + scale * S).to(D)``. Every part and base tensor is
hash-verified as it is read. Non-floating tensors keep their own dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltahub.codec import CodecError
from deltahub.errors import CorruptObjectError
from deltahub.formats import safe_json
from deltahub.formats.manifest import Manifest, ModelKind, TensorRecord
from deltahub.formats.safetensors_io import TensorSpec, dtype_from_name, dtype_name
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.prefetch import prefetched

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What one tensor is rebuilt from: its stored parts and (codecs that use it) the base tensor.
    ``name`` says whose they are, so inputs can never be applied to another tensor."""

    name: str
    parts: dict[str, torch.Tensor]
    base: torch.Tensor | None


@dataclass
class ModelSource:
    """A resolved model (base or delta, with its base) ready to produce tensors."""

    ctx: StoreContext
    resolved: Resolved
    base: Manifest | None
    verify: bool = True

    @classmethod
    def open(cls, ctx: StoreContext, name: str, verify: bool = True, bits: int | None = None,
             max_size: int | None = None) -> ModelSource:
        """``name`` resolved (with its base). ``bits``: read only the first ``bits`` planes of every
        progressive tensor (:meth:`Manifest.at_bits`); ``max_size``: the best prefix of the stored
        plane order whose tensor data fits that many bytes (:meth:`Manifest.at_size`)."""
        resolved = ctx.resolve(name)
        base = None
        if resolved.manifest.kind is ModelKind.DELTA:
            _base_id, base = ctx.base_of(resolved.manifest)
        if bits is not None or max_size is not None:
            resolved = Resolved(resolved.name, resolved.manifest_id,
                                resolved.manifest.select(bits, max_size, resolved.name))
        return cls(ctx, resolved, base, verify)

    @property
    def manifest(self) -> Manifest:
        return self.resolved.manifest

    def default_dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest.dtype)

    def output_dtype(self, rec: TensorRecord, dtype: torch.dtype | None) -> torch.dtype:
        """``dtype`` for floating tensors when given; otherwise every tensor keeps its own dtype
        (models that keep some tensors in fp32 on purpose stay exactly as they were)."""
        own = dtype_from_name(rec.dtype)
        if not own.is_floating_point or dtype is None:
            return own
        return dtype

    def specs(self, dtype: torch.dtype | None) -> list[TensorSpec]:
        return [
            TensorSpec(name, self.output_dtype(rec, dtype), rec.shape)
            for name, rec in sorted(self.manifest.tensors.items())
        ]

    def _base_tensor(self, name: str) -> torch.Tensor:
        assert self.base is not None
        brec = self.base.tensors[name]
        assert brec.object is not None
        return self.ctx.read_tensor(brec.object, brec.dtype, brec.shape, verify=self.verify, owned=False)

    def parts(self, rec: TensorRecord, owned: bool = False) -> dict[str, torch.Tensor]:
        """The stored parts of ``rec`` (part name → tensor, laid out as its codec says), each
        hash-verified when this source verifies. ``owned``: writable copies, else read-only views."""
        specs = rec.impl.part_specs(rec.shape, dtype_from_name(rec.dtype), rec.params)
        return {
            part: self.ctx.read_tensor(oid, dtype_name(specs[part].dtype), specs[part].shape, verify=self.verify, owned=owned)
            for part, oid in rec.parts.items()
        }

    def _inputs(self, name: str) -> Inputs:
        """Read (and hash-verify) what tensor ``name`` is rebuilt from: its parts and, when its
        codec uses it, the base tensor."""
        rec = self.manifest.tensors[name]
        base = self._base_tensor(name) if rec.impl.uses_base and self.base is not None else None
        return Inputs(name, self.parts(rec), base)

    def _decode(self, name: str, inputs: Inputs, out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        rec = self.manifest.tensors[name]
        if inputs.name != name:  # the inputs of another tensor (equal shapes: q/k/v) must never be used
            raise CorruptObjectError(f"tensor {name!r} was given the inputs of {inputs.name!r}", "report this bug")
        try:
            return rec.impl.decode(inputs.base, inputs.parts, rec.params, out_dtype, out=out)
        except CodecError as exc:
            raise CorruptObjectError(f"tensor {name!r} cannot be rebuilt: {exc}", "run `deltahub verify`") from None

    def _finish(self, name: str, inputs: Inputs, out_dtype: torch.dtype) -> torch.Tensor:
        return self._decode(name, inputs, out_dtype)

    def _input_bytes(self, spec: TensorSpec) -> int:
        """Bytes read to rebuild ``spec`` (base tensor + stored parts), for the prefetch budget."""
        rec = self.manifest.tensors[spec.name]
        own = rec.impl.stored_nbytes(rec.shape, dtype_from_name(rec.dtype), rec.params)
        if not rec.impl.uses_base or self.base is None:
            return own
        brec = self.base.tensors[spec.name]
        return math.prod(brec.shape) * dtype_from_name(brec.dtype).itemsize + own

    def fill_new(self, name: str, inputs: Inputs, out_dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` rebuilt from its read ``inputs`` in ``out_dtype`` (a new tensor)."""
        return self._decode(name, inputs, out_dtype)

    def fill(self, name: str, inputs: Inputs, out: torch.Tensor) -> None:
        """Rebuild tensor ``name`` from its read ``inputs`` straight into ``out`` (its dtype)."""
        self._decode(name, inputs, out.dtype, out=out)

    def iter_inputs(self, specs: list[TensorSpec]) -> Iterator[Inputs]:
        """The read, hash-verified inputs of ``specs`` in order, read one tensor ahead."""
        for _spec, inputs in prefetched(specs, lambda spec: self._inputs(spec.name), size=self._input_bytes):
            yield inputs

    def tensor(self, name: str, out_dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` rebuilt in ``out_dtype`` (a new CPU tensor)."""
        return self._finish(name, self._inputs(name), out_dtype)

    def iter_tensors(self, specs: list[TensorSpec]) -> Iterator[torch.Tensor]:
        """Rebuild ``specs`` in order, reading and hash-verifying the next tensor's inputs in a
        background thread while the current one is decoded (file reads, sha256 and torch ops all
        release the GIL). At most two tensors' inputs are in memory at once."""
        for spec, inputs in zip(specs, self.iter_inputs(specs)):
            yield self._finish(spec.name, inputs, spec.dtype)

    def config(self, dtype: torch.dtype | None) -> dict:
        """The model's config.json with the output dtype written in."""
        oid = self.manifest.files.get("config.json")
        if oid is None:
            raise CorruptObjectError("the stored model has no config.json", "re-add the model")
        try:
            config = safe_json.loads(self.ctx.objects.read(oid, verify=self.verify), "the stored config.json")
        except safe_json.JSONInputError as exc:
            raise CorruptObjectError(f"{exc}", "run `deltahub verify`; pull or add the model again") from None
        if not isinstance(config, dict):
            raise CorruptObjectError("the stored config.json is not a JSON object", "run `deltahub verify`")
        name = dtype_name(dtype or self.default_dtype())
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
        return config

    def file_bytes(self, rel: str) -> bytes:
        return bytes(self.ctx.objects.read(self.manifest.files[rel], verify=self.verify))
