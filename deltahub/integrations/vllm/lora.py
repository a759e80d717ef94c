"""Many fine-tunes per vLLM engine, through vLLM's LoRA request path. **The only module that touches
vLLM internals**; each patched function has its own test (tests/vllm/test_vllm_lora.py).

The engine serves a base's stub folder (``deltahub vllm-prepare BASE DIR``) with ``--enable-lora``; a
request names a fine-tune of that base as its adapter (``LoRARequest(name, id, stub folder of the
fine-tune)``, or ``--lora-modules name=DIR``, or by name alone through :class:`DeltahubResolver`). vLLM's
scheduler, slot manager (``max_loras`` slots in a batch, ``max_cpu_loras`` adapters kept in host
memory, least recently used evicted), per-token slot mapping and prefix cache (keyed by the adapter's
name and path, so never shared across fine-tunes or with the base) stay vLLM's own. Two patches
(supported vLLM: :data:`~.version.SUPPORTED_VLLM`, checked before patching):

* **P1** ``vllm.lora.worker_manager.WorkerLoRAManager._load_adapter(self, lora_request)``: for a
  folder with ``deltahub.json`` it reads the fine-tune from the store (:func:`load_adapter`) and
  returns a ``LoRAModel`` whose per-module ``lora_a`` is the delta's sign planes (int32
  ``[P, n, ceil(K/32)]``) and ``lora_b`` their scales (fp32 ``[P, n, C]``); any other folder goes to
  vLLM's own PEFT loader.
* **P2** ``vllm.lora.utils._all_lora_classes``: each linear LoRA wrapper class (qkv, gate/up, o,
  down, ...) is replaced by a subclass with :class:`DeltaSlots`, which keeps per slot the planes and
  scales and adds, after the base GEMM (and any PEFT adapter), ``Σᵢ (x·S_{t,i}ᵀ) ⊙ s_{t,i}`` to the
  rows of tokens whose slot is ``t`` (``torch.ops.deltahub.multi_tenant_planes_delta``); base rows
  (slot -1) are untouched.

What a LoRA slot cannot carry: deltas of embeddings, the LM head, norms and biases. A fine-tune that
changes any of them is refused as an adapter with a clear error (serve it alone from its own stub
folder, or with ``deltahub serve``'s built-in engine, which applies every tensor per row).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import DeltaHubError, InputError
from deltahub.formats.manifest import ModelKind
from deltahub.ops.vllm_stub import POINTER_FILE, adapter_problems, folder_name, open_stub, planes_plan, read_stub

from .version import UnsupportedVLLMError, check_vllm_version

__all__ = ["AdapterError", "DeltaSlots", "DeltahubResolver", "install_lora_patches", "load_adapter",
           "adapter_slots", "PATCHED"]

logger = logging.getLogger(__name__)

WORD_BITS = 32
#: What :func:`install_lora_patches` replaced, for logs and tests.
PATCHED: list[str] = []
#: vLLM's own ``WorkerLoRAManager._load_adapter`` (P1 hands it every folder that is no deltahub stub).
_vllm_load_adapter: Any = None
#: "1": P1 refuses folders that are no deltahub stub (``deltahub serve --engine vllm`` sets it: with
#: runtime adapter loading on, a client could otherwise name any local PEFT folder, whose ``.bin`` /
#: ``.pt`` files vLLM would unpickle).
ONLY_DELTAHUB_ENV = "DELTAHUB_VLLM_ONLY_DELTAHUB_ADAPTERS"
#: "1": :class:`DeltahubResolver` pulls a requested Hub repo id the store lacks (``--pull``).
PULL_ENV = "DELTAHUB_VLLM_PULL"


class AdapterError(DeltaHubError):
    """A stored model cannot be served as an adapter of this engine."""


# ---------------------------------------------------------------------------------------- engine facts
def _quant(hf_config: Any) -> dict[str, Any] | None:
    """The deltahub ``quantization_config`` of the engine's model config, or None."""
    q = getattr(hf_config, "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else None
    return q if isinstance(q, dict) and q.get("quant_method") == "deltahub" else None


def adapter_slots(hf_config: Any) -> tuple[int, int | None]:
    """``(P, G)`` of the engine's adapter slots: the most sign planes an adapter may bring and its
    scale group (None: one scale per row). From the base's stub (``vllm-prepare --adapter-planes``)."""
    q = _quant(hf_config) or {}
    planes, group = q.get("adapter_planes", 1), q.get("adapter_group")
    return int(planes), (int(group) if group else None)


def _columns(k: int, group: int | None) -> int:
    return 1 if group is None else math.ceil(k / group)


# ---------------------------------------------------------------------------------------- P1: loading
def load_adapter(lora_request: Any, engine_config: Any, wrapped: Callable[[str], str | None]) -> Any:
    """The ``LoRAModel`` of the fine-tune whose stub folder ``lora_request.lora_path`` is.

    Args:
        lora_request: vLLM's ``LoRARequest``. engine_config: the engine model's HF config (its
            deltahub ``quantization_config`` says which base of which store it serves and sizes
            the slots).
        wrapped: a checkpoint module name (``model.layers.0.self_attn.q_proj``) → its name in the
            engine's model when that is a Linear layer it carries adapters for, else None (vLLM
            skips any other module without an error).

    Raises:
        AdapterError: the engine serves no deltahub base, the fine-tune is of another base or
        store, or it changes anything an adapter cannot carry (:func:`adapter_problems`).
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    stub = read_stub(lora_request.lora_path)
    q = _quant(engine_config)
    if q is None or not q.get("manifest"):
        raise AdapterError("this vLLM engine does not serve a deltahub base, so deltahub adapters cannot apply to it",
                           "serve the base's folder: `deltahub vllm-prepare BASE DIR`, then `vllm serve DIR "
                           "--load-format deltahub --enable-lora`")
    if q.get("base_manifest"):
        raise AdapterError("this vLLM engine serves a fine-tune, not a base: an adapter would add to its delta",
                           "serve the base's folder (`deltahub vllm-prepare BASE DIR`) with --enable-lora")
    planes, group = adapter_slots(engine_config)
    if q.get("home") and stub.home != Path(q["home"]):  # one store: its manifest ids name one content
        raise AdapterError(f"{stub.name!r} is prepared from {stub.home}, this engine's base from {q['home']}",
                           "prepare the fine-tune from the store the base was prepared from")
    ctx, source = open_stub(stub)
    try:
        manifest = source.manifest
        if manifest.kind is not ModelKind.DELTA or manifest.base is None or manifest.base.manifest != q["manifest"]:
            raise AdapterError(f"{stub.name!r} is not a fine-tune of the base this engine serves",
                               "serve it on an engine of its own base")
        plan = planes_plan(source)
        problems = adapter_problems(source, plan)
        targets = {n: wrapped(n.rpartition(".")[0]) for n in plan}
        unwrapped = sorted(n for n, t in targets.items() if t is None)
        if unwrapped:
            problems.append(f"this engine carries no adapter for {len(unwrapped)} of its Linear layers, e.g. "
                            f"{', '.join(unwrapped[:3])} (see --lora-target-modules)")
        if problems:
            raise AdapterError(f"{stub.name!r} cannot be served as an adapter: {'; '.join(problems)}",
                               f"serve it alone (`deltahub serve {stub.name} --engine vllm`) or with the built-in "
                               "engine (`deltahub serve`)")
        loras: dict[str, Any] = {}
        with ctx.reading():
            for name in plan:
                rec = manifest.tensors[name]
                layout = rec.impl.planes_layout(tuple(rec.shape), rec.params)
                assert layout is not None  # (in the plan)
                if layout.planes > planes or (layout.columns > 1 and layout.group != group):
                    raise AdapterError(
                        f"{stub.name!r}: {name} has {layout.planes} sign plane(s)"
                        f"{'' if layout.group is None else f' with scales per {layout.group} columns'}; this engine's "
                        f"adapter slots hold {planes}{'' if group is None else f' with groups of {group}'}",
                        f"prepare the base with `deltahub vllm-prepare BASE DIR --adapter-planes {layout.planes}"
                        f"{'' if layout.group is None else f' --adapter-group {layout.group}'} --force`")
                op = rec.impl.operator(source.parts(rec), rec.params, tuple(rec.shape))
                bits = op.bit_planes()
                n, k = (int(d) for d in rec.shape)
                c = _columns(k, group)
                packed = torch.zeros((planes, n, math.ceil(k / WORD_BITS)), dtype=torch.int32)
                scales = torch.zeros((planes, n, c), dtype=torch.float32)
                for i, (p, s) in enumerate(zip(bits.packed, bits.scales, strict=True)):
                    packed[i].copy_(p)
                    scales[i].copy_(s.to(torch.float32).expand(n, c))
                target = targets[name]
                assert target is not None  # (checked above)
                loras[target] = LoRALayerWeights(target, rank=1, lora_alpha=1, lora_a=packed, lora_b=scales,
                                                 scaling=1.0)
        logger.info("deltahub adapter %s: %d Linear delta(s) from %s", stub.name, len(loras), stub.home)
        return LoRAModel(lora_request.lora_int_id, rank=1, loras=loras)
    finally:
        ctx.close()


def _wrapped_by(mgr: Any) -> Callable[[str], str | None]:
    """A checkpoint module name → itself when it is a Linear adapter layer of vLLM's adapter manager
    ``mgr`` (``q_proj`` counts when its fused ``qkv_proj`` is wrapped), else None. A model whose vLLM
    module names differ from its checkpoint's (vLLM's ``hf_to_vllm_mapper`` renames weights, not
    adapter modules) finds none wrapped: its fine-tunes are refused as adapters, never misplaced."""
    modules = getattr(mgr, "modules", {}) or {}
    fused = {shard: name for name, shards in (getattr(mgr, "packed_modules_mapping", {}) or {}).items()
             for shard in shards}

    def wrapped(name: str) -> str | None:
        parent, _, leaf = name.rpartition(".")
        for candidate in (name, f"{parent}.{fused[leaf]}" if leaf in fused else None):
            if candidate is not None and isinstance(modules.get(candidate), DeltaSlots):
                return name
        return None

    return wrapped


# ---------------------------------------------------------------------------------------- P2: layers
class DeltaSlots:
    """Mixed into vLLM's linear LoRA wrappers: per slot ``dh_packed`` int32 ``[slots, P, N, ceil(K/32)]``
    and ``dh_scales`` fp32 ``[slots, P, N, C]`` (``N`` = all output slices, q/k/v or gate/up each at
    its rows). A slot holding a PEFT adapter (or vLLM's warm-up dummy) keeps zero scales."""

    def create_lora_weights(self, max_loras: int, lora_config: Any, model_config: Any = None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)  # type: ignore[misc]
        planes, group = adapter_slots(model_config)
        n, k = sum(self.output_slices), self.input_size  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        self.dh_packed = torch.zeros((max_loras, planes, n, math.ceil(k / WORD_BITS)), dtype=torch.int32, device=device)
        self.dh_scales = torch.zeros((max_loras, planes, n, _columns(k, group)), dtype=torch.float32, device=device)
        self.dh_group = group or 0
        self.dh_active = torch.zeros(max_loras, dtype=torch.bool, device=device)  # slots holding a deltahub delta

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)  # type: ignore[misc]
        self.dh_scales[index] = 0
        self.dh_active[index] = False

    def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
        a_list = lora_a if isinstance(lora_a, list) else [lora_a]
        if not any(a is not None and a.dtype == torch.int32 for a in a_list):  # PEFT, or the warm-up dummy
            self.dh_scales[index] = 0
            self.dh_active[index] = False
            return super().set_lora(index, lora_a, lora_b)  # type: ignore[misc]
        if self.tp_size != 1:  # type: ignore[attr-defined]
            raise AdapterError("deltahub adapters do not split across tensor-parallel ranks yet",
                               "serve with --tensor-parallel-size 1 (scale out with Ray Serve)")
        b_list = lora_b if isinstance(lora_b, list) else [lora_b]
        super().reset_lora(index)  # type: ignore[misc]
        self.dh_scales[index] = 0
        row = 0
        for a, b, size in zip(a_list, b_list, self.output_slices, strict=True):  # type: ignore[attr-defined]
            if a is not None:  # None: the fine-tune leaves this slice (k_proj, say) as the base's
                self.dh_packed[index, :, row:row + size].copy_(a)
                self.dh_scales[index, :, row:row + size].copy_(b)
            row += size
        self.dh_active[index] = True

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # No branch on Python state here: vLLM traces this once (torch.compile, guards dropped) before
        # any adapter is active, so the delta op always runs; inactive slots (dh_active, a tensor) and
        # slot -1 add nothing and cost nothing.
        out = super().apply(x, bias)  # type: ignore[misc]
        x2 = x.reshape(-1, x.shape[-1])
        delta = torch.ops.deltahub.multi_tenant_planes_delta(x2, self.dh_packed, self.dh_scales, self._slots(x2.shape[0]),
                                                             self.dh_active, self.input_size, self.dh_group)  # type: ignore[attr-defined]
        return out + delta.to(out.dtype).view(out.shape)

    def _slots(self, m: int) -> torch.Tensor:
        """The adapter slot of each of the ``m`` rows (-1: base): vLLM's static per-token buffer (rows
        past this step's tokens are padding, whose output is discarded), else its current view."""
        punica = self.punica_wrapper  # type: ignore[attr-defined]
        static = getattr(punica, "_token_lora_indices", None)
        if static is not None and static.shape[0] >= m:
            return static[:m]
        slot = punica.token_lora_indices
        return torch.cat([slot, slot.new_full((max(0, m - slot.shape[0]),), -1)])[:m]


