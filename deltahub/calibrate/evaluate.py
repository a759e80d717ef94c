"""Fidelity of a compressed delta on held-out text: perplexities, KL, and the improvement kept.

:func:`measure_fidelity` loads the models **one at a time** through the callables it is given, runs
each over the same token samples and frees it before loading the next:

1. the fine-tune (when given): its perplexity, and its next-token distributions kept as targets
   (full, or top-k with a tail bucket: see :mod:`deltahub.calibrate.targets`);
2. the base: its perplexity;
3. the delta: its perplexity and the mean KL(fine-tune || delta).

The share of the fine-tune's improvement the delta keeps is reported two ways:

* ``kept_logppl`` (the headline): on log-perplexity, i.e. on mean NLL (cross-entropy, nats)::

      (NLL_base − NLL_delta) / (NLL_base − NLL_ft)

* ``kept_ppl``: on perplexity itself, ``(ppl_base − ppl_delta) / (ppl_base − ppl_ft)``.

Perplexity is exponential in the NLL, so ``kept_ppl`` credits the last nats of improvement more than
the first; ``kept_logppl`` is linear in what the models are trained on. Both are ``None`` when the
fine-tune is not better than the base on this text (no improvement to keep).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deltahub.calibrate.targets import DEFAULT_TOP_K, PassStats, score_model

__all__ = ["FidelityReport", "improvement_kept", "measure_fidelity"]

logger = logging.getLogger(__name__)

ModelLoader = Callable[[], Any]


@dataclass
class FidelityReport:
    """Figures of one evaluation (perplexities over ``n_tokens`` scored tokens; KL in nats/position)."""

    samples: int
    seq_len: int
    n_tokens: int
    ppl_base: float
    ppl_delta: float
    ppl_finetune: float | None = None
    kl_mean: float | None = None
    kept_logppl: float | None = None
    kept_ppl: float | None = None
    top_k: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def improvement_kept(base: float, finetune: float, delta: float) -> float | None:
    """``(base − delta) / (base − finetune)``; ``None`` when the fine-tune is not better than the base."""
    gain = base - finetune
    if not gain > 0 or not math.isfinite(gain):
        return None
    return (base - delta) / gain


def measure_fidelity(
    tokens: torch.Tensor,
    load_base: ModelLoader,
    load_delta: ModelLoader,
    load_finetune: ModelLoader | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    top_k: int = DEFAULT_TOP_K,
) -> FidelityReport:
    """Evaluate on ``tokens`` (int64 ``[S, T]``), one model in memory at a time."""
    s, t = (int(d) for d in tokens.shape)
    ft_stats: PassStats | None = None
    if load_finetune is not None:
        ft_stats = score_model(load_finetune, tokens, batch_size, device, keep_top_k=top_k, desc="fine-tune")
    base_stats = score_model(load_base, tokens, batch_size, device, desc="base")
    against = ft_stats.targets if ft_stats is not None else None
    delta_stats = score_model(load_delta, tokens, batch_size, device, against=against, desc="delta")
    kept_k = against.top_k if against is not None else None
    report = FidelityReport(
        samples=s,
        seq_len=t,
        n_tokens=base_stats.n_tokens,
        ppl_base=base_stats.perplexity,
        ppl_delta=delta_stats.perplexity,
        top_k=kept_k,
    )
    if ft_stats is not None:
        report.ppl_finetune = ft_stats.perplexity
        report.kl_mean = delta_stats.mean_kl
        report.kept_logppl = improvement_kept(base_stats.mean_nll, ft_stats.mean_nll, delta_stats.mean_nll)
        report.kept_ppl = improvement_kept(report.ppl_base, report.ppl_finetune, report.ppl_delta)
    return report
