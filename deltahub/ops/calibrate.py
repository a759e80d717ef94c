"""``calibrate`` and ``compress --calibrate``: train a stored delta's scales against its fine-tune.

Order of work (nothing is written before the last step):

1. the delta, its base, its tokenizer and the calibration text are checked and tokenized;
2. the fine-tune (the teacher: a folder, a Hub id or a stored dense model) is checked against the
   delta: same architecture and shapes, and the signs of ``W_ft − W_base`` must agree with the
   stored signs (:func:`check_finetune_matches`);
3. the teacher runs over the samples; its next-token distributions are kept and the teacher freed;
4. the student (the delta loaded in delta mode) trains its scales only — every codec's trainable
   parameters (``sign1``: ``scale``) and trainable scale parts (``planes``: every plane's
   ``scales{i}``, per matrix, row or group) — (:mod:`deltahub.calibrate.distill`), then is freed;
5. the trained scale tensors are checked by their codec (layout, finite, non-negative) and written as
   new objects; a new manifest that differs from the old one only in those scales is written (its
   records point at the new scale objects; signs and every other object are shared, bit-identical),
   then its index rows (manifest, links, per-tensor statistics with the initial scale kept, the
   calibration record) in one transaction, then the name is moved to it — only if it still points
   at the manifest that was calibrated.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub import defaults
from deltahub.calibrate.data import load_samples
from deltahub.calibrate.distill import DistillConfig, calibrate_scales, delta_scales
from deltahub.calibrate.targets import DEFAULT_TOP_K, TeacherTargets, score_model
from deltahub.codec.codecs import CodecError
from deltahub.codec.sign1 import recon_error_at  # noqa: F401  (kept importable from here)
from deltahub.errors import (
    DanglingNameError,
    DeltaHubError,
    IncompatibleBaseError,
    InputError,
    InvalidNameError,
    NameChangedError,
)
from deltahub.formats.checkpoint import open_checkpoint
from deltahub.formats.manifest import Manifest, ModelKind, TensorRecord
from deltahub.formats.safetensors_io import dtype_from_name, tensor_bytes
from deltahub.formats.paths import validate_name
from deltahub.hub.source import resolve_source
from deltahub.index import TensorStat, TensorStatEntry
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.reconstruct import ModelSource
from deltahub.store import Compression, ObjectInfo

logger = logging.getLogger(__name__)

#: Below this share of agreeing signs the fine-tune is not the one the delta was made from
#: (another fine-tune agrees on ~50 %; the right one on 100 %, or nearly when re-saved in bf16).
MIN_SIGN_AGREEMENT = 0.9


@dataclass
class CalibrationOptions:
    """Settings of a calibration (CLI: ``--calib-*``, ``--device``, ``--seed``).

    ``lr`` is relative to each scale (Adam steps of about ``lr·|s₀|``). ``data=None`` uses the bundled
    corpus. Models run in ``dtype`` (fp32 by default, the CPU's fast and exact choice).
    """

    data: Path | None = None
    samples: int = defaults.CALIB_SAMPLES
    seq_len: int = defaults.CALIB_SEQ_LEN
    steps: int = defaults.CALIB_STEPS
    lr: float = defaults.CALIB_LR
    device: str = defaults.DEFAULT_DEVICE
    seed: int = defaults.CALIB_SEED
    batch_size: int = defaults.CALIB_BATCH_SIZE
    top_k: int = DEFAULT_TOP_K
    dtype: torch.dtype = getattr(torch, defaults.COMPUTE_DTYPE)

    def check(self) -> None:
        check_minimums(
            "calibration",
            samples=(self.samples, 1), seq_len=(self.seq_len, 2), steps=(self.steps, 1),
            batch_size=(self.batch_size, 1), top_k=(self.top_k, 1),
        )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"calibration learning rate must be positive, got {self.lr}", "use e.g. 0.01")
        check_device(self.device)


def check_minimums(what: str, **settings: tuple[int, int]) -> None:
    """Refuse the first setting below its minimum (``settings``: name -> ``(value, minimum)``)."""
    for name, (value, low) in settings.items():
        if value < low:
            raise InputError(f"{what} {name} must be at least {low}, got {value}", f"raise {name}")


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here (``cuda`` without a GPU), before any work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {device!r}", "use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available", "use --device cpu")


@dataclass
class CalibrateResult:
    """What :func:`calibrate` did (``manifest_id`` is the calibrated manifest the name now points at).

    ``n_scales``: scale values trained (a ``sign1`` tensor has one, a ``planes`` tensor every element
    of every plane's scale tensor); ``scales``: per key of
    :func:`~deltahub.calibrate.distill.delta_scales` (``tensor`` or ``tensor#part``) its value before
    and after, the mean of the tensor for a scale part."""

    name: str
    manifest_id: str
    previous_manifest_id: str
    teacher: str
    data: str
    samples: int
    seq_len: int
    steps: int
    lr: float
    seed: int
    device: str
    top_k: int | None
    n_scales: int
    loss_before: float
    loss_after: float
    seconds: float
    reverted: bool = False
    scales: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- the fine-tune
@dataclass
class FinetuneRef:
    """Where a fine-tune (teacher / reference) comes from.

    ``kind``: ``"path"`` (a local checkpoint folder, also a downloaded Hub snapshot) or ``"stored"``
    (a model of the store, loaded dense). ``description`` is what the index records.
    """

    kind: str
    description: str
    path: Path | None = None
    name: str | None = None


def resolve_finetune(ctx: StoreContext, spec: str | Path) -> FinetuneRef:
    """A local folder, else a stored model's name, else a Hub ``REPO_ID[@REVISION]`` (downloaded;
    the rule is :func:`deltahub.hub.source.resolve_source`'s)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        open_checkpoint(path)  # config.json, safetensors, no pickles: refused with the fix otherwise
        return FinetuneRef("path", str(path), path=path)
    try:
        validate_name(text)
        is_name = True
    except InvalidNameError:
        is_name = False
    if is_name:
        found = ctx.index.resolve_name(text)
        if found is not None:
            if found.manifest is None:
                raise _dangling(text, found.manifest_id)
            if found.manifest.kind != ModelKind.BASE.value:
                raise InputError(
                    f"{text!r} is a stored delta, not a fine-tune",
                    "give the fine-tune's checkpoint folder or Hub id, or a stored dense copy of it",
                )
            return FinetuneRef("stored", f"stored:{text}", name=text)
    source = resolve_source(spec)
    if source.hub is not None:
        return FinetuneRef("path", source.label, path=source.path)
    raise InputError(
        f"fine-tune {text!r} is neither a checkpoint folder, a stored model nor a Hub repo id",
        "give the folder of the fine-tune (config.json + safetensors) or REPO_ID[@REVISION]",
    )


def _finetune_tensors(ctx: StoreContext, ref: FinetuneRef) -> tuple[str | None, list[str], dict[str, tuple[int, ...]], Any]:
    """(model_type, architectures, shapes, reader) of the fine-tune; ``reader(name)`` gives a tensor."""
    if ref.kind == "path":
        assert ref.path is not None
        ckpt = open_checkpoint(ref.path)
        shapes = {n: ckpt.shape(n) for n in ckpt.tensors}
        return ckpt.model_type, ckpt.architectures, shapes, lambda n: ckpt.read(n, copy=False)
    assert ref.name is not None
    man = ctx.resolve(ref.name).manifest
    shapes = {n: rec.shape for n, rec in man.tensors.items()}

    source = ModelSource(ctx, ctx.resolve(ref.name), None)

    def read(n: str) -> torch.Tensor:
        return source.tensor(n, dtype_from_name(man.tensors[n].dtype))

    return man.model_type, man.architectures, shapes, read


def check_finetune_matches(
    ctx: StoreContext, delta: Resolved, base: Manifest, ref: FinetuneRef, n_checked: int = 2
) -> None:
    """Refuse a fine-tune that is not the one ``delta`` was compressed from.

    Same architecture, every tensor of the delta present with its shape, and on the ``n_checked``
    smallest ``sign1`` tensors the signs of ``W_ft − W_base`` agree with the stored signs on at least
    :data:`MIN_SIGN_AGREEMENT` of the entries.

    Raises:
        IncompatibleBaseError: with the first mismatch found.
    """
    man = delta.manifest
    model_type, archs, shapes, read = _finetune_tensors(ctx, ref)
    hint = f"give the fine-tune that {delta.name!r} was compressed from"
    if (model_type and man.model_type and model_type != man.model_type) or (
        archs and man.architectures and archs != man.architectures
    ):
        raise IncompatibleBaseError(
            f"the fine-tune {ref.description} is a {model_type} model ({', '.join(archs)}) but "
            f"{delta.name!r} is {man.model_type} ({', '.join(man.architectures)})",
            hint,
        )
    for tname, rec in sorted(man.tensors.items()):
        if tname not in shapes:
            raise IncompatibleBaseError(f"the fine-tune {ref.description} has no tensor {tname!r}", hint)
        if tuple(shapes[tname]) != tuple(rec.shape):
            raise IncompatibleBaseError(
                f"tensor {tname!r} is {list(shapes[tname])} in the fine-tune {ref.description} but "
                f"{list(rec.shape)} in {delta.name!r}",
                hint,
            )
    approx = sorted((rec.numel, n) for n, rec in man.tensors.items() if _trainable(rec))
    smallest = {n for _numel, n in approx[:n_checked]}
    source = ModelSource(ctx, delta, base)
    checked = [spec for spec in source.specs(None) if spec.name in smallest]
    for spec, inputs in zip(checked, source.iter_inputs(checked)):  # the stored parts, the base tensor
        tname = spec.name
        rec = man.tensors[tname]
        w_base = inputs.base
        assert w_base is not None
        op = rec.impl.operator(inputs.parts, rec.params, rec.shape)
        if op is not None:  # the stored delta's signs (sign1: exactly S)
            stored = op.dense() >= 0
        else:
            stored = (source.fill_new(tname, inputs, torch.float32) - w_base.to(torch.float32)) >= 0
        mine = (read(tname).to(torch.float32) - w_base.to(torch.float32)) >= 0
        agree = float((stored == mine).float().mean())
        if agree < MIN_SIGN_AGREEMENT:
            raise IncompatibleBaseError(
                f"the fine-tune {ref.description} is not the one {delta.name!r} was compressed from: the "
                f"signs of its change to {tname!r} agree with the stored ones on {agree:.0%} of the entries",
                hint,
            )


def load_finetune_model(ctx: StoreContext, ref: FinetuneRef, dtype: torch.dtype, device: str) -> Any:
    """The fine-tune as a transformers model (safetensors only, never remote code), in eval mode."""
    from deltahub.ops.load import load_model, model_class

    if ref.kind == "stored":
        assert ref.name is not None
        return load_model(ctx, ref.name, dtype=dtype, device=device)
    assert ref.path is not None
    ckpt = open_checkpoint(ref.path)
    cls = model_class(ckpt.architectures)
    model = cls.from_pretrained(str(ref.path), dtype=dtype, use_safetensors=True, local_files_only=True)
    model.eval()
    return model.to(device)


# ------------------------------------------------------------------------------- calibration
def _dangling(name: str, manifest_id: str) -> DanglingNameError:
    return DanglingNameError(
        f"{name!r} points at manifest {manifest_id[:12]}, which the store's index does not hold",
        f"run `deltahub verify`; `deltahub rm {name}` removes the dangling name",
    )


def _delta_of(ctx: StoreContext, name: str) -> tuple[Resolved, Manifest]:
    found = ctx.index.resolve_name(name)
    if found is not None and found.manifest is None:  # refused before any work, not when publishing
        raise _dangling(name, found.manifest_id)
    resolved = ctx.resolve(name)
    if resolved.manifest.kind is not ModelKind.DELTA:
        raise InputError(f"{name!r} is a base model: only deltas have scales to calibrate", "give a delta's name")
    if not any(_trainable(rec) for rec in resolved.manifest.tensors.values()):
        raise InputError(f"{name!r} has no tensor with scales: nothing to calibrate", "compress it with sign1 (or another codec with scales)")
    _base_id, base = ctx.base_of(resolved.manifest)
    return resolved, base


def teacher_targets(
    ctx: StoreContext, ref: FinetuneRef, tokens: torch.Tensor, options: CalibrationOptions
) -> TeacherTargets:
    """The fine-tune's next-token distributions on ``tokens`` (the model is freed on return)."""
    stats = score_model(
        lambda: load_finetune_model(ctx, ref, options.dtype, options.device),
        tokens,
        options.batch_size,
        options.device,
        keep_top_k=options.top_k,
        desc="teacher",
    )
    assert stats.targets is not None
    return stats.targets


def calibrate(
    ctx: StoreContext,
    name: str,
    finetune: str | Path,
    options: CalibrationOptions | None = None,
    teacher_label: str | None = None,
) -> CalibrateResult:
    """Calibrate the scales of stored delta ``name`` against the fine-tune ``finetune``.

    ``finetune``: the fine-tune's checkpoint folder, a Hub ``REPO_ID[@REVISION]`` or a stored dense
    model. The name ends on a new manifest that differs only in the ``sign1`` scales; bad input
    raises before anything is written.
    """
    from deltahub.ops.load import load_model, load_tokenizer

    options = options or CalibrationOptions()
    options.check()
    t0 = time.perf_counter()
    resolved, base = _delta_of(ctx, name)
    tokenizer = load_tokenizer(ctx, name)
    samples = load_samples(options.data, tokenizer, options.samples, options.seq_len, "calibration", options.seed)
    ref = resolve_finetune(ctx, finetune)
    check_finetune_matches(ctx, resolved, base, ref)
    targets = teacher_targets(ctx, ref, samples.tokens, options)

    student = load_model(ctx, name, dtype=options.dtype, device=options.device, mode="delta", trainable_scales=True)
    with_scale = {n for n, rec in resolved.manifest.tensors.items() if _trainable(rec)}
    scales = delta_scales(student, with_scale)
    if not scales:
        raise InputError(
            f"none of the tensors with scales of {name!r} sits in a Linear or Embedding layer: nothing to calibrate",
            "this architecture is not supported by calibration",
        )
    skipped = sorted(with_scale - {key_tensor(k) for k in scales})
    if skipped:
        logger.warning("%d tensor(s) keep their scales (not in a Linear/Embedding): %s", len(skipped), ", ".join(skipped[:3]))
    config = DistillConfig(
        steps=options.steps, lr=options.lr, batch_size=options.batch_size, seed=options.seed, device=options.device
    )
    run = calibrate_scales(student, scales, samples.tokens, targets, config)
    del student, scales
    gc.collect()
    trained_parts = _checked_parts(resolved.manifest, run.final)  # refused before anything is written

    result = CalibrateResult(
        name=name,
        manifest_id="",
        previous_manifest_id=resolved.manifest_id,
        teacher=teacher_label or ref.description,
        data=samples.description,
        samples=samples.n_samples,
        seq_len=samples.seq_len,
        steps=options.steps,
        lr=options.lr,
        seed=options.seed,
        device=options.device,
        top_k=targets.top_k,
        n_scales=sum(v.numel() if isinstance(v, torch.Tensor) else 1 for v in run.final.values()),
        loss_before=run.loss_before,
        loss_after=run.loss_after,
        seconds=0.0,
        reverted=run.reverted,
        scales={n: {"initial": _mean(run.initial[n]), "calibrated": _mean(run.final[n])} for n in run.final},
    )
    result.seconds = time.perf_counter() - t0
    params = {k: v for k, v in run.final.items() if not isinstance(v, torch.Tensor)}
    initial_parts = {k: v for k, v in run.initial.items() if isinstance(v, torch.Tensor)}
    result.manifest_id = _publish(ctx, resolved, params, result, trained_parts, initial_parts)
    return result


def _mean(value: float | torch.Tensor) -> float:
    """A 0-d scale itself; the mean of a scale tensor (what the calibration record shows)."""
    return float(value.double().mean()) if isinstance(value, torch.Tensor) else float(value)


def _trainable(rec: TensorRecord) -> bool:
    """Whether ``rec``'s codec has scales calibration trains (``sign1``: its scale parameter;
    ``planes``: its scale parts)."""
    return bool(rec.parts) and bool(rec.impl.trainable_params or rec.impl.trainable_parts(rec.params))


def _checked_parts(manifest: Manifest, values: dict[str, float | torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensor name → part → trained scale tensor (fp32, the part's layout), checked by the codec
    (:meth:`~deltahub.codec.TensorCodec.trained_parts`: finite, non-negative).

    Raises:
        DeltaHubError: a key naming no trainable part, or a bad trained value (nothing is written).
    """
    updates: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            tname, _, part = key.partition("#")
            updates.setdefault(tname, {})[part] = value
    out = {}
    for tname, parts in updates.items():
        rec = manifest.tensors.get(tname)
        if rec is None or not _trainable(rec):
            raise DeltaHubError(f"tensor {tname!r} has no trainable scale parts")
        try:
            out[tname] = rec.impl.trained_parts(rec.shape, dtype_from_name(rec.dtype), rec.params, parts)
        except CodecError as exc:
            raise DeltaHubError(f"calibration gave tensor {tname!r} bad scales: {exc.message}", "lower --calib-lr") from None
    return out


def key_tensor(key: str) -> str:
    """The tensor of a scale key (:func:`deltahub.calibrate.distill.delta_scales`)."""
    return key.partition("#")[0]


def with_scales(manifest: Manifest, scales: dict[str, float], parts: dict[str, dict[str, str]] | None = None) -> Manifest:
    """A copy of ``manifest`` whose tensors named in ``scales`` carry those trained parameters
    (key ``tensor`` for a codec's ``scale``, ``tensor#param`` for another trainable parameter), and
    whose tensors named in ``parts`` point their trainable parts at new objects (tensor → part →
    object id; the other parts keep their objects)."""
    tensors = dict(manifest.tensors)
    updates: dict[str, dict[str, float]] = {}
    for key, value in scales.items():
        tname, _, pname = key.partition("#")
        updates.setdefault(tname, {})[pname or "scale"] = value
    for tname, values in updates.items():
        rec = tensors[tname]
        if not _trainable(rec) or not set(values) <= set(rec.impl.trainable_params):
            raise DeltaHubError(f"tensor {tname!r} ({rec.codec}) has no trainable {', '.join(sorted(values))}")
        if not all(math.isfinite(float(torch.tensor(v, dtype=torch.float32))) for v in values.values()):
            raise DeltaHubError(f"calibration gave tensor {tname!r} a non-finite scale", "lower --calib-lr")
        tensors[tname] = dataclasses.replace(rec, params=rec.impl.with_params(rec.params, values))
    for tname, new_ids in (parts or {}).items():
        rec = tensors[tname]
        if not set(new_ids) <= set(rec.impl.trainable_parts(rec.params)) or not set(new_ids) <= set(rec.parts):
            raise DeltaHubError(f"tensor {tname!r} ({rec.codec}) has no trainable part {', '.join(sorted(new_ids))}")
        tensors[tname] = dataclasses.replace(rec, parts={**rec.parts, **new_ids})
    return dataclasses.replace(manifest, tensors=tensors)


def _publish(
    ctx: StoreContext,
    resolved: Resolved,
    scales: dict[str, float],
    result: CalibrateResult,
    trained_parts: dict[str, dict[str, torch.Tensor]] | None = None,
    initial_parts: dict[str, torch.Tensor] | None = None,
) -> str:
    """Objects (the trained scale tensors) → manifest → index rows (+ the calibration record) → name.
    Returns the new manifest id.

    ``trained_parts``: tensor → part → checked fp32 tensor (:func:`_checked_parts`);
    ``initial_parts``: key ``tensor#part`` → that part before calibration (for the statistics)."""
    trained_parts = trained_parts or {}
    new = with_scales(resolved.manifest, scales)  # parameters checked before anything is written
    with ctx.writing():
        objects: dict[str, ObjectInfo] = {}
        new_parts: dict[str, dict[str, str]] = {}
        extra_bytes: dict[str, int] = {}
        for tname, parts in sorted(trained_parts.items()):
            rec = new.tensors[tname]
            compression = Compression.AUTO if rec.impl.compressible else Compression.NONE
            for part, tensor in sorted(parts.items()):
                pinfo = ctx.put(tensor_bytes(tensor), compression)  # the writer compress uses
                objects[pinfo.sha256] = pinfo
                new_parts.setdefault(tname, {})[part] = pinfo.sha256
                old_size = ctx.objects.info(rec.parts[part]).stored_size
                extra_bytes[tname] = extra_bytes.get(tname, 0) + pinfo.stored_size - old_size
        new = with_scales(new, {}, new_parts)
        info = ctx.put(new.to_bytes(), Compression.AUTO)
        new_id = info.sha256
        ctx.objects.flush()  # the manifest object is durable and in place before any index row (invariant 2)
        old = ctx.index.manifest(resolved.manifest_id)  # gc cannot prune it: this writer holds the gc lock
        if old is None:
            raise DeltaHubError(
                f"manifest {resolved.manifest_id[:12]} of {resolved.name!r} is not indexed", "run `deltahub verify`"
            )
        means = _part_means(trained_parts, initial_parts or {})
        stats = _calibrated_stats(new, ctx.index.tensor_stats(old.id), scales, means, extra_bytes)
        try:
            # the scale objects are new; every other object is the old manifest's, indexed: ONE
            # transaction for the rows, then the name, moved only if it still points at the
            # manifest that was calibrated
            ctx.register(
                new, info, objects, stats, resolved.name, force=False,
                expected=resolved.manifest_id, info=old.info, calibration=result.to_json(),
            )
        except NameChangedError:
            raise NameChangedError(
                f"{resolved.name!r} was changed by another process during the calibration",
                "run the calibration again",
            ) from None
    logger.info("calibrated %s: manifest %s -> %s (%d new scale object(s))", resolved.name,
                resolved.manifest_id[:12], new_id[:12], len(objects))
    return new_id


def _part_means(trained: dict[str, dict[str, torch.Tensor]], initial: dict[str, torch.Tensor]
                ) -> dict[str, tuple[float | None, float]]:
    """Tensor → (mean of its scale parts before, after calibration): every element of every trained
    part (all planes) counts once; ``None`` before when the initial values are not known."""
    out: dict[str, tuple[float | None, float]] = {}
    for tname, parts in trained.items():
        after = torch.cat([parts[p].reshape(-1).double() for p in sorted(parts)])
        befores = [initial.get(f"{tname}#{p}") for p in sorted(parts)]
        before = None
        if all(b is not None for b in befores):
            before = float(torch.cat([b.reshape(-1).double() for b in befores]).mean())  # type: ignore[union-attr]
        out[tname] = (before, float(after.mean()))
    return out


def _calibrated_stats(
    new: Manifest,
    old_stats: list[TensorStatEntry],
    scales: dict[str, float],
    part_means: dict[str, tuple[float | None, float]] | None = None,
    extra_bytes: dict[str, int] | None = None,
) -> list[TensorStat]:
    """The per-tensor statistics of the calibrated manifest: the old ones, with the new scales.

    A tensor with scale *parts* (``planes``) records the mean of its scales: ``initial_scale`` the
    mean as compressed (kept through later calibrations), ``scale`` the mean now; its
    ``rel_recon_error`` is what its codec can tell without the fine-tune (``None`` for ``planes``:
    the error of new scales needs ``Δ``); ``stored_bytes`` follows the new scale objects."""
    part_means = part_means or {}
    extra_bytes = extra_bytes or {}
    out = []
    for st in old_stats:
        initial = st.initial_scale if st.initial_scale is not None else st.scale
        scale, error = st.scale, st.rel_recon_error
        rec = new.tensors.get(st.name)
        if st.name in scales and rec is not None and _trainable(rec) and initial is not None and st.scale is not None:
            scale = rec.scale
            error = rec.impl.rescaled_error(rec.params, {"scale": initial}, {"scale": st.scale}, st.rel_recon_error)
        if st.name in part_means and rec is not None:
            before, scale = part_means[st.name]
            initial = initial if initial is not None else before
            error = None
        out.append(
            TensorStat(
                name=st.name,
                codec=st.codec,
                dtype=st.dtype,
                shape=st.shape,
                stored_bytes=st.stored_bytes + extra_bytes.get(st.name, 0),
                scale=scale,
                initial_scale=initial if rec is not None and _trainable(rec) else None,
                rel_delta_norm=st.rel_delta_norm,
                rel_recon_error=error,
            )
        )
    return out


# ------------------------------------------------------------------------------- compress + calibrate
def compress_and_calibrate(
    ctx: StoreContext,
    src: Path | str,
    base_name: str,
    name: str,
    embeddings: str,
    force: bool,
    options: CalibrationOptions | None = None,
    allow_nonfinite: bool = False,
    codec: str = defaults.DEFAULT_CODEC,
    codec_options: dict[str, Any] | None = None,
    budget: Any = None,
    sensitivity: Any = None,
) -> tuple[Any, CalibrateResult]:
    """``compress --calibrate``: compress ``src`` against ``base_name``, then calibrate with ``src``
    as the teacher. The calibration input is checked (tokenized with the fine-tune's tokenizer) before
    anything is compressed; should the calibration itself fail later, the uncalibrated delta stays
    stored under ``name`` and the error says how to calibrate it."""
    from transformers import AutoTokenizer

    from deltahub.ops.compress import compress_finetune

    options = options or CalibrationOptions()
    options.check()
    source = resolve_source(src)
    src, hub, label = source.path, source.hub, str(src) if source.hub is None else source.label
    open_checkpoint(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:
        raise InputError(f"cannot load the tokenizer of {src}: {exc}", "calibration needs the fine-tune's tokenizer files") from None
    load_samples(options.data, tokenizer, options.samples, options.seq_len, "calibration", options.seed)
    compressed = compress_finetune(
        ctx, src, base_name, name, embeddings=embeddings, force=force, allow_nonfinite=allow_nonfinite, codec=codec,
        codec_options=codec_options, budget=budget, sensitivity=sensitivity,
    )
    if hub is not None:
        compressed.hub_repo_id, compressed.hub_revision = hub
    try:
        calibrated = calibrate(ctx, name, src, options, teacher_label=label)
    except DeltaHubError as exc:
        raise type(exc)(
            f"{name!r} was compressed but not calibrated: {exc.message}",
            f"{exc.hint + '; ' if exc.hint else ''}then run `deltahub calibrate {name} --finetune {label}`",
        ) from exc
    compressed.manifest_id = calibrated.manifest_id
    return compressed, calibrated


__all__ = [
    "CalibrateResult",
    "CalibrationOptions",
    "FinetuneRef",
    "calibrate",
    "check_device",
    "check_minimums",
    "check_finetune_matches",
    "compress_and_calibrate",
    "load_finetune_model",
    "recon_error_at",
    "resolve_finetune",
    "with_scales",
]