# ---------------------------------------------------------------------------------------- install
def _check_signatures() -> None:
    """The internals patched here, as this module expects them (else a clear refusal, not a crash)."""
    import vllm.lora.utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.worker_manager import WorkerLoRAManager

    want = {
        WorkerLoRAManager._load_adapter: ["self", "lora_request"],
        BaseLinearLayerWithLoRA.create_lora_weights: ["self", "max_loras", "lora_config", "model_config"],
        BaseLinearLayerWithLoRA.set_lora: ["self", "index", "lora_a", "lora_b"],
        BaseLinearLayerWithLoRA.reset_lora: ["self", "index"],
        BaseLinearLayerWithLoRA.apply: ["self", "x", "bias"],
    }
    for fn, params in want.items():
        if list(inspect.signature(fn).parameters) != params:
            raise UnsupportedVLLMError(f"vLLM's {fn.__qualname__} is not the one deltahub's adapter patch expects",
                                       "install a supported vLLM release (see deltahub.integrations.vllm.SUPPORTED_VLLM)")
    if not isinstance(getattr(lora_utils, "_all_lora_classes", None), tuple):
        raise UnsupportedVLLMError("vLLM's vllm.lora.utils._all_lora_classes is not a tuple",
                                   "install a supported vLLM release (see deltahub.integrations.vllm.SUPPORTED_VLLM)")


