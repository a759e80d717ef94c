"""Model surgery: put delta modules in place of a transformers model's linear and embedding layers.

Given a model loaded with the *base's* values for some weights, and for each of those weights its
packed signs and scale (codec ``sign1``), :func:`install_sign_deltas` replaces

* every ``nn.Linear`` owning such a weight by a :class:`DeltaLinear` (the same base tensor, no copy);
* every GPT-2 style ``Conv1D`` (weight stored ``[in, out]``) by a :class:`DeltaLinear` over the
  transposed weight, with the signs re-packed along the input axis (:func:`transpose_packed`);
* every ``nn.Embedding`` by a :class:`DeltaEmbedding` (base rows plus scaled sign rows per lookup).

Tied weights (e.g. GPT-2's ``lm_head`` sharing ``wte``) are found by parameter identity: all owners of
one weight share its base tensor, its packed signs and one scale parameter. A weight owned by any
other kind of module is reported back (the caller materializes that one tensor).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from deltahub.codec.packing import WORD_BITS
from deltahub.runtime import signs
from deltahub.runtime.delta_linear import DeltaEmbedding, DeltaLinear

__all__ = ["SignDelta", "install_sign_deltas", "transpose_packed", "is_conv1d", "module_owners", "set_module"]

logger = logging.getLogger(__name__)


@dataclass
class SignDelta:
    """The ``sign1`` delta of one stored tensor ``[R, C]``: int32 ``packed`` ``[R, ceil(C/32)]``
    (packed along the stored tensor's last axis) and its fp32 ``scale``."""

    packed: Tensor
    scale: float


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


def transpose_packed(packed: Tensor, rows: int, cols: int) -> Tensor:
    """Re-pack signs of an ``[R, C]`` matrix packed along C as its transpose ``[C, R]`` packed along R.

    Args:
        packed: int32 ``[R, ceil(C/32)]`` (layout v1). rows: ``R``. cols: ``C``.

    Returns:
        int32 ``[C, ceil(R/32)]`` (layout v1, zero padding bits). Works in blocks of rows, so the
        temporaries stay bounded by :data:`deltahub.runtime.signs.CHUNK_BYTES` (at least 8 rows).
    """
    out_words = -(-rows // WORD_BITS)
    out = torch.zeros((cols, out_words), dtype=torch.int32)
    out_bytes = out.numpy().view(np.uint8)  # [C, 4*out_words]
    block = max(8, (signs.CHUNK_BYTES // max(1, 3 * cols)) // 8 * 8)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        bits = (signs.unpack_rows(packed[r0:r1], cols, torch.int8) > 0).numpy()  # bool [r, C]
        packed_t = np.packbits(bits.T, axis=-1, bitorder="little")  # uint8 [C, ceil(r/8)]
        out_bytes[:, r0 // 8 : r0 // 8 + packed_t.shape[1]] = packed_t
    return out


def install_sign_deltas(
    model: nn.Module, deltas: dict[str, SignDelta], trainable_scales: bool = False
) -> list[str]:
    """Replace the modules owning the weights named in ``deltas`` by delta modules.

    Args:
        model: a model whose tensors named in ``deltas`` hold the base's values.
        deltas: tensor name (as in the checkpoint, e.g. ``model.layers.0.mlp.up_proj.weight``) →
            its signs and scale.
        trainable_scales: give the scale parameters ``requires_grad=True``.

    Returns:
        The names whose owners are not ``Linear``/``Conv1D``/``Embedding`` modules (or are tied in a
        way this cannot share): nothing was changed for them; the caller materializes them.
    """
    owners = module_owners(model)
    leftover: list[str] = []
    for name, delta in deltas.items():
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
            packed = delta.packed.to(m.weight.device)
            if is_conv1d(m):
                weight = m.weight.detach().t().contiguous()  # [out, in]
                packed_t = transpose_packed(delta.packed, weight.shape[1], weight.shape[0])
                new = DeltaLinear(weight, packed_t.to(weight.device), delta.scale, bias=m.bias,
                                  trainable_scale=trainable_scales)
            elif isinstance(m, nn.Embedding):
                new = DeltaEmbedding.from_embedding(m, packed, delta.scale, trainable_scale=trainable_scales)
            else:
                new = DeltaLinear.from_linear(m, packed, delta.scale, trainable_scale=trainable_scales)
            if first is None:
                first = new
            else:  # tied owners share one weight, one packed tensor and one scale parameter
                new.weight = first.weight
                new.packed = first.packed
                new.scale = first.scale
            set_module(model, n, new)
        logger.debug("delta module for %s (%d owner(s))", name, len(mods))
    return leftover
