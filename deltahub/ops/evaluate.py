"""``eval``: how faithful a stored delta is, measured on held-out text and recorded in the index.

Perplexity of the base, of the fine-tune (when one is given: a checkpoint folder, a Hub id or a
stored dense copy) and of the delta (loaded like ``load_model``: every tensor rebuilt exactly, in
fp32 by default: the same function as delta mode up to fp32 rounding, and several times faster on a
CPU, where delta mode unpacks the signs at every call), the mean
KL(fine-tune || delta) of the next-token distributions, and the share of the fine-tune's improvement
the delta keeps (:mod:`deltahub.calibrate.evaluate`). The models are loaded one at a time. The
figures are stored as an ``evaluations`` row of the delta's manifest; ``deltahub show`` prints the
latest one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltahub import defaults
from deltahub.calibrate.data import load_samples
from deltahub.calibrate.evaluate import measure_fidelity
from deltahub.calibrate.targets import DEFAULT_TOP_K
from deltahub.errors import InputError
from deltahub.formats.manifest import ModelKind
from deltahub.ops.calibrate import (
    check_device,
    check_finetune_matches,
    check_minimums,
    load_finetune_model,
    resolve_finetune,
)
from deltahub.ops.context import Resolved, StoreContext

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """Settings of ``deltahub eval`` (``data=None``: the held-out part of the bundled corpus)."""

    data: Path | None = None
    samples: int = defaults.EVAL_SAMPLES
    seq_len: int = defaults.EVAL_SEQ_LEN
    device: str = defaults.DEFAULT_DEVICE
    batch_size: int = defaults.EVAL_BATCH_SIZE
    top_k: int = DEFAULT_TOP_K
    dtype: torch.dtype = getattr(torch, defaults.COMPUTE_DTYPE)

    def check(self) -> None:
        check_minimums(
            "eval", samples=(self.samples, 1), seq_len=(self.seq_len, 2), batch_size=(self.batch_size, 1), top_k=(self.top_k, 1)
        )
        check_device(self.device)


@dataclass
class EvalResult:
    """One evaluation of ``name`` (manifest ``manifest_id``); perplexities over ``n_tokens`` tokens."""

    name: str
    manifest_id: str
    data: str
    finetune: str | None
    samples: int
    seq_len: int
    n_tokens: int
    ppl_base: float
    ppl_delta: float
    ppl_finetune: float | None
    kl_mean: float | None
    kept_logppl: float | None
    kept_ppl: float | None
    top_k: int | None
    device: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_stored_base(ctx: StoreContext, base_id: str, dtype: torch.dtype, device: str) -> Any:
    """A stored base by manifest id (it may have no name) as a transformers model."""
    from deltahub.ops.load import materialized_model
    from deltahub.ops.reconstruct import ModelSource

    label = f"base {base_id[:12]}"
    source = ModelSource(ctx, Resolved(label, base_id, ctx.load_manifest(base_id)), None)
    return materialized_model(source, label, dtype).to(device)


def evaluate(
    ctx: StoreContext, name: str, finetune: str | Path | None = None, options: EvalOptions | None = None
) -> EvalResult:
    """Measure the fidelity of stored delta ``name`` and record it in the index."""
    from deltahub.ops.load import load_model, load_tokenizer

    options = options or EvalOptions()
    options.check()
    t0 = time.perf_counter()
    resolved = ctx.resolve(name)
    if resolved.manifest.kind is not ModelKind.DELTA:
        raise InputError(f"{name!r} is a base model; eval measures a delta against its base", "give a delta's name")
    base_id, base = ctx.base_of(resolved.manifest)
    tokenizer = load_tokenizer(ctx, name)
    samples = load_samples(options.data, tokenizer, options.samples, options.seq_len, "eval")
    ref = None
    if finetune is not None:
        ref = resolve_finetune(ctx, finetune)
        check_finetune_matches(ctx, resolved, base, ref)
    dtype, device = options.dtype, options.device

    report = measure_fidelity(
        samples.tokens,
        load_base=lambda: load_stored_base(ctx, base_id, dtype, device),
        load_delta=lambda: load_model(ctx, name, dtype=dtype, device=device),
        load_finetune=(lambda: load_finetune_model(ctx, ref, dtype, device)) if ref is not None else None,
        batch_size=options.batch_size,
        device=device,
        top_k=options.top_k,
    )
    result = EvalResult(
        name=name,
        manifest_id=resolved.manifest_id,
        data=samples.description,
        finetune=ref.description if ref is not None else None,
        samples=report.samples,
        seq_len=report.seq_len,
        n_tokens=report.n_tokens,
        ppl_base=report.ppl_base,
        ppl_delta=report.ppl_delta,
        ppl_finetune=report.ppl_finetune,
        kl_mean=report.kl_mean,
        kept_logppl=report.kept_logppl,
        kept_ppl=report.kept_ppl,
        top_k=report.top_k,
        device=device,
        seconds=time.perf_counter() - t0,
    )
    if not ctx.index.record_evaluation(result.to_json()):
        logger.warning("manifest %s was removed meanwhile; evaluation not recorded", resolved.manifest_id[:12])
    return result


__all__ = ["EvalOptions", "EvalResult", "evaluate", "load_stored_base"]
