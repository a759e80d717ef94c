"""Size budgets: how many planes each tensor of a progressive delta gets (``compress --avg-bits`` /
``--max-size``).

A budget is a number of bytes of tensor data (:meth:`Manifest.tensor_nbytes`: the parts before the
store's zstd, what a pull fetches for them). ``--avg-bits B`` is ``B`` bits for every parameter of the
model (``B · n_params / 8`` bytes), dense and shared tensors included.

Allocation. Every progressive tensor (codec ``planes``) first gets one plane; every other tensor costs
what its codec stores. Planes are then added **role by role** (a role: the tensors that share a name
up to the layer number, :func:`~deltahub.calibrate.sensitivity.role_of`). For each role and plane
count ``k`` the compressor measures the KL that coarsening the whole role to ``k`` planes causes on
calibration data (:func:`~deltahub.calibrate.sensitivity.measure_roles`); :func:`role_plane_order`
orders the roles' further planes by KL removed per byte, greedily over the lower convex hull of each
role's curve (so a plane that pays only with the next one is taken with it), and within one role's
step orders its tensors by ``D_t(j)``, their Fisher-weighted error (:mod:`deltahub.calibrate.sensitivity`).
The stored delta is the longest prefix of that order that fits the budget, and the order is stored
with it (:attr:`Manifest.plane_order`): any smaller budget is a prefix, served from the same artifact.

Why roles and not tensors: the diagonal Fisher misjudges whole roles by an order of magnitude against
each other (it rates the tied embedding of SmolLM2 far above ``gate_proj``), but it ranks the layers
of one role well enough; on the 200-step pair of ``bench/fidelity.py`` the role order beats a uniform
allocation at every size measured, where a per-tensor Fisher order lost at 2 of 5.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deltahub import defaults
from deltahub.errors import InputError

if TYPE_CHECKING:
    from deltahub.calibrate.sensitivity import Sensitivity
    from deltahub.codec import Encoded, TensorCodec
    from deltahub.formats.checkpoint import Checkpoint
    from deltahub.ops.context import Resolved, StoreContext

__all__ = [
    "Budget",
    "DEFAULT_MAX_PLANES",
    "Measured",
    "SensitivityOptions",
    "allocate",
    "budget_codec",
    "fit_prefix",
    "measure_finetune",
    "plane_order",
    "role_plane_order",
]

logger = logging.getLogger(__name__)

#: Planes a tensor may get under a budget when ``--bits`` does not say (the issue measures 1–4).
DEFAULT_MAX_PLANES = 4


@dataclass(frozen=True)
class Budget:
    """``avg_bits`` (bits per parameter of the model) or ``max_bytes`` (tensor data), exactly one;
    ``max_planes``: the most planes any tensor may get."""

    avg_bits: float | None = None
    max_bytes: int | None = None
    max_planes: int = DEFAULT_MAX_PLANES

    def check(self) -> None:
        if (self.avg_bits is None) == (self.max_bytes is None):
            raise InputError("give exactly one of --avg-bits and --max-size", "e.g. --avg-bits 1.5 or --max-size 40MB")
        if self.avg_bits is not None:
            bits = self.avg_bits
            if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
                raise InputError(f"--avg-bits must be a positive number of bits per weight, got {bits!r}", "e.g. --avg-bits 1.5")
        if self.max_bytes is not None:
            size = self.max_bytes
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise InputError(f"--max-size must be a positive number of bytes, got {size!r}", "e.g. --max-size 40MB")
        if isinstance(self.max_planes, bool) or not isinstance(self.max_planes, int) or not 2 <= self.max_planes <= 8:
            raise InputError(f"a budget chooses between 1 and --bits planes per matrix, so --bits must be 2..8, got {self.max_planes!r}",
                             "use --bits 2..8 (default 4), or drop the budget for one plane everywhere")

    def bytes_for(self, n_params: int) -> int:
        """The budget in bytes of tensor data for a model of ``n_params`` parameters."""
        if self.max_bytes is not None:
            return self.max_bytes
        assert self.avg_bits is not None
        size = self.avg_bits * n_params / 8
        return int(math.floor(size)) if math.isfinite(size) and size < 2**62 else 2**62  # "everything"

    def describe(self) -> str:
        return f"--avg-bits {self.avg_bits:g}" if self.avg_bits is not None else f"--max-size {self.max_bytes}"


def plane_order(errors: Mapping[str, Sequence[float]], costs: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """The order in which to add planes ≥ 1: ``(tensor, plane)`` pairs, each tensor's in increasing order.

    ``errors[t][j]``: the tensor's weighted error with ``j + 1`` planes (``j`` = 0 … k−1);
    ``costs[t][j]``: the bytes plane ``j`` adds (``costs[t][0]`` is not used). Greedy on error removed
    per byte: from a tensor's current count ``c`` the candidate is the run of planes ``c … c+r−1``
    with the best average ratio (the next vertex of the lower convex hull of its curve), emitted
    together. Ties go to the tensor name, so the order is deterministic.
    """
    have = {t: 1 for t in errors}

    def best_run(t: str) -> tuple[float, int] | None:
        e, c = errors[t], costs[t]
        j = have[t]
        if j >= len(e):
            return None
        best: tuple[float, int] | None = None
        spent = 0
        for r in range(1, len(e) - j + 1):
            spent += max(1, int(c[j + r - 1]))
            ratio = (e[j - 1] - e[j + r - 1]) / spent
            if best is None or ratio > best[0]:
                best = (ratio, r)
        return best

    heap: list[tuple[float, str, int]] = []
    for t in sorted(errors):
        run = best_run(t)
        if run is not None:
            heapq.heappush(heap, (-run[0], t, run[1]))
    order: list[tuple[str, int]] = []
    while heap:
        _neg, t, r = heapq.heappop(heap)
        for _ in range(r):
            order.append((t, have[t]))
            have[t] += 1
        run = best_run(t)
        if run is not None:
            heapq.heappush(heap, (-run[0], t, run[1]))
    return order


def role_plane_order(
    errors: Mapping[str, Sequence[float]],
    costs: Mapping[str, Sequence[int]],
    role_kl: Mapping[str, Sequence[float]],
    per_kl: float = 1.0,
    twins: Mapping[str, str] | None = None,
) -> list[tuple[str, int]]:
    """The order in which to add planes ≥ 1, role by role: ``(tensor, plane)`` pairs.

    ``twins``: tensor -> the tensor it is a byte-identical copy of (both names of a tied weight
    stored): a twin joins its original's role, so their planes come together.

    ``errors``/``costs`` per tensor as for :func:`plane_order`. Tensors are grouped by
    :func:`~deltahub.calibrate.sensitivity.role_of`; a role's curve is ``role_kl[role]`` (its KL with
    1, 2, … planes; values down to -1e-6 count as 0) when given, finite, for all its planes; else
    the sum of its tensors' ``errors`` divided by ``per_kl`` (what the Fisher predicts, in the same
    unit), times the median measured/predicted ratio of the measured roles when there are any. Its
    cost per plane is the sum of its tensors'. :func:`plane_order` orders the roles' planes; each
    ``(role, j)`` becomes plane ``j`` of every tensor of the role that has one, the most Fisher error
    removed per byte first (ties by name).
    """
    from deltahub.calibrate.sensitivity import role_of

    roles: dict[str, list[str]] = {}
    for t in sorted(errors):
        roles.setdefault(role_of((twins or {}).get(t, t)), []).append(t)
    r_err: dict[str, list[float]] = {}
    r_cost: dict[str, list[int]] = {}
    fallback: list[str] = []
    ratios: list[float] = []
    for r, members in roles.items():
        k = max(len(errors[t]) for t in members)
        fisher = [sum(errors[t][min(j, len(errors[t]) - 1)] for t in members) / per_kl for j in range(k)]
        kl = role_kl.get(r)
        # fp32 rounding can give a KL a hair below zero for an unchanged role: clamped, not refused
        if kl is not None and len(kl) >= k and all(math.isfinite(v) and v >= -1e-6 for v in kl[:k]):
            r_err[r] = [max(0.0, float(v)) for v in kl[:k]]
            if fisher[0] > 0 and r_err[r][0] > 0:
                ratios.append(r_err[r][0] / fisher[0])
        else:
            r_err[r] = fisher
            fallback.append(r)
        r_cost[r] = [sum(int(costs[t][j]) for t in members if j < len(costs[t])) for j in range(k)]
    if ratios and fallback:
        # the Fisher underrates every measured role (1.5-60x on SmolLM2): a role without a usable
        # measurement gets the median factor, so it is not ranked last for want of one
        factor = statistics.median(ratios)
        for r in fallback:
            r_err[r] = [v * factor for v in r_err[r]]
        logger.warning("%d role(s) without a usable KL measurement are ranked by their Fisher x %.3g (the median "
                       "measured/Fisher ratio): %s", len(fallback), factor, ", ".join(sorted(fallback)[:3]))
    order: list[tuple[str, int]] = []
    for r, j in plane_order(r_err, r_cost):
        members = [t for t in roles[r] if j < len(errors[t])]
        members.sort(key=lambda t: (-(errors[t][j - 1] - errors[t][j]) / max(1, int(costs[t][j])), t))
        order += [(t, j) for t in members]
    return order


def fit_prefix(fixed: int, order: Sequence[tuple[str, int]], costs: Mapping[str, Sequence[int]], budget: int,
               n_params: int | None = None) -> int:
    """How many entries of ``order`` fit in ``budget`` bytes on top of ``fixed`` (a prefix: the first
    plane that does not fit ends it).

    Raises:
        InputError: ``fixed`` (one plane per tensor, everything else as stored) exceeds the budget.
    """
    if fixed > budget:
        bits = f" ({8 * fixed / n_params:.3f} bits per weight)" if n_params else ""
        raise InputError(
            f"the budget is {budget} bytes but the smallest delta (one plane per matrix, the other tensors "
            f"as stored) needs {fixed}{bits}; nothing was stored",
            f"raise the budget to at least --max-size {fixed}"
            + (f" or --avg-bits {math.ceil(8000 * fixed / n_params) / 1000:g}" if n_params else ""),
        )
    total, m = fixed, 0
    for t, plane in order:
        if total + costs[t][plane] > budget:
            break
        total += costs[t][plane]
        m += 1
    return m


@dataclass
class SensitivityOptions:
    """Where and how the sensitivity of a budgeted compress is measured: ``samples`` sequences of
    ``seq_len`` tokens of ``data`` (``None``: the bundled corpus), as ``calibrate`` reads them."""

    data: Path | None = None
    samples: int = defaults.CALIB_SAMPLES
    seq_len: int = defaults.CALIB_SEQ_LEN
    batch_size: int = defaults.CALIB_BATCH_SIZE
    device: str = defaults.DEFAULT_DEVICE
    seed: int = defaults.CALIB_SEED
    dtype: str = defaults.COMPUTE_DTYPE
    #: sequences (the first of ``samples``) on which each role's KL is measured at 1, 2, … planes
    role_samples: int = defaults.BUDGET_ROLE_SAMPLES


def budget_codec(codec: str, options: Mapping[str, Any] | None, budget: Budget) -> tuple[str, dict[str, Any]]:
    """The matrix codec and options of a budgeted compress: a progressive codec (``planes`` unless
    another progressive one is named) with ``planes`` = the most any tensor may get."""
    from deltahub import codec as codecs
    from deltahub.codec import CodecError

    name = codec if codec != defaults.DEFAULT_CODEC else defaults.PLANES_CODEC
    try:
        impl = codecs.get(name)
    except CodecError as exc:
        raise InputError(str(exc), "pick one of the codecs listed, or register yours first") from None
    if not impl.progressive:
        raise InputError(
            f"a size budget chooses the planes of each matrix, but codec {name!r} has no planes",
            f"drop --codec, or use --codec {defaults.PLANES_CODEC}",
        )
    return name, {**dict(options or {}), "planes": budget.max_planes}


@dataclass
class Measured:
    """What a budget's allocation is decided by.

    ``weights``: the Fisher weights of each tensor, summed over ``tokens`` calibration tokens (they
    rank the tensors within a role); ``roles``: the measured mean KL per token (nats) of each role
    coarsened to 1, 2, … planes (it ranks the roles).
    """

    weights: dict[str, Sensitivity] = field(default_factory=dict)
    roles: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0


def measure_finetune(
    ctx: StoreContext,
    src: Path,
    base_name: str,
    options: SensitivityOptions,
    names: Sequence[str] = (),
    prefixes_for: Callable[[Resolved], Callable[[str], Callable[[int], torch.Tensor]]] | None = None,
    planes: int = DEFAULT_MAX_PLANES,
) -> Measured:
    """The Fisher weights (:func:`~deltahub.calibrate.sensitivity.measure_sensitivity`) of the
    fine-tune in folder ``src`` on ``options``' calibration text, tokenized with its own tokenizer
    (else the stored base's), and the KL of each role of ``names`` at 1 … ``planes`` planes
    (:func:`~deltahub.calibrate.sensitivity.measure_roles`, on the first ``options.role_samples``
    sequences). ``prefixes_for(base)`` gives the reconstructions of a tensor by plane count (it reads
    each base tensor under the store's reading lock, not across the passes, so gc is not held up).
    The result is keyed by the checkpoint's tensor names.
    """
    from deltahub.calibrate.data import load_samples
    from deltahub.calibrate.sensitivity import NonFiniteOutputError, measure_roles, measure_sensitivity, role_of
    from deltahub.formats.checkpoint import open_checkpoint
    from deltahub.ops.load import context_length, load_tokenizer, model_class

    _check_device(options.device)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception:  # no tokenizer files, or a config transformers refuses: the base's tokenizer
        tokenizer = load_tokenizer(ctx, base_name)
    ckpt = open_checkpoint(src)
    seq_len = options.seq_len
    context = context_length(ckpt.config)
    if context is not None and seq_len > context:
        logger.info("--calib-seq-len %d is longer than the model's context (%d): using %d", seq_len, context, context)
        seq_len = context
    samples = load_samples(options.data, tokenizer, options.samples, seq_len, "calibration", options.seed)
    vocab = ckpt.config.get("vocab_size")
    if isinstance(vocab, int) and samples.tokens.numel() and int(samples.tokens.max()) >= vocab:
        raise InputError(
            f"the tokenizer gives token ids up to {int(samples.tokens.max())}, but the fine-tune's vocabulary has {vocab}",
            "check that the fine-tune folder's tokenizer belongs to its model",
        )
    hint = "a size budget needs a causal LM transformers can run; use --bits K for a uniform number of planes"
    cls = model_class(ckpt.architectures)
    try:
        model = cls.from_pretrained(str(src), dtype=getattr(torch, options.dtype), use_safetensors=True, local_files_only=True)
        model = model.to(options.device)
    except Exception as exc:  # transformers raises many kinds for configs it cannot build
        raise InputError(f"cannot load the fine-tune in {src} with transformers to measure its sensitivity: "
                         f"{type(exc).__name__}: {exc}"[:400], hint) from None
    try:
        by_model = measure_sensitivity(model, samples.tokens, options.batch_size, options.device, options.seed)
        params = dict(model.named_parameters(remove_duplicate=False))
        to_model = _model_names(ckpt.tensors, params, str(getattr(model, "base_model_prefix", "") or ""))
        to_ckpt = {m: c for c, m in to_model.items()}
        # keyed by the checkpoint's names (GPT-2 files often lack the model's "transformer." prefix)
        weights = {to_ckpt[m]: w for m, w in by_model.items() if m in to_ckpt}
        measured = Measured(weights, {}, int(samples.tokens.numel()))
        roles: dict[str, list[str]] = {}  # role (of the checkpoint name) -> the model's names
        owner: dict[int, str] = {}  # a parameter stored under two names (tied) is measured in one role
        for n in names:
            m = to_model.get(n)
            if m is not None and owner.setdefault(id(params[m]), role_of(n)) == role_of(n):
                roles.setdefault(role_of(n), []).append(m)
        missing = [n for n in names if n not in to_model]
        if missing:
            logger.warning("%d of %d matrices have no parameter in the loaded model (e.g. %s): they are ranked by "
                           "weight-space error", len(missing), len(names), missing[0])
        if prefixes_for is not None and roles and options.role_samples > 0:
            with ctx.reading():
                base = ctx.resolve(base_name)
            prefixes = prefixes_for(base)
            measured.roles = measure_roles(model, samples.tokens[: options.role_samples], roles,
                                           lambda m: prefixes(to_ckpt[m]), planes, options.batch_size, options.device)
        return measured
    except NonFiniteOutputError as exc:
        # NaN/Inf in the fine-tune: compress's own check refuses it (or stores it dense with
        # --allow-nonfinite); the allocation then weighs every entry alike
        logger.warning("%s: the planes are allocated by weight-space error", exc)
        return Measured()
    except (ValueError, AttributeError, TypeError, IndexError, RuntimeError) as exc:
        raise InputError(f"cannot measure the sensitivity of {src}: {type(exc).__name__}: {exc}"[:400], hint) from None
    finally:
        del model


def _model_names(stored: Iterable[str], params: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """``{checkpoint name: the model's parameter name}`` for the stored tensors the model has: the
    same name, or the name with the model's ``base_model_prefix`` added or removed (GPT-2 and Bloom
    files store ``h.0.…`` for the model's ``transformer.h.0.…``)."""
    out: dict[str, str] = {}
    for name in stored:
        for candidate in (name, f"{prefix}.{name}" if prefix else None,
                          name.removeprefix(f"{prefix}.") if prefix else None):
            if candidate is not None and candidate in params:
                out[name] = candidate
                break
    return out


def _check_device(device: str) -> None:
    """Refuse a torch device that does not exist here before anything is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}: {exc}", "use --device cpu, or cuda when a GPU is present") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} is not available here", "use --device cpu")


def allocate(
    ft: Checkpoint,
    plan: Mapping[str, TensorCodec],
    matrix: TensorCodec,
    options: Mapping[str, Any],
    budget: Budget,
    measured: Measured,
    items: Iterable[tuple[str, tuple[torch.Tensor, torch.Tensor | None]]],
    encode: Callable[[TensorCodec, str, torch.Tensor, torch.Tensor | None, dict[str, Any] | None], tuple[TensorCodec, Encoded]],
    bar: Any = None,
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """The planes of each matrix under ``budget`` and the stored plane order.

    One pass over ``items`` (``(name, (fine-tune tensor, base tensor or None))`` in plan order, as
    compress reads them): each tensor is encoded as compress would (``encode``); for a tensor of the
    progressive ``matrix`` codec, the error of each plane prefix, weighted by its sensitivity, and the
    bytes each plane adds; for any other, the bytes it stores. Tensors the sensitivity does not cover
    (not in a Linear/Embedding layer) are weighted by the median sensitivity per entry of those it does.
    The order is :func:`role_plane_order` with ``measured.roles``.

    Returns: ``{tensor: planes}`` for the progressive tensors and the plane order (stored prefix).

    Raises:
        InputError: the budget is below the smallest delta; nothing is written by this function.
    """
    weights = measured.weights
    per_entry = [w.total() / max(1, _numel(ft, n)) for n, w in weights.items() if n in plan]
    fallback = statistics.median(per_entry) if per_entry else 1.0
    fixed = 0
    n_params = 0
    errors: dict[str, list[float]] = {}
    costs: dict[str, list[int]] = {}
    copies: dict[str, list[str]] = {}  # digest of a progressive tensor's encoding -> its names
    unweighted: list[str] = []
    for tname, (tensor, base_t) in items:
        planned = plan[tname]
        n_params += tensor.numel()
        chosen, enc = encode(planned, tname, tensor, base_t, dict(options) if planned is matrix else None)
        shape, dtype = tuple(tensor.shape), tensor.dtype
        if not (chosen is matrix and chosen.progressive):
            fixed += chosen.stored_nbytes(shape, dtype, enc.params)
        else:
            assert base_t is not None
            sens = weights.get(tname)
            if sens is None:
                unweighted.append(tname)
            target = tensor.to(torch.float32)
            curve, sizes = [], []
            for k in range(1, chosen.planes(enc.params) + 1):
                params, parts = chosen.prefix(enc.params, enc.parts, k)  # type: ignore[arg-type]
                approx = chosen.decode(base_t, parts, params, torch.float32)  # type: ignore[arg-type]
                approx -= target
                curve.append(sens.weighted_error(approx) if sens is not None else fallback * float(approx.double().square().sum()))
                sizes.append(chosen.stored_nbytes(shape, dtype, params))
                del approx
            errors[tname] = curve
            costs[tname] = [sizes[0]] + [b - a for a, b in zip(sizes, sizes[1:])]
            digest = hashlib.sha256(repr((shape, sorted(enc.params.items()))).encode())
            for part in sorted(enc.parts):
                digest.update(memoryview(enc.parts[part].contiguous().view(torch.uint8).reshape(-1).numpy()))
            copies.setdefault(digest.hexdigest(), []).append(tname)
            fixed += sizes[0]
            del target
        if bar is not None:
            bar.update(tensor.numel() * tensor.element_size())
        del tensor, base_t, enc
    if unweighted:
        logger.info("%d matrix(es) outside Linear/Embedding layers get the median sensitivity: %s",
                    len(unweighted), ", ".join(unweighted[:3]))
    # byte-identical copies (both names of a tied weight stored) follow the first name, the one
    # measure_finetune measured them under (it takes the names sorted)
    twins = {n: min(names) for names in copies.values() for n in names if n != min(names)}
    order = role_plane_order(errors, costs, measured.roles, 2.0 * max(1, measured.tokens), twins)
    limit = budget.bytes_for(n_params)
    m = fit_prefix(fixed, order, costs, limit, n_params)
    counts = dict.fromkeys(errors, 1)
    for tname, _plane in order[:m]:
        counts[tname] += 1
    for twin, original in twins.items():  # copies of one tied weight keep one plane count (the smaller)
        counts[twin] = counts[original] = min(counts[twin], counts[original])
    kept = [(t, p) for t, p in order[:m] if p < counts[t]]
    size = fixed + sum(costs[t][p] for t, p in kept)
    logger.info("budget %s: %d bytes of %d (%.3f bits per weight), %d of %d further planes",
                budget.describe(), size, limit, 8 * size / max(1, n_params), len(kept), len(order))
    return counts, kept


def _numel(ft: Checkpoint, name: str) -> int:
    return math.prod(ft.shape(name)) if name in ft.tensors else 1
