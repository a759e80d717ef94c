"""Teacher next-token distributions, kept compactly, and the KL divergence to them.

A teacher pass (:func:`run_pass` with ``top_k``) keeps, for every position of every sample, either
the **full** log-distribution (when ``S·T·V`` fp32 values fit :data:`FULL_TARGETS_BYTES`, or
``top_k >= V``) or its **top-k**: the ``k`` largest log-probabilities, their token ids, and the log of
the probability of all other tokens together (the *tail*). The teacher model can then be freed
before the student is built.

KL against top-k targets is the exact KL between the two distributions *collapsed* onto
``{top-k tokens} ∪ {tail}``::

    KL_k(p || q) = Σ_{i ∈ top-k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

with ``q_tail = 1 − Σ_{i ∈ top-k} q_i``. It is a lower bound of the full KL (the log-sum inequality)
and equals it when the teacher's tail mass is zero; with ``k = 128`` the tail of a trained LM is
typically a few percent of the mass.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from deltahub import defaults
from deltahub.progress import progress_bar

__all__ = [
    "DEFAULT_TOP_K",
    "FULL_TARGETS_BYTES",
    "TeacherTargets",
    "PassStats",
    "kl_from_targets",
    "run_pass",
    "score_model",
]

#: Tokens of the teacher's distribution kept per position when the full one is too big.
DEFAULT_TOP_K = defaults.DEFAULT_TOP_K
#: Full distributions are kept when they take at most this many bytes (fp32).
FULL_TARGETS_BYTES = 64 << 20
#: Floor of a log-probability (a tail of exactly zero mass), finite so no NaN reaches a gradient.
_LOG_FLOOR = -1.0e4


@dataclass
class TeacherTargets:
    """A teacher's next-token distributions for samples ``[S, T]``.

    Attributes:
        logp: fp32 ``[S, T, k]``: log-probabilities of the kept tokens (``k = V``: all of them).
        index: int64 ``[S, T, k]`` ids of the kept tokens, or ``None`` for the full distribution.
        tail: fp32 ``[S, T]``: log of the probability of every other token, or ``None`` (full).
    """

    logp: torch.Tensor
    index: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    @property
    def top_k(self) -> int | None:
        """``k`` of top-k targets; ``None`` for full distributions."""
        return None if self.index is None else int(self.index.shape[-1])

    def rows(self, sel: torch.Tensor | slice, device: torch.device | str) -> TeacherTargets:
        """The targets of samples ``sel`` on ``device``."""
        return TeacherTargets(
            self.logp[sel].to(device),
            None if self.index is None else self.index[sel].to(device),
            None if self.tail is None else self.tail[sel].to(device),
        )


def kl_from_targets(logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """KL(teacher || student) per position, fp32 ``[B, T]``.

    Args:
        logits: the student's logits ``[B, T, V]`` (any float dtype; computed in fp32).
        targets: the teacher's targets for the same ``B`` samples.
    """
    logq = F.log_softmax(logits.float(), dim=-1)
    logp = targets.logp
    p = logp.exp()
    if targets.index is None:
        return (p * (logp - logq)).sum(-1)
    q_k = logq.gather(-1, targets.index)
    kl = (p * (logp - q_k)).sum(-1)
    assert targets.tail is not None
    # log(1 - Σ q_k) = log(-expm1(logsumexp(log q_k))): precise when the kept mass is small or large.
    q_tail = torch.log((-torch.expm1(torch.logsumexp(q_k, dim=-1))).clamp_min(1e-30))
    p_tail = targets.tail.exp()
    return kl + p_tail * (targets.tail - q_tail)


def _keep(logp: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if top_k is None:
        return logp, None, None
    vals, idx = logp.topk(top_k, dim=-1)
    kept = torch.logsumexp(vals.double(), dim=-1)
    tail = torch.log((-torch.expm1(kept)).clamp_min(0.0)).clamp_min(_LOG_FLOOR).float()
    return vals, idx, tail


def choose_top_k(n_samples: int, seq_len: int, vocab: int, top_k: int = DEFAULT_TOP_K) -> int | None:
    """``None`` (keep full distributions) when they are small enough or ``top_k >= vocab``."""
    if top_k >= vocab or n_samples * seq_len * vocab * 4 <= FULL_TARGETS_BYTES:
        return None
    return top_k


@dataclass
class PassStats:
    """What one pass of a model over samples ``[S, T]`` measured.

    Attributes:
        nll_sum: summed negative log-likelihood (nats) of tokens ``1..T-1`` given their prefix.
        n_tokens: how many tokens were scored, ``S·(T-1)``.
        kl_sum: summed KL(targets || model) over all ``S·T`` positions (when targets were given).
        n_positions: ``S·T``.
        targets: the model's own distributions (when ``top_k`` was asked for).
    """

    nll_sum: float
    n_tokens: int
    kl_sum: float | None = None
    n_positions: int = 0
    targets: TeacherTargets | None = None

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl_sum is None else self.kl_sum / self.n_positions


@torch.inference_mode()
def run_pass(
    model: Any,
    tokens: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    keep_targets: bool = False,
    top_k: int | None = None,
    against: TeacherTargets | None = None,
    desc: str = "score",
) -> PassStats:
    """Run ``model`` over ``tokens`` (int64 ``[S, T]``) in batches, without gradients.

    Measures the NLL of the samples; with ``keep_targets`` keeps the model's distributions (top-k,
    or full when ``top_k`` is ``None``); with ``against`` sums the KL from those targets.
    """
    was_training = model.training
    model.eval()
    s, t = tokens.shape
    nll, kl = 0.0, 0.0
    kept: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    try:
        with progress_bar(s, desc, unit="sample") as bar:
            for start in range(0, s, batch_size):
                x = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=x).logits.float()
                logp = F.log_softmax(logits, dim=-1)
                nll += float(-logp[:, :-1].gather(-1, x[:, 1:, None]).sum())
                if keep_targets:
                    vals, idx, tail = _keep(logp, top_k)
                    kept.append((vals.cpu(), None if idx is None else idx.cpu(), None if tail is None else tail.cpu()))
                if against is not None:
                    kl += float(kl_from_targets(logits, against.rows(slice(start, start + batch_size), device)).sum())
                del logits, logp
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    targets = None
    if keep_targets:
        targets = TeacherTargets(
            torch.cat([k[0] for k in kept]),
            None if top_k is None else torch.cat([k[1] for k in kept]),  # type: ignore[misc]
            None if top_k is None else torch.cat([k[2] for k in kept]),  # type: ignore[misc]
        )
    return PassStats(
        nll_sum=nll,
        n_tokens=s * (t - 1),
        kl_sum=kl if against is not None else None,
        n_positions=s * t,
        targets=targets,
    )


def score_model(
    loader: Callable[[], Any],
    tokens: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    keep_top_k: int | None = None,
    against: TeacherTargets | None = None,
    desc: str = "score",
) -> PassStats:
    """Load a model with ``loader``, :func:`run_pass` it over ``tokens`` (int64 ``[S, T]``), free it.

    ``keep_top_k``: also keep the model's distributions as targets: top-``keep_top_k``, or full when
    :func:`choose_top_k` says so for the model's vocabulary. Only this frame holds the model, so it
    is gone (and its memory collectable) before the caller loads the next one.
    """
    model = loader()
    top_k = None
    if keep_top_k is not None:
        s, t = (int(d) for d in tokens.shape)
        top_k = choose_top_k(s, t, int(model.config.vocab_size), keep_top_k)
    stats = run_pass(
        model, tokens, batch_size, device, keep_targets=keep_top_k is not None, top_k=top_k, against=against, desc=desc
    )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats
