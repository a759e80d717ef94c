"""Serving stored fine-tunes: a multi-tenant model (one base, many deltas) and text generation.

* :func:`load_multi_tenant` — one base model in memory plus the packed deltas of any number of
  stored fine-tunes of that base; every row of a batch picks its fine-tune (or the base).
* :func:`generate` — ``(name, prompt)`` pairs to generated texts, in delta mode (one multi-tenant
  batch) or materialize mode (each fine-tune rebuilt in full and run on its own).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deltahub import defaults
from deltahub.errors import IncompatibleBaseError, InputError, NameNotFoundError, WrongBaseError
from deltahub.formats.manifest import ModelKind
from deltahub.formats.safetensors_io import dtype_from_name
from deltahub.ops.context import Resolved, StoreContext
from deltahub.ops.load import (
    TOKENIZER_FILES,
    LoadMode,
    load_model,
    load_tokenizer,
    materialized_model,
    parse_mode,
    tokenizer_of,
)
from deltahub.ops.materialize import parse_output_dtype
from deltahub.ops.reconstruct import ModelSource
from deltahub.runtime import choose_backend
from deltahub.runtime.multi_tenant import BASE, TenantError, TenantModel, TensorChange, install_tenants

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = defaults.DEFAULT_MAX_NEW_TOKENS


@dataclass
class Generation:
    """One generated continuation."""

    name: str
    prompt: str
    text: str
    tokens: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MultiTenantModel:
    """One base model serving several stored fine-tunes of it, row by row.

    ``names`` are the fine-tunes in tenant order (tenant ``t`` is ``names[t]``); the base is tenant
    ``-1`` and can also be named by any of its store names (``base_names``).

    >>> mt = deltahub.load_multi_tenant(["chat", "code"])
    >>> mt.generate([("chat", "Hello"), ("code", "def f("), ("llama-base", "Once")])
    """

    def __init__(
        self, tenants: TenantModel, tokenizer: Any | None, base_id: str, base_names: Sequence[str]
    ) -> None:
        self.tenants = tenants
        self.tokenizer = tokenizer
        self.base_id = base_id
        self.base_names = list(base_names)

    @property
    def model(self) -> Any:
        """The underlying transformers model (set tenant ids with :meth:`use` around calls)."""
        return self.tenants.model

    @property
    def names(self) -> list[str]:
        return list(self.tenants.names)

    def tenant_id(self, name: str | int | None) -> int:
        """``name`` → tenant id (``-1``/``None``/a base name: the base)."""
        if name is None:
            return BASE
        if isinstance(name, int):
            if not BASE <= name < len(self.tenants.names):
                raise InputError(f"tenant id {name} is out of range", f"use -1 .. {len(self.tenants.names) - 1}")
            return name
        if name in self.tenants.names:
            return self.tenants.names.index(name)
        if name in self.base_names:
            return BASE
        raise NameNotFoundError(
            f"{name!r} is not served by this multi-tenant model",
            f"load it with load_multi_tenant (served: {', '.join(self.tenants.names + self.base_names)})",
        )

    def use(self, tenants: Sequence[str | int | None]):
        """Context manager: batch row ``b`` uses ``tenants[b]`` in the enclosed model calls."""
        return self.tenants.use([self.tenant_id(t) for t in tenants])

    def __call__(self, input_ids: torch.Tensor, tenants: Sequence[str | int | None], **kwargs: Any) -> Any:
        """Forward pass (e.g. ``.logits``) with row ``b`` of ``input_ids`` using ``tenants[b]``."""
        with torch.no_grad(), self.use(tenants):
            return self.model(input_ids, **kwargs)

    def generate_ids(
        self,
        pairs: Sequence[tuple[str | int | None, str]],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        **kwargs: Any,
    ) -> list[list[int]]:
        """New token ids for each ``(name, prompt)`` (greedy unless ``do_sample``), in one batch."""
        ids = [self.tenant_id(name) for name, _ in pairs]
        prompts = [prompt for _, prompt in pairs]
        if self.tokenizer is None:
            raise InputError(
                "the served models were stored without tokenizer files", "call the model on token ids instead"
            )
        return _generate(
            lambda input_ids, **kw: self.tenants.generate(input_ids, ids, **kw),
            self.tokenizer,
            prompts,
            max_new_tokens,
            do_sample,
            self.model.device,
            **kwargs,
        )

    def generate(
        self,
        pairs: Sequence[tuple[str | int | None, str]],
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        do_sample: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """The generated text for each ``(name, prompt)`` pair, all rows in one batch.

        Prompts are left-padded; ``kwargs`` go to transformers' ``generate`` (``temperature``,
        ``top_p``, ``min_new_tokens``, …)."""
        tokens = self.generate_ids(pairs, max_new_tokens, do_sample, **kwargs)
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _generate(
    run: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    do_sample: bool,
    device: torch.device,
    **kwargs: Any,
) -> list[list[int]]:
    """Left-pad ``prompts``, call ``run(input_ids, attention_mask=…, …)`` (a ``generate``), and return
    each row's new tokens up to (not including) the first end-of-sequence token."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", "pass a positive number")
    if not prompts:
        return []
    pad = _pad_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise InputError("an empty prompt gives no tokens to start from", "give every prompt some text")
    width = max(len(e) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e) :] = 1
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = run(
            input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=pad,
            **kwargs,
        )
    results = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        results.append(row)
    return results


