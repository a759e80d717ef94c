"""Scale calibration by distillation (BitDelta's second stage), on a student built in delta mode.

The student is the base model with every weight stored by a codec with scales (``sign1``:
packed signs and one fp32 scale; ``planes``: k sign planes, each with an fp32 scale tensor per matrix,
row or group) applied through a :class:`~deltahub.runtime.DeltaLinear` /
:class:`~deltahub.runtime.DeltaEmbedding`. **Only those scales are trained** (the operators'
``trainable()`` parameters: 0-d codec parameters and scale-tensor parts): every other parameter
(embeddings and norms stored dense, biases, the base weights, LM heads) is frozen, which
:func:`freeze_all_but` enforces and :func:`calibrate_scales` checks. The loss is the KL divergence from the teacher's next-token
distribution (:func:`deltahub.calibrate.targets.kl_from_targets`), averaged over positions; the
teacher's distributions were computed beforehand, so the teacher is not in memory.

Optimizer: Adam, one parameter group per scale with learning rate ``lr · |s₀|`` (``s₀`` the scale
before calibration): Adam's steps are about ``lr`` in size whatever the gradient's magnitude, so
``lr`` is a *relative* step (``0.01``: about 1 % of the scale per step), the same for a 135M and a 70B
model whose scales differ by orders of magnitude. A scale *tensor* gets the same relative step per
element: its group runs at ``lr`` and each element's Adam step is multiplied by ``|s₀|`` of that
element (a scale that starts at 0 stays 0), then clamped at 0 (scales are magnitudes). The rate decays with a half cosine to 10 % over the
steps. The student runs in eval mode (no dropout), batches are drawn from a permutation of the
samples seeded with ``seed``: the same inputs give the same scales.

Should training end with a higher loss on the calibration samples than it started with, the initial
scales are restored (``result.reverted``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltahub.calibrate.targets import TeacherTargets, kl_from_targets, run_pass
from deltahub.errors import DeltaHubError
from deltahub.progress import progress_bar
from deltahub.runtime import DeltaEmbedding, DeltaLinear

__all__ = [
    "DistillConfig",
    "DistillResult",
    "delta_scales",
    "freeze_all_but",
    "calibrate_scales",
    "mean_kl",
]

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Training settings (defaults work without tuning on the models tried: see docs/design.md)."""

    steps: int = 100
    lr: float = 0.01
    batch_size: int = 4
    seed: int = 0
    device: str = "cpu"


@dataclass
class DistillResult:
    """The outcome of :func:`calibrate_scales`.

    Attributes:
        loss_before / loss_after: mean KL (nats per position) on all calibration samples.
        initial / final: per key of :func:`delta_scales`: a 0-d scale as a Python float (fp32 value),
            a scale tensor as an fp32 CPU tensor of its part's shape.
        losses: the training loss of every step (one batch each).
        reverted: the final loss was not lower, so the initial scales were kept.
    """

    loss_before: float
    loss_after: float
    initial: dict[str, float | torch.Tensor]
    final: dict[str, float | torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    reverted: bool = False


def delta_scales(model: nn.Module, sign1_names: set[str] | None = None) -> dict[str, nn.Parameter]:
    """Key → trainable parameter (a codec's scale) of every delta module of ``model``.

    The key is the stored tensor's name (the module's path plus ``.weight``) for a parameter named
    ``scale``, ``<tensor>#<param>`` for any other trainable parameter of the module's delta operator
    (a codec parameter or, e.g. ``model.layers.0.mlp.up_proj.weight#scales1``, a trainable part).
    A parameter shared by several modules (a tied LM head) appears once, under the name in
    ``sign1_names`` (the tensors to train) when given.
    """
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, DeltaLinear | DeltaEmbedding):
            continue
        tname = f"{mname}.weight" if mname else "weight"
        if sign1_names is not None and tname not in sign1_names:
            continue
        for pname, param in module.delta.trainable().items():
            found.setdefault(id(param), (tname if pname == "scale" else f"{tname}#{pname}", param))
    return {key: p for key, p in sorted(found.values(), key=lambda item: item[0])}


def _value(p: torch.Tensor) -> float | torch.Tensor:
    """A trained parameter's value: a Python float for a 0-d scale, an fp32 CPU copy of a tensor."""
    return float(p.detach()) if p.dim() == 0 else p.detach().to("cpu", torch.float32).clone()