def install_lora_patches(version: str | None = None) -> list[str]:
    """Install P1 and P2 (idempotent). Raises :class:`UnsupportedVLLMError` on another vLLM."""
    check_vllm_version(version)
    if PATCHED:
        return PATCHED
    _check_signatures()
    import vllm.lora.utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.worker_manager import WorkerLoRAManager

    global _vllm_load_adapter
    _vllm_load_adapter = WorkerLoRAManager._load_adapter

    def _load_adapter(self: Any, lora_request: Any) -> Any:
        if not (Path(lora_request.lora_path) / POINTER_FILE).is_file():
            if os.environ.get(ONLY_DELTAHUB_ENV) == "1":
                raise AdapterError(f"{lora_request.lora_path} is not a deltahub adapter folder, and this engine serves "
                                   "deltahub adapters only", "name a stored fine-tune of the served base")
            return _vllm_load_adapter(self, lora_request)  # a PEFT adapter: vLLM's own loader
        mgr = self._adapter_manager
        return load_adapter(lora_request, getattr(mgr.model, "config", None), _wrapped_by(mgr))

    _load_adapter.__wrapped__ = _vllm_load_adapter  # type: ignore[attr-defined]
    WorkerLoRAManager._load_adapter = _load_adapter  # type: ignore[method-assign]

    def with_slots(cls: type) -> type:
        if issubclass(cls, BaseLinearLayerWithLoRA) and not issubclass(cls, DeltaSlots):
            return type(f"Deltahub{cls.__name__}", (DeltaSlots, cls), {"__module__": __name__})
        return cls

    lora_utils._all_lora_classes = tuple(with_slots(c) for c in lora_utils._all_lora_classes)
    PATCHED.extend(["vllm.lora.worker_manager.WorkerLoRAManager._load_adapter", "vllm.lora.utils._all_lora_classes"])
    logger.debug("deltahub adapter patches installed: %s", ", ".join(PATCHED))
    return PATCHED