def _names_of(ctx: StoreContext, manifest_id: str) -> list[str]:
    return ctx.index.names_of(manifest_id)


def load_multi_tenant(
    ctx: StoreContext,
    names: Sequence[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = defaults.DEFAULT_DEVICE,
    verify: bool = True,
) -> MultiTenantModel:
    """One base model plus the deltas of ``names`` (all of the same base; a name of the base itself
    is accepted and means the base rows). Sign deltas stay packed; per-tenant dense tensors (norms,
    biases, dense embeddings) are applied per row."""
    if not names:
        raise InputError("no models to serve", "name at least one stored fine-tune")
    with ctx.reading():  # gc waits until every object is read
        return _load_multi_tenant(ctx, names, dtype, device, verify)


def _load_multi_tenant(
    ctx: StoreContext, names: Sequence[str], dtype: str | torch.dtype | None, device: str | torch.device, verify: bool
) -> MultiTenantModel:
    out_dtype = parse_output_dtype(dtype)
    resolved: list[Resolved] = []
    base: tuple[str, Any] | None = None
    base_from: str | None = None
    for name in dict.fromkeys(names):  # keep order, drop repeats
        r = ctx.resolve(name)
        if r.manifest.kind is ModelKind.DELTA:
            base_id, base_manifest = ctx.base_of(r.manifest)
        else:
            base_id, base_manifest = r.manifest_id, r.manifest
        if base is None:
            base, base_from = (base_id, base_manifest), name
        elif base[0] != base_id:
            raise WrongBaseError(
                f"{name!r} is {'a delta of ' if r.manifest.kind is ModelKind.DELTA else ''}another base "
                f"({base_id[:12]}) than {base_from!r} ({base[0][:12]})",
                "serve together only fine-tunes of the same base",
            )
        if r.manifest.kind is ModelKind.DELTA:
            resolved.append(r)
    assert base is not None
    base_id, base_manifest = base
    model, base_source, base_names = load_base_model(ctx, base_id, base_manifest, out_dtype, verify)
    label = base_source.resolved.name
    changes = [tenant_changes(ctx, r, base_manifest, verify) for r in resolved]
    try:
        state = install_tenants(model, changes)
    except TenantError as exc:
        raise IncompatibleBaseError(str(exc), "serve fine-tunes with the base's tensor shapes only") from None
    model.to(device)
    choose_backend(torch.device(device))
    source_tok = base_source
    if not any(f in base_manifest.files for f in TOKENIZER_FILES) and resolved:
        source_tok = ModelSource(ctx, resolved[0], None, verify)
    tokenizer = None
    if any(f in source_tok.manifest.files for f in TOKENIZER_FILES):
        tokenizer = tokenizer_of(source_tok, label)
        tokenizer.padding_side = "left"
    return MultiTenantModel(TenantModel(model, state, [r.name for r in resolved]), tokenizer, base_id, base_names)


def load_base_model(
    ctx: StoreContext, base_id: str, base_manifest: Any, dtype: torch.dtype | None, verify: bool
) -> tuple[Any, ModelSource, list[str]]:
    """The base ``base_id`` as a transformers model (in ``dtype``, else its own), its source (named
    after its first store name) and its store names. The caller holds ``ctx.reading()``."""
    base_names = _names_of(ctx, base_id)
    label = base_names[0] if base_names else base_id[:12]
    source = ModelSource(ctx, Resolved(label, base_id, base_manifest), None, verify)
    return materialized_model(source, label, dtype or source.default_dtype()), source, base_names


def tenant_changes(ctx: StoreContext, r: Resolved, base_manifest: Any, verify: bool) -> dict[str, TensorChange]:
    """The tensors of delta ``r`` that differ from its base: a codec's operator (packed signs stay
    packed), or the tenant's own tensor for codecs without one (``dense``)."""
    out: dict[str, TensorChange] = {}
    source = ModelSource(ctx, r, base_manifest, verify)
    for name, rec in sorted(r.manifest.tensors.items()):
        if not rec.parts:  # same: the base's tensor
            continue
        brec = base_manifest.tensors.get(name)
        if brec is None or tuple(brec.shape) != tuple(rec.shape):
            raise IncompatibleBaseError(
                f"{r.name!r}: tensor {name!r} has shape {list(rec.shape)}, the base "
                f"{list(brec.shape) if brec else 'lacks it'}",
                "a fine-tune with a resized vocabulary or new tensors cannot share the base's "
                "batch; use `deltahub generate --mode materialize` or load_model(mode='delta')",
            )
        op = rec.impl.operator(source.parts(rec, owned=True), rec.params, rec.shape) if rec.impl.uses_base else None
        if op is not None:
            out[name] = TensorChange(op=op)
        else:
            out[name] = TensorChange(tensor=source.tensor(name, dtype_from_name(rec.dtype)))
    return out


def generate(
    ctx: StoreContext,
    pairs: Sequence[tuple[str, str]],
    mode: str | LoadMode | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = defaults.DEFAULT_DEVICE,
    do_sample: bool = False,
    **kwargs: Any,
) -> list[Generation]:
    """Generate a continuation for each ``(name, prompt)``.

    ``mode`` ``"delta"`` (the default for several pairs) serves all pairs in one multi-tenant batch;
    ``"materialize"`` (the default for one pair) rebuilds each fine-tune in full and runs it on its
    own. For a single pair, ``"delta"`` loads that fine-tune with ``load_model(mode="delta")``.
    """
    if not pairs:
        raise InputError("nothing to generate", "give a model name and a prompt")
    chosen = parse_mode(mode) if mode is not None else (LoadMode.MATERIALIZE if len(pairs) == 1 else LoadMode.DELTA)
    if chosen is LoadMode.DELTA and len(pairs) > 1:
        mt = load_multi_tenant(ctx, [n for n, _ in pairs], dtype=dtype, device=device)
        tokens = mt.generate_ids(pairs, max_new_tokens, do_sample, **kwargs)
        tok = mt.tokenizer
        return [
            Generation(n, p, tok.decode(t, skip_special_tokens=True), t) for (n, p), t in zip(pairs, tokens)
        ]
    results = []
    for name, prompt in pairs:
        model = load_model(ctx, name, dtype=dtype, device=device, mode=chosen)
        tok = load_tokenizer(ctx, name)
        [t] = _generate(model.generate, tok, [prompt], max_new_tokens, do_sample, model.device, **kwargs)
        results.append(Generation(name, prompt, tok.decode(t, skip_special_tokens=True), t))
        del model
    return results
