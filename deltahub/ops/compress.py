"""``compress``: store a fine-tune as a delta against a stored base.

Per tensor, in name order, the codec (:mod:`deltahub.codec.registry`) is:

* ``same``  – bit-identical to the base tensor (same dtype and bytes): nothing stored;
* the matrix codec (``codec``, default ``sign1``: packed signs of Δ = W_ft − W_base and
  scale = mean(|Δ|) in fp32) – every tensor that codec ``accepts`` (for ``sign1``: 2-D floating
  weight matrices of the base's shape), embeddings and the LM head too unless ``embeddings="dense"``;
* the embeddings codec (``embeddings="rowsparse"``: ``rowsparse``, unchanged rows free, changed rows
  as signs + a scale per row, added tokens dense) – embeddings and the LM head, a resized vocabulary
  included;
* ``dense`` – everything else (1-D tensors, non-float tensors, embeddings with ``"dense"``, a resized
  vocabulary the embeddings codec does not take, tensors the base does not have): the fine-tuned
  tensor itself.

Everything that can be checked (architecture, tensor names, shapes) is checked before the first
object is written.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub import codec as codecs
from deltahub import defaults
from deltahub.codec import PACKING_V1, CodecError, Encoded, NonFiniteDeltaError, TensorCodec
from deltahub.errors import CodecError as DeltaCodecError
from deltahub.errors import IncompatibleBaseError, InputError
from deltahub.formats.checkpoint import Checkpoint, open_checkpoint
from deltahub.formats.manifest import BaseRef, Manifest, ModelKind, TensorRecord
from deltahub.formats.paths import validate_name
from deltahub.formats.safetensors_io import dtype_from_name, dtype_name, tensor_bytes
from deltahub.hub.source import resolve_source
from deltahub.ops.budget import Budget, Measured, SensitivityOptions, allocate, budget_codec, measure_finetune
from deltahub.ops.context import Resolved, StoreContext, TensorStat, fp16_bytes
from deltahub.ops.files import store_files
from deltahub.ops.finite import ALLOW_HINT, check_finite, nonfinite_summary
from deltahub.ops.prefetch import prefetched
from deltahub.progress import progress_bar
from deltahub.store import Compression, ObjectInfo

logger = logging.getLogger(__name__)

EMBEDDING_NAME_RE = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|lm_head|word_embeddings|"
    r"position_embeddings|token_type_embeddings|shared|embeddings)(\.|$)"
)


class EmbeddingsMode(str, enum.Enum):
    """How token/position embeddings and the LM head are stored: ``dense``, or with the matrix codec
    (``sign1`` is kept as the name of that choice: it is what every release before codecs meant)."""

    DENSE = "dense"
    ROWSPARSE = "rowsparse"
    SIGN1 = "sign1"

    def codec(self, matrix: TensorCodec) -> TensorCodec:
        """The codec this mode stores an embedding with, given the delta's matrix codec."""
        return {EmbeddingsMode.DENSE: codecs.DENSE, EmbeddingsMode.ROWSPARSE: codecs.ROWSPARSE}.get(self, matrix)


#: Measured on SmolLM2-135M + a Shakespeare fine-tune (docs/design.md): sign1 embeddings keep
#: 94% of the fine-tune's perplexity gain at 15.3x smaller, dense ones 96% at 2.3x.
DEFAULT_EMBEDDINGS = EmbeddingsMode(defaults.DEFAULT_EMBEDDINGS)
#: The codec of a delta's matrices (any registered codec that stores a delta).
DEFAULT_CODEC = defaults.DEFAULT_CODEC


@dataclass
class CompressResult:
    name: str
    manifest_id: str
    base_name: str
    codecs: dict[str, int] = field(default_factory=dict)
    stored_bytes: int = 0
    fp16_bytes: int = 0
    hub_repo_id: str | None = None  # set when the fine-tune was fetched from the Hub (REPO_ID[@REVISION])
    hub_revision: str | None = None  # the commit id it was downloaded at
    calibration: Any = None  # with --calibrate: the deltahub.ops.calibrate.CalibrateResult

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.stored_bytes if self.stored_bytes else math.inf


def parse_embeddings(mode: EmbeddingsMode | str) -> EmbeddingsMode:
    """``mode`` as an :class:`EmbeddingsMode`; an :class:`InputError` naming the choices otherwise."""
    try:
        return EmbeddingsMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in EmbeddingsMode)
        raise InputError(f"unknown embeddings mode {mode!r}", f"use one of {choices}") from None


def is_embedding(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """Token/position embeddings and LM heads, by name or by a leading vocabulary dimension."""
    if EMBEDDING_NAME_RE.search(name.removesuffix(".weight")):
        return True
    return bool(vocab_size) and len(shape) == 2 and shape[0] == vocab_size


def matrix_codec(name: str, options: dict[str, Any] | None = None) -> tuple[TensorCodec, dict[str, Any]]:
    """The registered codec ``name`` (with its ``options``) as the codec of a delta's matrices (it
    must store deltas); a codec equivalent to it for these options is used instead (one plane with a
    per-matrix scale is ``sign1``)."""
    options = dict(options or {})
    try:
        impl = codecs.get(name)
        impl.check_options(options)
        alias = impl.equivalent(options)
        if alias is not None:
            impl, options = codecs.get(alias), {}
    except CodecError as exc:
        raise InputError(str(exc), "pick one of the codecs listed, or register yours first") from None
    if not impl.stores_delta:
        raise InputError(f"codec {name!r} does not store a delta", f"use --codec {codecs.SIGN1.name} or another delta codec")
    return impl, options


def plan_codecs(
    ft: Checkpoint, base: Resolved, embeddings: EmbeddingsMode, matrix: TensorCodec | None = None
) -> dict[str, TensorCodec]:
    """The codec each fine-tune tensor *may* use (``same`` is decided later, from the bytes).

    Raises :class:`IncompatibleBaseError` when the fine-tune does not fit the base.
    """
    bman = base.manifest
    if (ft.model_type and bman.model_type and ft.model_type != bman.model_type) or (
        ft.architectures and bman.architectures and ft.architectures != bman.architectures
    ):
        raise IncompatibleBaseError(
            f"the fine-tune is a {ft.model_type or '?'} model ({', '.join(ft.architectures) or '?'}) "
            f"but base {base.name!r} is {bman.model_type or '?'} ({', '.join(bman.architectures) or '?'})",
            "compress against the base model this was fine-tuned from",
        )
    missing = sorted(set(bman.tensors) - set(ft.tensors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise IncompatibleBaseError(
            f"the fine-tune lacks {len(missing)} tensor(s) of base {base.name!r}: "
            f"{', '.join(missing[:3])}{more}",
            "check that this is a complete checkpoint fine-tuned from that base",
        )
    matrix = matrix or codecs.SIGN1
    emb_codec = embeddings.codec(matrix)
    vocab = ft.config.get("vocab_size")
    plan: dict[str, TensorCodec] = {}
    for name in sorted(ft.tensors):
        shape = ft.shape(name)
        rec = bman.tensors.get(name)
        if rec is None:
            plan[name] = codecs.DENSE  # a tensor the base does not have
            continue
        embedding = is_embedding(name, shape, vocab)
        if rec.shape != shape:
            resized_vocab = len(shape) == len(rec.shape) >= 1 and shape[1:] == rec.shape[1:] and embedding
            if not resized_vocab:
                raise IncompatibleBaseError(
                    f"tensor {name!r} has shape {list(shape)} in the fine-tune but {list(rec.shape)} "
                    f"in base {base.name!r}",
                    "compress against the base model this was fine-tuned from",
                )
        impl = emb_codec if embedding else matrix
        fits = impl.accepts(shape, ft.dtype(name), rec.shape, dtype_from_name(rec.dtype))
        plan[name] = impl if fits else codecs.DENSE
    return plan


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a8, b8 = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    # A fine-tuned matrix differs within its first bytes: a full scan (both tensors, every byte)
    # is left for those that do not.
    head = min(a8.numel(), 1 << 12)
    return torch.equal(a8[:head], b8[:head]) and torch.equal(a8, b8)


def _rel_norm(ft: torch.Tensor, base: torch.Tensor) -> float | None:
    """‖W_ft − W_base‖ / ‖W_base‖ in fp32 chunks (a statistic: fp32 dot products suffice)."""
    delta_sq = 0.0
    base_sq = 0.0
    flat_ft, flat_base = ft.reshape(-1), base.reshape(-1)
    step = 1 << 22
    for start in range(0, flat_ft.numel(), step):
        b = flat_base[start : start + step].float()
        d = flat_ft[start : start + step].float() - b
        delta_sq += float(torch.dot(d, d))
        base_sq += float(torch.dot(b, b))
    if base_sq == 0.0:
        return 0.0 if delta_sq == 0.0 else None  # undefined against an all-zero base (e.g. biases)
    return math.sqrt(delta_sq / base_sq)


def _encode_delta(impl: TensorCodec, tname: str, base_t: torch.Tensor, tensor: torch.Tensor, allow_nonfinite: bool,
                  options: dict[str, Any] | None = None):
    """``impl.encode``, or None for a non-finite delta when ``allow_nonfinite`` (stored dense then)."""
    try:
        return impl.encode(base_t, tensor, **(options or {}))
    except CodecError as exc:
        if not isinstance(exc, NonFiniteDeltaError):
            raise DeltaCodecError(f"cannot compress tensor {tname!r}: {exc}") from None
        if allow_nonfinite:
            logger.info("tensor %s: the delta is not finite; stored dense", tname)
            return None
        problem = nonfinite_summary(tensor)
        if problem is not None:
            raise DeltaCodecError(f"tensor {tname!r} of the fine-tune holds {problem}", ALLOW_HINT) from None
        raise DeltaCodecError(
            f"cannot compress tensor {tname!r}: {exc} (the base tensor holds "
            f"{nonfinite_summary(base_t) or 'values so large that their difference overflows'})",
            ALLOW_HINT,
        ) from None


def _check_encoded(impl: TensorCodec, tname: str, enc: Encoded, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """What ``impl.encode`` gave for tensor ``tname`` must be what the codec reads back (its parts,
    their dtype and shape, parameters its ``check_params`` accepts, JSON-serializable): checked
    before anything of the tensor is written, so a misbehaving codec never publishes a manifest the
    store cannot read."""
    def bad(why: str) -> DeltaCodecError:
        return DeltaCodecError(f"codec {impl.name} gave tensor {tname!r} {why}", "fix or update the codec; nothing of it was stored")

    if not isinstance(enc, Encoded) or not isinstance(enc.parts, dict) or not isinstance(enc.params, dict):
        raise bad(f"a {type(enc).__name__}, not an Encoded")
    try:
        json.dumps(enc.params, allow_nan=False)
        if impl.check_params(enc.params, shape) != enc.params:
            raise CodecError("parameters that do not read back the same")
        specs = impl.part_specs(shape, dtype, enc.params)
        expected = impl.parts_for(shape, enc.params)
    except (CodecError, TypeError, ValueError, OverflowError) as exc:
        raise bad(f"parameters it cannot read back ({exc})") from None
    if set(enc.parts) != set(expected):
        raise bad(f"parts {sorted(map(str, enc.parts))}, expected {sorted(expected)}")
    for part, t in enc.parts.items():
        want = specs[part]
        if not isinstance(t, torch.Tensor) or t.dtype != want.dtype or tuple(t.shape) != want.shape:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise bad(f"part {part!r} as {got}, expected {want.dtype} {list(want.shape)}")


def _encode_tensor(planned: TensorCodec, tname: str, tensor: torch.Tensor, base_t: torch.Tensor | None,
                   allow_nonfinite: bool, options: dict[str, Any] | None) -> tuple[TensorCodec, Encoded]:
    """The codec tensor ``tname`` is stored with and what it encodes to: ``same`` when bit-identical
    to the base, else ``planned`` (with ``options``), else ``dense``; checked (:func:`_check_encoded`)."""
    shape = tuple(tensor.shape)
    chosen: TensorCodec = planned
    enc = None
    if base_t is not None and _bit_identical(tensor, base_t):
        if not allow_nonfinite:
            check_finite(tensor, tname, "the fine-tune")
        chosen = codecs.SAME
        enc = chosen.encode(base_t, tensor)
    elif planned.uses_base:
        assert base_t is not None
        if not allow_nonfinite and not planned.checks_finite:
            check_finite(tensor, tname, "the fine-tune")  # the one NaN/Inf rule, for every codec
        enc = _encode_delta(planned, tname, base_t, tensor, allow_nonfinite, options)
        if enc is None:  # a matrix whose delta is not finite (allowed): stored dense
            chosen = codecs.DENSE
    if enc is None:
        if chosen is planned and not allow_nonfinite:
            check_finite(tensor, tname, "the fine-tune")
        chosen = codecs.DENSE
        enc = chosen.encode(None, tensor)
        if base_t is not None and base_t.shape == tensor.shape and tensor.is_floating_point() and base_t.is_floating_point():
            norm = _rel_norm(tensor, base_t)
            enc.rel_delta_norm = norm if norm is not None and math.isfinite(norm) else None
    _check_encoded(chosen, tname, enc, shape, tensor.dtype)
    return chosen, enc


def compress_finetune(
    ctx: StoreContext,
    src: Path | str,
    base_name: str,
    name: str,
    embeddings: EmbeddingsMode | str = DEFAULT_EMBEDDINGS,
    force: bool = False,
    verify_base: bool = True,
    allow_nonfinite: bool = False,
    codec: str = defaults.DEFAULT_CODEC,
    codec_options: dict[str, Any] | None = None,
    budget: Budget | None = None,
    sensitivity: SensitivityOptions | None = None,
) -> CompressResult:
    """Compress the checkpoint at ``src`` against stored base ``base_name`` and name it ``name``.

    ``budget``: choose the planes of each matrix (codec ``planes``, at most ``budget.max_planes``)
    by its measured sensitivity so that the delta's tensor data fits the budget
    (:mod:`deltahub.ops.budget`), measured on ``sensitivity``'s calibration text; the order in which
    further planes pay is stored, so any smaller budget is a prefix of the result.

    ``src`` that is no local path but a Hub ``REPO_ID[@REVISION]`` is fetched from the Hub like
    ``add`` does (:func:`deltahub.hub.source.resolve_source`: pinned to its commit, no pickles,
    into the HF cache, reused when cached, offline too) and compressed from the snapshot folder.

    NaN/Inf in any floating tensor of the fine-tune, or in a delta, is refused unless
    ``allow_nonfinite`` (:mod:`deltahub.ops.finite`); a refusal mid-way leaves the store unchanged.
    """
    embeddings = parse_embeddings(embeddings)
    if budget is not None:
        budget.check()
        codec, codec_options = budget_codec(codec, codec_options, budget)
    matrix, options = matrix_codec(codec, codec_options)
    validate_name(name)
    source = resolve_source(src)  # a Hub checkpoint is downloaded here, outside the writer lock
    src, hub = source.path, source.hub
    weights = None
    if budget is not None:  # slow (a forward and backward pass per batch): outside the writer lock
        assert matrix is not None
        weights = _budget_weights(ctx, Path(src), base_name, name, force, embeddings, matrix, options,
                                  sensitivity or SensitivityOptions(), budget)
    # The writer lock is taken before the base is resolved, so gc cannot remove the base's objects
    # between the lookup and the reads (gc waits for writers).
    with ctx.writing():
        result = _compress_locked(ctx, Path(src), base_name, name, embeddings, force, verify_base, allow_nonfinite, matrix,
                                  options, budget, weights)
    if hub is not None:
        result.hub_repo_id, result.hub_revision = hub
    return result


def _check_base(base: Resolved, base_name: str) -> None:
    if base.manifest.kind is not ModelKind.BASE:
        raise InputError(
            f"{base_name!r} is a delta, not a base",
            "pass the base model with --base (see `deltahub ls`)",
        )


def _check_budget_floor(ft: Checkpoint, progressive: Sequence[str], matrix: TensorCodec, options: Mapping[str, Any],
                        budget: Budget) -> None:
    """Refuse, before any measuring, a budget below one plane of every matrix (a lower bound of the
    smallest delta: the other tensors, counted later, only add to it)."""
    try:  # the codec's parameters for one plane (they do not depend on the shape), from a tiny encode
        probe = torch.linspace(-1, 1, 256).reshape(1, 256)
        one = dict(matrix.encode(torch.zeros_like(probe), probe, **{**options, "planes": 1}).params)
    except (CodecError, ValueError, TypeError):
        return  # options the codec refuses: refused with its own message when encoded
    floor = 0
    for tname in progressive:
        shape = tuple(ft.shape(tname))
        try:
            floor += matrix.stored_nbytes(shape, ft.dtype(tname), matrix.check_params(one, shape))
        except CodecError:
            continue
    n_params = sum(math.prod(ft.shape(t)) for t in ft.tensors)
    limit = budget.bytes_for(n_params)
    if floor > limit:
        raise InputError(
            f"the budget is {limit} bytes but one plane of every matrix alone needs {floor} "
            f"({8 * floor / n_params:.3f} bits per weight), before the other tensors; nothing was stored",
            f"raise the budget well above --max-size {floor} (--avg-bits {math.ceil(8000 * floor / n_params) / 1000:g}): "
            "the exact minimum is reported once the other tensors are counted",
        )


def _budget_weights(ctx: StoreContext, src: Path, base_name: str, name: str, force: bool, embeddings: EmbeddingsMode,
                    matrix: TensorCodec, options: dict[str, Any] | None, sensitivity: SensitivityOptions,
                    budget: Budget) -> Measured:
    """What a budgeted compress allocates by (:func:`~deltahub.ops.budget.measure_finetune`): the
    Fisher of every tensor and the KL of each role of progressive tensors at 1 … cap planes. The base,
    the name and the fit of the fine-tune are checked first, so a mistake is reported before minutes
    of measuring."""
    with ctx.reading():
        base = ctx.resolve(base_name)
        _check_base(base, base_name)
        ctx.check_name_free(name, force)
        ft_ckpt = open_checkpoint(src)
        plan = plan_codecs(ft_ckpt, base, embeddings, matrix)
    progressive = sorted(n for n, c in plan.items() if c is matrix and c.progressive)
    cap = dict(options or {})
    _check_budget_floor(ft_ckpt, progressive, matrix, cap, budget)

    def prefixes_for(base: Resolved) -> Callable[[str], Callable[[int], torch.Tensor]]:
        ft = open_checkpoint(src)

        def prefixes(tname: str) -> Callable[[int], torch.Tensor]:
            brec = base.manifest.tensors[tname]
            assert brec.object is not None
            with ctx.reading():  # held per tensor (a copy is read), so gc never waits for the passes
                base_t = ctx.read_tensor(brec.object, brec.dtype, brec.shape, verify=False, owned=True)
            chosen, enc = _encode_tensor(matrix, tname, ft.read(tname, copy=False), base_t, True, dict(cap))

            def at(k: int) -> torch.Tensor:
                if not chosen.progressive:  # stored as it is (same / dense)
                    return chosen.decode(base_t, enc.parts, enc.params, torch.float32)
                params, parts = chosen.prefix(enc.params, enc.parts, min(k, chosen.planes(enc.params)))
                return chosen.decode(base_t, parts, params, torch.float32)

            return at

        return prefixes

    return measure_finetune(ctx, src, base_name, sensitivity, progressive, prefixes_for, int(cap.get("planes", 1)))


def _compress_locked(
    ctx: StoreContext,
    src: Path,
    base_name: str,
    name: str,
    embeddings: EmbeddingsMode,
    force: bool,
    verify_base: bool,
    allow_nonfinite: bool = False,
    matrix: TensorCodec | None = None,
    options: dict[str, Any] | None = None,
    budget: Budget | None = None,
    weights: Measured | None = None,
) -> CompressResult:
    base = ctx.resolve(base_name)
    _check_base(base, base_name)
    ft = open_checkpoint(Path(src))
    plan = plan_codecs(ft, base, embeddings, matrix)
    ctx.check_name_free(name, force)

    bman = base.manifest
    records: dict[str, TensorRecord] = {}
    objects: dict[str, ObjectInfo] = {}
    stats: list[TensorStat] = []
    used_base: dict[str, str] = {}
    result = CompressResult(name=name, manifest_id="", base_name=base_name)
    files, file_infos = store_files(ctx, ft)
    objects.update(file_infos)
    with progress_bar(ft.total_bytes(), f"compress {name}", unit="B", unit_scale=True) as bar:
        def load(tname: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            tensor = ft.read(tname, copy=False)
            brec = bman.tensors.get(tname)
            if brec is None or (brec.shape != tuple(tensor.shape) and not plan[tname].uses_base):
                return tensor, None  # (a codec that takes a resized vocabulary reads its base)
            assert brec.object is not None
            return tensor, ctx.read_tensor(brec.object, brec.dtype, brec.shape, verify=verify_base, owned=False)

        def input_bytes(tname: str) -> int:
            brec = bman.tensors.get(tname)
            base_bytes = math.prod(brec.shape) * dtype_from_name(brec.dtype).itemsize if brec else 0
            return ft.tensors[tname][1].nbytes + base_bytes

        tensor_planes: dict[str, int] = {}
        plane_order: list[tuple[str, int]] | None = None
        if budget is not None:
            assert matrix is not None
            bar.set_description(f"measure {name}")
            tensor_planes, plane_order = allocate(
                ft, plan, matrix, options or {}, budget, weights or Measured(),
                prefetched(list(plan), load, size=input_bytes),
                lambda planned, tname, tensor, base_t, opts: _encode_tensor(planned, tname, tensor, base_t, allow_nonfinite, opts),
                bar,
            )
            bar.reset(ft.total_bytes())
            bar.set_description(f"compress {name}")
        for tname, (tensor, base_t) in prefetched(list(plan), load, size=input_bytes):
            planned = plan[tname]
            shape = tuple(tensor.shape)
            dtype = dtype_name(tensor.dtype)
            brec = bman.tensors.get(tname)
            stat = TensorStat(tname, planned.name, dtype, shape, 0)
            tensor_options = None
            if planned is matrix:
                tensor_options = {**(options or {}), "planes": tensor_planes[tname]} if tname in tensor_planes else options
            chosen, enc = _encode_tensor(planned, tname, tensor, base_t, allow_nonfinite, tensor_options)
            parts: dict[str, str] = {}
            for part in sorted(enc.parts):
                info = ctx.put(tensor_bytes(enc.parts[part]), Compression.AUTO if chosen.compressible else Compression.NONE)
                objects[info.sha256] = info
                parts[part] = info.sha256
                stat.stored_bytes += info.stored_size
            records[tname] = TensorRecord(tname, chosen.name, dtype, shape, parts=parts, params=dict(enc.params))
            stat.codec = chosen.name
            stat.scale = records[tname].scale
            stat.rel_delta_norm = enc.rel_delta_norm
            stat.rel_recon_error = enc.rel_recon_error
            if chosen.uses_base:
                assert brec is not None and brec.object is not None
                used_base[tname] = brec.object
            stats.append(stat)
            result.codecs[chosen.name] = result.codecs.get(chosen.name, 0) + 1
            bar.update(tensor.numel() * tensor.element_size())
            del tensor, base_t
    manifest = Manifest(
        kind=ModelKind.DELTA,
        model_type=ft.model_type,
        architectures=ft.architectures,
        dtype=dtype_name(ft.main_dtype()),
        files=files,
        tensors=records,
        base=BaseRef(
            manifest=base.manifest_id,
            tensors=used_base,
        ),
        packing=PACKING_V1,
        plane_order=plane_order,
    )
    manifest_info = ctx.put(manifest.to_bytes(), Compression.AUTO)
    result.manifest_id = ctx.register(manifest, manifest_info, objects, stats, name, force)
    result.stored_bytes = sum(info.stored_size for info in objects.values()) + manifest_info.stored_size
    result.fp16_bytes = fp16_bytes(manifest)
    logger.info("compressed %s against %s: %s", name, base_name, result.codecs)
    return result