# ---------------------------------------------------------------------------------------- by name
def adapters_dir() -> Path:
    """Where stub folders of adapters resolved by name are written (``DELTAHUB_VLLM_ADAPTERS``, else a
    folder of this user's in the temporary directory), created private (0700) and checked to be this
    user's real folder: in a shared temporary directory another user could plant one."""
    path = Path(os.environ.get("DELTAHUB_VLLM_ADAPTERS") or
                Path(tempfile.gettempdir()) / f"deltahub-vllm-adapters-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AdapterError(f"{path} is not a private folder of this user (a link, another owner, or open to others)",
                           "remove it, or set DELTAHUB_VLLM_ADAPTERS to a private folder")
    return path


class DeltahubResolver:
    """A vLLM ``LoRAResolver`` (public API; used when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``): a
    request naming a stored fine-tune of the served base loads it as an adapter; with
    ``DELTAHUB_VLLM_PULL=1`` a Hub repo id the store lacks is pulled first. Its stub folder is named
    after the manifest (``NAME-<manifest id>``), so a re-pointed name is a new adapter, never a stale
    prefix cache."""

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        return await asyncio.to_thread(self._resolve, base_model_name, lora_name)

    def _resolve(self, base_model_name: str, lora_name: str) -> Any:
        from vllm.lora.request import LoRARequest

        from deltahub.ops.context import StoreContext
        from deltahub.ops.vllm_stub import prepare

        try:
            base = read_stub(base_model_name)
        except InputError:
            return None  # not a deltahub engine
        ctx = StoreContext(base.home)
        try:
            try:
                entry = ctx.index.get_name(lora_name)
            except DeltaHubError:  # not a valid store name (a repo id with its owner, say)
                entry = None
            stored = lora_name
            if entry is None:
                from deltahub.ops.pull import looks_like_repo_id, pull

                if os.environ.get(PULL_ENV) != "1" or not looks_like_repo_id(lora_name):
                    return None

                logger.info("pulling %s from the Hub", lora_name)
                try:
                    stored = pull(ctx, lora_name).name
                except DeltaHubError as exc:
                    logger.info("%s: not pulled (%s)", lora_name, exc)
                    return None
            resolved = ctx.resolve(stored)
            m = resolved.manifest
            if m.kind is not ModelKind.DELTA or m.base is None or m.base.manifest != base.manifest:
                logger.info("%s is not a fine-tune of the served base; not loaded as an adapter", lora_name)
                return None
            folder = adapters_dir() / folder_name(lora_name, resolved.manifest_id)
            current = None
            if (folder / POINTER_FILE).is_file():
                try:
                    current = read_stub(folder)
                except InputError:
                    current = None
            if current is None or current.manifest != resolved.manifest_id or current.home != base.home:
                prepare(ctx, stored, folder, force=True, resolved=resolved)
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))
        finally:
            ctx.close()


def register_resolver() -> None:
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    cls = type("DeltahubLoRAResolver", (DeltahubResolver, LoRAResolver), {"__module__": __name__})
    LoRAResolverRegistry.register_resolver("deltahub", cls())