def freeze_all_but(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    """``requires_grad`` off for every parameter of ``model`` except ``trainable``."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for p in trainable:
        p.requires_grad_(True)


def mean_kl(model: Any, tokens: torch.Tensor, targets: TeacherTargets, batch_size: int, device: str) -> float:
    """Mean KL(targets || model) over every position of ``tokens`` ``[S, T]`` (no gradients)."""
    stats = run_pass(model, tokens, batch_size, device, against=targets, desc="distillation loss")
    assert stats.mean_kl is not None
    return stats.mean_kl


def _lr_factor(step: int, steps: int) -> float:
    """Half-cosine decay from 1 to 0.1 over ``steps``."""
    if steps <= 1:
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


def calibrate_scales(
    student: nn.Module,
    scales: dict[str, nn.Parameter],
    tokens: torch.Tensor,
    targets: TeacherTargets,
    config: DistillConfig,
) -> DistillResult:
    """Train ``scales`` (and nothing else) of ``student`` to match ``targets`` on ``tokens``.

    Args:
        student: the delta-mode model, on ``config.device``.
        scales: from :func:`delta_scales`; fp32 parameters, 0-d (codec parameters) or of a part's
            shape (scale tensors).
        tokens: int64 ``[S, T]`` calibration samples.
        targets: the teacher's distributions for ``tokens`` (kept on the CPU; moved per batch).
    """
    if not scales:
        raise ValueError("no scales to calibrate")
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    params = list(scales.values())
    freeze_all_but(student, params)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != {id(p) for p in params}:  # a real check: asserts vanish under -O
        raise DeltaHubError(
            f"calibration would train {len(trainable)} parameters of the model, which are not exactly "
            f"its {len(params)} delta scales",
            "only the delta scales may be trained; report this as a bug in deltahub",
        )
    initial = {name: _value(p) for name, p in scales.items()}
    # 0-d: Adam at lr·|s₀|. Tensors: Adam at lr, each element's step then multiplied by its |s₀|.
    rel_step = {name: initial[name].abs() for name, p in scales.items() if p.dim() > 0}  # type: ignore[union-attr]
    base_lrs = [config.lr if name in rel_step else config.lr * max(abs(initial[name]), 1e-12) for name in scales]  # type: ignore[arg-type]
    opt = torch.optim.Adam(
        [{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], betas=(0.9, 0.999), eps=1e-12
    )
    tensors = [(p, rel_step[name].to(p.device)) for name, p in scales.items() if name in rel_step]
    batch = max(1, min(config.batch_size, int(tokens.shape[0])))
    loss_before = mean_kl(student, tokens, targets, batch, config.device)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    student.eval()  # no dropout: the student must be a deterministic function of its scales
    with progress_bar(config.steps, "calibrate", unit="step") as bar:
        for step in range(config.steps):
            if len(order) < batch:
                order += torch.randperm(int(tokens.shape[0]), generator=gen).tolist()
            sel = torch.tensor(order[:batch])
            del order[:batch]
            factor = _lr_factor(step, config.steps)
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * factor
            x = tokens[sel].to(config.device)
            logits = student(input_ids=x).logits
            loss = kl_from_targets(logits, targets.rows(sel, config.device)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = [p.detach().clone() for p, _ in tensors]
            opt.step()
            with torch.no_grad():
                for (p, rel), b in zip(tensors, before):
                    p.copy_(b.addcmul_(p - b, rel).clamp_(min=0.0))
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            del logits, loss
    for p in params:
        p.requires_grad_(False)
    loss_after = mean_kl(student, tokens, targets, batch, config.device)
    reverted = False
    if not loss_after < loss_before:
        logger.warning(
            "calibration did not lower the loss (%.5f -> %.5f); keeping the initial scales", loss_before, loss_after
        )
        with torch.no_grad():
            for name, p in scales.items():
                v = initial[name]
                if isinstance(v, torch.Tensor):
                    p.copy_(v)
                else:
                    p.fill_(v)
        loss_after, reverted = loss_before, True
    final = {name: _value(p) for name, p in scales.items()}
    logger.info("calibrated %d scales in %d steps: loss %.5f -> %.5f", len(scales), config.steps, loss_before, loss_after)
    return DistillResult(
        loss_before=loss_before,
        loss_after=loss_after,
        initial=initial,
        final=final,
        losses=losses,
        seconds=time.perf_counter() - t0,
        reverted=reverted,
    )
