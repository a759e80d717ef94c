"""Rebuilding a stored model's tensors one at a time (shared by ``materialize`` and ``load_model``).

For a delta, tensor ``name`` in output dtype ``D`` is:

* ``same``:  ``W_base.to(D)``
* ``dense``: ``W_ft.to(D)``
* ``sign1``: ``(W_base.to(float32) + scale * S).to(D)``, S ∈ {−1, +1} from the packed bits
  (see :func:`deltahub.codec.decode_sign1`); exact and deterministic.

Non-floating tensors keep their own dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltahub.codec import Codec, decode_sign1, packed_shape
from deltahub.errors import CorruptObjectError
from deltahub.formats import safe_json
from deltahub.formats.manifest import Manifest, ModelKind, TensorRecord
from deltahub.formats.safetensors_io import TensorSpec, dtype_from_name, dtype_name
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.prefetch import prefetched

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """A resolved model (base or delta, with its base) ready to produce tensors."""

    ctx: StoreContext
    resolved: Resolved
    base: Manifest | None
    verify: bool = True

    @classmethod
    def open(cls, ctx: StoreContext, name: str, verify: bool = True) -> ModelSource:
        resolved = ctx.resolve(name)
        base = None
        if resolved.manifest.kind is ModelKind.DELTA:
            _base_id, base = ctx.base_of(resolved.manifest)
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

    def _inputs(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Read (and hash-verify) what tensor ``name`` is rebuilt from: (stored object, base tensor)."""
        rec = self.manifest.tensors[name]
        if rec.codec is Codec.DENSE:
            assert rec.object is not None
            return self.ctx.read_tensor(rec.object, rec.dtype, rec.shape, verify=self.verify, owned=False), None
        if rec.codec is Codec.SAME:
            return None, self._base_tensor(name)
        if rec.codec is Codec.SIGN1:
            assert rec.object is not None
            n, k = rec.shape
            packed = self.ctx.read_tensor(rec.object, "int32", packed_shape(n, k), verify=self.verify, owned=False)
            return packed, self._base_tensor(name)
        raise CorruptObjectError(f"tensor {name!r} has codec {rec.codec}", "run `deltahub verify`")

    def _finish(
        self,
        name: str,
        inputs: tuple[torch.Tensor | None, torch.Tensor | None],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        rec = self.manifest.tensors[name]
        stored, base = inputs
        if rec.codec is Codec.SIGN1:
            assert stored is not None and base is not None and rec.scale is not None
            return decode_sign1(base, stored, rec.scale, out_dtype)
        t = stored if stored is not None else base
        assert t is not None
        # Inputs may be read-only views of memory-mapped objects: always hand out a new tensor.
        return t.to(out_dtype) if t.dtype != out_dtype else t.clone()

    def _input_bytes(self, spec: TensorSpec) -> int:
        """Bytes read to rebuild ``spec`` (base tensor + stored object), for the prefetch budget."""
        rec = self.manifest.tensors[spec.name]
        own = math.prod(rec.shape) * dtype_from_name(rec.dtype).itemsize
        if rec.codec is Codec.DENSE or self.base is None:
            return own
        brec = self.base.tensors[spec.name]
        return math.prod(brec.shape) * dtype_from_name(brec.dtype).itemsize + own // 16

    def fill(self, name: str, inputs: tuple[torch.Tensor | None, torch.Tensor | None], out: torch.Tensor) -> None:
        """Rebuild tensor ``name`` from its read ``inputs`` straight into ``out`` (its dtype)."""
        rec = self.manifest.tensors[name]
        stored, base = inputs
        if rec.codec is Codec.SIGN1:
            assert stored is not None and base is not None and rec.scale is not None
            decode_sign1(base, stored, rec.scale, out.dtype, out=out)
            return
        src = stored if stored is not None else base
        assert src is not None
        out.copy_(src)  # the dtype conversion rounds exactly like .to()

    def iter_inputs(self, specs: list[TensorSpec]) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
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
