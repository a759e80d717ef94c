"""Model surgery: put delta modules in place of a transformers model's linear and embedding layers.

Given a model loaded with the *base's* values for some weights, and for each of those weights its
codec's :class:`~deltahub.codec.DeltaOperator` (``sign1``: packed signs and a scale),
:func:`install_deltas` replaces

* every ``nn.Linear`` owning such a weight by a :class:`DeltaLinear` (the same base tensor, no copy);
* every GPT-2 style ``Conv1D`` (weight stored ``[in, out]``) by a :class:`DeltaLinear` over the
  transposed weight and the operator of ``Δᵀ`` (``sign1``: the signs re-packed along the input axis,
  :func:`transpose_packed`);
* every ``nn.Embedding`` by a :class:`DeltaEmbedding` (base rows plus the delta's rows per lookup).

Tied weights (e.g. GPT-2's ``lm_head`` sharing ``wte``) are found by parameter identity: all owners of
one weight share its base tensor and one operator (one scale parameter). A weight owned by any
other kind of module is reported back (the caller materializes that one tensor).
"""

from __future__ import annotations

import logging
from torch import nn

from deltahub.codec import DeltaOperator
from deltahub.codec.sign_apply import transpose_packed
from deltahub.runtime.delta_linear import DeltaEmbedding, DeltaLinear

__all__ = ["install_deltas", "transpose_packed", "is_conv1d", "module_owners", "set_module"]

logger = logging.getLogger(__name__)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (``y = x·W + b`` with ``W`` ``[in, out]``), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def module_owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(parameter or buffer)`` → every ``(module name, attribute)`` holding it (ties included)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                entry = (mname, attr)
                lst = owners.setdefault(id(t), [])
                if entry not in lst:
                    lst.append(entry)
    return owners


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``model``'s submodule ``name`` (a dotted path)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def install_deltas(
    model: nn.Module, deltas: dict[str, DeltaOperator], trainable_scales: bool = False
) -> list[str]:
    """Replace the modules owning the weights named in ``deltas`` by delta modules.

    Args:
        model: a model whose tensors named in ``deltas`` hold the base's values.
        deltas: tensor name (as in the checkpoint, e.g. ``model.layers.0.mlp.up_proj.weight``) →
            its codec's operator (of the stored tensor's shape).
        trainable_scales: give the operators' trainable parameters ``requires_grad=True``.

    Returns:
        The names whose owners are not ``Linear``/``Conv1D``/``Embedding`` modules (or are tied in a
        way this cannot share): nothing was changed for them; the caller materializes them.
    """
    owners = module_owners(model)
    leftover: list[str] = []
    for name, op in deltas.items():
        mname, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            leftover.append(name)
            continue
        param = module._parameters.get(attr)
        if attr != "weight" or param is None:
            leftover.append(name)
            continue
        tied = owners.get(id(param), [(mname, attr)])
        mods = [(n, model.get_submodule(n) if n else model) for n, a in tied]
        if any(a != "weight" for _, a in tied) or not all(
            isinstance(m, nn.Linear | nn.Embedding) or (is_conv1d(m) and len(mods) == 1) for _, m in mods
        ):
            leftover.append(name)
            continue
        first: DeltaLinear | DeltaEmbedding | None = None
        for n, m in mods:
            new: DeltaLinear | DeltaEmbedding
            if first is not None:  # tied owners share one weight and one operator (one scale)
                new = (DeltaEmbedding.from_embedding(m, first.delta) if isinstance(m, nn.Embedding)
                       else DeltaLinear.from_linear(m, first.delta))
                new.weight = first.weight
            elif is_conv1d(m):
                weight = m.weight.detach().t().contiguous()  # [out, in]
                new = DeltaLinear(weight, op.transposed().to(weight.device), bias=m.bias, trainable_scale=trainable_scales)
            elif isinstance(m, nn.Embedding):
                new = DeltaEmbedding.from_embedding(m, op.to(m.weight.device), trainable_scale=trainable_scales)
            else:
                new = DeltaLinear.from_linear(m, op.to(m.weight.device), trainable_scale=trainable_scales)
            if first is None:
                first = new
            set_module(model, n, new)
        logger.debug("delta module for %s (%d owner(s))", name, len(mods))
    return leftover
