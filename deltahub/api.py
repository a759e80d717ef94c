"""The public Python API.

    >>> import deltahub
    >>> store = deltahub.Store()                      # $DELTAHUB_HOME or ~/.cache/deltahub
    >>> store.add("path/to/base", name="llama-base")
    >>> store.compress("path/to/finetune", base="llama-base", name="llama-chat")
    >>> store.materialize("llama-chat", "out/", dtype="bfloat16")
    >>> model = deltahub.load_model("llama-chat")     # a transformers model, no checkpoint written
    >>> tok = deltahub.load_tokenizer("llama-chat")
"""

from __future__ import annotations

import operator

from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deltahub import defaults
from deltahub._version import __version__
from deltahub.config import debug_enabled
from deltahub.errors import DeltaHubError, InputError
from deltahub.fileio import disk_full_error, human_bytes, is_disk_full, parse_size

if TYPE_CHECKING:  # pragma: no cover - the operations import torch; they load on first use
    import torch

    from deltahub.ops.add import AddResult
    from deltahub.ops.calibrate import CalibrateResult, CalibrationOptions
    from deltahub.ops.compress import CompressResult, EmbeddingsMode
    from deltahub.ops.evaluate import EvalOptions, EvalResult
    from deltahub.ops.manage import GcReport, VerifyReport
    from deltahub.ops.materialize import MaterializeResult
    from deltahub.ops.pull import PullResult
    from deltahub.ops.push import PushResult
    from deltahub.ops.serve import Generation, MultiTenantModel

__all__ = [
    "CalibrationOptions",
    "DeltaHubError",
    "EmbeddingsMode",
    "EvalOptions",
    "Store",
    "__version__",
    "debug_enabled",
    "defaults",
    "disk_full_error",
    "human_bytes",
    "is_disk_full",
    "load_model",
    "serve",
    "load_multi_tenant",
    "load_tokenizer",
    "parse_size",
]

#: Public names defined by the operations, imported on first use: ``import deltahub.api`` (and
#: ``deltahub --help``, ``deltahub ls``) must not import torch.
_LAZY = {
    "EmbeddingsMode": ("deltahub.ops.compress", "EmbeddingsMode"),
    "CalibrationOptions": ("deltahub.ops.calibrate", "CalibrationOptions"),
    "EvalOptions": ("deltahub.ops.evaluate", "EvalOptions"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltahub.api' has no attribute {name!r}")


def _size_arg(size: int | str | None) -> int | None:
    """A ``max_size`` argument in bytes: an int, or a string such as ``"40MB"`` / ``"1.5GiB"``."""
    if size is None or isinstance(size, str):
        return None if size is None else parse_size(size)
    if not isinstance(size, bool):
        try:
            return operator.index(size)  # ints, numpy ints
        except TypeError:
            pass
    raise InputError(f"max_size must be a number of bytes (an int) or a size such as '40MB', got {size!r}",
                        "e.g. max_size=40_000_000 or max_size='40MB'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class Store:
    """A deltahub store on disk. Several processes may use one store at once."""

    def __init__(self, home: str | Path | None = None) -> None:
        from deltahub.ops.context import StoreContext

        self._ctx = StoreContext(home)

    @property
    def home(self) -> Path:
        return self._ctx.home

    def close(self) -> None:
        self._ctx.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        src: str | Path,
        name: str | None = None,
        force: bool = False,
        copy: bool = False,
        allow_nonfinite: bool = False,
    ) -> AddResult:
        """Import a base model from a local Hugging Face checkpoint directory, or from the Hub.

        ``src`` that is no local path but a Hub ``"REPO_ID[@REVISION]"`` is downloaded at that
        revision (pinned to its commit, into the HF cache; reused when cached, offline too) and its
        Hub id and commit are recorded, so pushing deltas on it needs no ``base_repo``. A
        ``pathlib.Path`` is always a local folder; a string ``"NAMESPACE/NAME"`` that is no folder is
        the Hub repo only if the Hub has it (else the error names both readings), and one starting
        with ``./``, ``../``, ``/`` or ``~`` is always a folder
        (:func:`deltahub.hub.source.resolve_source`).

        Weights that are files of the Hugging Face cache are not copied: the store keeps references
        to their bytes there (re-hashed on every read). ``copy=True`` stores an independent copy, so
        that deleting the HF cache entry later does not take the base with it.

        ``name=None`` derives the name from the folder or repo (``""`` is refused like any invalid
        name). NaN/Inf in any floating tensor is refused unless ``allow_nonfinite=True``.
        """
        from deltahub.ops.add import add_base

        return add_base(self._ctx, src, name=name, force=force, copy=copy, allow_nonfinite=allow_nonfinite)

    def compress(
        self,
        src: str | Path,
        base: str,
        name: str,
        embeddings: str = defaults.DEFAULT_EMBEDDINGS,
        force: bool = False,
        calibrate: bool = False,
        calibration: CalibrationOptions | None = None,
        allow_nonfinite: bool = False,
        codec: str = defaults.DEFAULT_CODEC,
        codec_options: dict[str, Any] | None = None,
        avg_bits: float | None = None,
        max_size: int | str | None = None,
    ) -> CompressResult:
        """Store the fine-tune at ``src`` as a delta against stored base ``base``; its matrices use
        ``codec`` (any registered codec that stores a delta, :mod:`deltahub.codec.registry`) with
        its ``codec_options`` (for ``"planes"``: ``planes``, ``scales`` = ``"matrix"``/``"row"``/``"group"``,
        ``group_size``).

        ``src`` that is no local path but looks like ``"REPO_ID[@REVISION]"`` is downloaded from the
        Hub like :meth:`add` does (pinned to its commit, into the HF cache; reused when cached).
        ``calibrate=True`` then calibrates the scales with ``src`` as the teacher (see
        :meth:`calibrate`; ``result.calibration`` holds what it did).

        ``codec`` names the codec of the 2-D weight matrices (default ``"sign1"``). ``embeddings``:
        how embeddings and the LM head are stored, ``"sign1"`` (with ``codec``), ``"rowsparse"``
        (changed rows only; a resized vocabulary's added rows dense) or ``"dense"``.

        NaN/Inf in any floating tensor of the fine-tune (or in a delta) is refused unless
        ``allow_nonfinite=True``: then dense tensors keep them as they are and a matrix whose delta is
        not finite is stored dense instead of sign1.

        A size budget, ``avg_bits`` (bits per parameter of the model) or ``max_size`` (bytes of
        tensor data), gives each matrix the planes (codec ``planes``, at most
        ``codec_options["planes"]``, default 4) that lose the least of the model's output on
        ``calibration``'s text (default: the bundled corpus) and fit; any smaller budget is then a
        prefix of the stored delta (:meth:`materialize`/:meth:`pull`/:func:`load_model` ``max_size``).
        """
        budget = sensitivity = None
        if avg_bits is not None or max_size is not None:
            from deltahub.ops.budget import DEFAULT_MAX_PLANES, Budget, SensitivityOptions
            from deltahub.ops.calibrate import CalibrationOptions

            opts = dict(codec_options or {})
            budget = Budget(avg_bits=avg_bits, max_bytes=_size_arg(max_size), max_planes=opts.pop("planes", DEFAULT_MAX_PLANES))
            codec_options = opts
            cal = calibration or CalibrationOptions()
            sensitivity = SensitivityOptions(data=cal.data, samples=cal.samples, seq_len=cal.seq_len,
                                             batch_size=cal.batch_size, device=cal.device, seed=cal.seed)
        if calibrate:
            from deltahub.ops.calibrate import compress_and_calibrate

            result, cal = compress_and_calibrate(
                self._ctx, src, base, name, embeddings=embeddings, force=force, options=calibration,
                allow_nonfinite=allow_nonfinite, codec=codec, codec_options=codec_options, budget=budget,
                sensitivity=sensitivity,
            )
            result.calibration = cal
            return result
        from deltahub.ops.compress import compress_finetune

        return compress_finetune(
            self._ctx, src, base, name, embeddings=embeddings, force=force, allow_nonfinite=allow_nonfinite,
            codec=codec, codec_options=codec_options, budget=budget, sensitivity=sensitivity,
        )

    def calibrate(
        self, name: str, finetune: str | Path, options: CalibrationOptions | None = None, **kwargs: Any
    ) -> CalibrateResult:
        """Calibrate the scales of stored delta ``name`` by distillation from its fine-tune.

        ``finetune`` is the fine-tune's checkpoint folder, a Hub ``"REPO_ID[@REVISION]"`` or a stored
        dense copy. Only the ``sign1`` scales change: ``name`` moves to a new manifest sharing every
        other object. Settings: ``options`` or keyword arguments of :class:`CalibrationOptions`
        (``data``, ``samples``, ``seq_len``, ``steps``, ``lr``, ``device``, ``seed``).
        """
        from deltahub.ops import calibrate as _calibrate

        options = options or _calibrate.CalibrationOptions(**kwargs)
        return _calibrate.calibrate(self._ctx, name, finetune, options)

    def evaluate(
        self,
        name: str,
        finetune: str | Path | None = None,
        options: EvalOptions | None = None,
        **kwargs: Any,
    ) -> EvalResult:
        """Perplexity of base / fine-tune / delta, KL(fine-tune || delta) and the improvement kept, on
        held-out text; recorded in the index (``show`` prints the latest). Settings: ``options`` or
        keyword arguments of :class:`EvalOptions` (``data``, ``samples``, ``seq_len``, ``device``)."""
        from deltahub.ops import evaluate as _evaluate

        options = options or _evaluate.EvalOptions(**kwargs)
        return _evaluate.evaluate(self._ctx, name, finetune, options)

    def materialize(
        self,
        name: str,
        out_dir: str | Path,
        dtype: str | torch.dtype | None = None,
        force: bool = False,
        max_shard_size: str | int = defaults.DEFAULT_MAX_SHARD_BYTES,
        bits: int | None = None,
        max_size: int | str | None = None,
    ) -> MaterializeResult:
        """Write ``name`` as an ordinary Hugging Face checkpoint into ``out_dir``. ``bits``: from the
        first ``bits`` sign planes of each tensor only (a ``planes`` delta at a coarser size);
        ``max_size`` (bytes, or ``"40MB"``): from the best prefix of its planes whose tensor data fits."""
        from deltahub.ops.materialize import materialize

        return materialize(
            self._ctx, name, Path(out_dir), dtype=dtype, force=force, max_shard_bytes=parse_size(max_shard_size),
            bits=bits, max_size=_size_arg(max_size),
        )

    def vllm_prepare(
        self,
        name: str,
        out_dir: str | Path,
        dtype: str | torch.dtype | None = None,
        force: bool = False,
        bits: int | None = None,
        max_size: int | str | None = None,
        adapter_planes: int = defaults.VLLM_ADAPTER_PLANES,
        adapter_group: int | None = None,
        apply: str = defaults.VLLM_APPLY,
    ) -> Any:
        """Write the folder vLLM serves ``name`` from with ``--load-format deltahub``: its config,
        tokenizer and a pointer to this store, no weights (:mod:`deltahub.ops.vllm_stub`). For a base
        served with ``--enable-lora``, ``adapter_planes`` / ``adapter_group`` size its adapter slots
        (the most sign planes, and the scale group, a fine-tune served as an adapter may have).
        ``apply``: ``auto`` (deltas merged into the weights once on a CPU; on the fly with the Triton
        kernels on a GPU), ``merged`` or ``on-the-fly``.
        Returns a :class:`~deltahub.ops.vllm_stub.PrepareResult`."""
        from deltahub.ops.vllm_stub import prepare

        return prepare(self._ctx, name, Path(out_dir), dtype=dtype, force=force, bits=bits, max_size=_size_arg(max_size),
                       adapter_planes=adapter_planes, adapter_group=adapter_group, apply=apply)

    def push(
        self,
        name: str,
        repo_id: str,
        revision: str | None = None,
        private: bool = False,
        message: str | None = None,
        base_repo: str | None = None,
        max_shard_size: str | int = defaults.DEFAULT_MAX_SHARD_BYTES,
        with_base: bool = False,
    ) -> PushResult:
        """Publish stored model ``name`` as Hub model repo ``repo_id`` in one commit (none if unchanged).

        A delta is pushed in the deltahub layout; a base as an ordinary checkpoint (and its Hub id
        and commit are remembered). ``base_repo`` (``"REPO_ID[@REVISION]"``) says where a delta's
        base lives when the store does not know; ``with_base`` pushes the base there first (default
        repo ``REPO_ID-base``).
        """
        from deltahub.ops.push import push

        return push(
            self._ctx,
            name,
            repo_id,
            revision=revision,
            private=private,
            message=message,
            base_repo=base_repo,
            max_shard_bytes=parse_size(max_shard_size),
            with_base=with_base,
        )

    def pull(self, repo: str, name: str | None = None, force: bool = False, bits: int | None = None,
             max_size: int | str | None = None) -> PullResult:
        """Fetch the delta in Hub repo ``repo`` (``"REPO_ID[@REVISION]"``), verify every byte and store it.

        The revision is pinned to its commit id first. A base the store lacks is added from the Hub
        repo and revision ``deltahub.json`` names (``result.base_fetched``) and checked.
        ``name`` defaults to the repo's name part; ``force`` re-points a name that is taken.
        ``bits``: fetch only the first ``bits`` sign planes of a ``planes`` delta (a smaller, coarser
        delta stored under its own manifest id).
        """
        from deltahub.ops.pull import pull

        return pull(self._ctx, repo, name=name, force=force, bits=bits, max_size=_size_arg(max_size))

    def list(self) -> list[dict[str, Any]]:
        from deltahub.ops.manage import list_models

        return list_models(self._ctx)

    def show(self, name: str, tensors: bool = False) -> dict[str, Any]:
        from deltahub.ops.manage import show_model

        return show_model(self._ctx, name, tensors=tensors)

    def du(self) -> dict[str, Any]:
        from deltahub.ops.manage import disk_usage

        return disk_usage(self._ctx)

    def rm(self, name: str, force: bool = False) -> dict[str, Any]:
        from deltahub.ops.manage import remove

        return remove(self._ctx, name, force=force)

    def gc(self, dry_run: bool = False) -> GcReport:
        from deltahub.ops.manage import garbage_collect

        return garbage_collect(self._ctx, dry_run=dry_run)

    def verify(self) -> VerifyReport:
        from deltahub.ops.manage import verify_store

        return verify_store(self._ctx)

    def load_model(
        self,
        name: str,
        dtype: str | torch.dtype | None = None,
        device: str = defaults.DEFAULT_DEVICE,
        mode: str = defaults.DEFAULT_LOAD_MODE,
        trainable_scales: bool = False,
        bits: int | None = None,
        max_size: int | str | None = None,
    ) -> Any:
        """A transformers model for ``name``. ``mode="delta"`` keeps the deltas packed and applies
        them at inference (``DeltaLinear``); ``trainable_scales`` makes their scales trainable.
        ``bits`` / ``max_size`` (bytes, or ``"40MB"``): from a prefix of its planes only."""
        from deltahub.ops.load import load_model

        return load_model(self._ctx, name, dtype=dtype, device=device, mode=mode, trainable_scales=trainable_scales,
                          bits=bits, max_size=_size_arg(max_size))

    def load_tokenizer(self, name: str) -> Any:
        from deltahub.ops.load import load_tokenizer

        return load_tokenizer(self._ctx, name)

    def load_multi_tenant(
        self, names: list[str], dtype: str | torch.dtype | None = None, device: str = defaults.DEFAULT_DEVICE
    ) -> MultiTenantModel:
        """One base plus the packed deltas of ``names`` (fine-tunes of that base; the base's own name
        means base rows); every batch row picks its fine-tune. See :class:`deltahub.ops.serve.MultiTenantModel`."""
        from deltahub.ops.serve import load_multi_tenant

        return load_multi_tenant(self._ctx, names, dtype=dtype, device=device)

    def generate(
        self,
        pairs: list[tuple[str, str]],
        mode: str | None = None,
        max_new_tokens: int = defaults.DEFAULT_MAX_NEW_TOKENS,
        dtype: str | torch.dtype | None = None,
        device: str = defaults.DEFAULT_DEVICE,
        **kwargs: Any,
    ) -> list[Generation]:
        """Generate for each ``(name, prompt)``: ``mode="delta"`` (default for several pairs) in one
        multi-tenant batch, ``"materialize"`` (default for one) each model rebuilt in full. Greedy
        unless ``do_sample=True``; other ``kwargs`` go to transformers' ``generate``."""
        from deltahub.ops.serve import generate

        return generate(
            self._ctx, pairs, mode=mode, max_new_tokens=max_new_tokens, dtype=dtype, device=device, **kwargs
        )


def serve(
    names: list[str] | tuple[str, ...] = (),
    serve_all: bool = False,
    home: str | Path | None = None,
    host: str = defaults.SERVE_HOST,
    port: int = defaults.SERVE_PORT,
    device: str = defaults.SERVE_DEVICE,
    dtype: str | None = None,
    max_batch: int = defaults.SERVE_MAX_BATCH,
    memory_budget: int | str | None = None,
    api_key: str | None = None,
    pull: bool = False,
    max_context: int | None = None,
    max_waiting: int = defaults.SERVE_MAX_WAITING,
    grace: float = defaults.SERVE_GRACE_SECONDS,
    json_logs: bool = False,
    engine: str = defaults.SERVE_ENGINE,
    engine_args: Sequence[str] = (),
) -> int:
    """Serve stored models over an OpenAI-compatible HTTP API until SIGINT/SIGTERM (``deltahub serve``).

    ``engine="vllm"``: vLLM's OpenAI server with deltahub's plug-in (:mod:`deltahub.ops.vllm_engine`;
    ``engine_args`` go to it as they are); returns its exit status.

    ``names`` (fine-tunes or bases; ``serve_all``: every stored name) are loaded at start while they
    fit ``memory_budget`` (bytes of resident bases and deltas, or ``"4GB"``); others load on demand
    and the least recently used are evicted. ``device="auto"``: CUDA when available."""
    import math

    import torch

    from deltahub.ops.pool import ModelPool
    from deltahub.serve import bind, configure_logging, run

    if not (isinstance(grace, int | float) and math.isfinite(grace) and 0 <= grace <= defaults.SERVE_MAX_GRACE_SECONDS):
        raise InputError(f"the grace period must be 0 to {defaults.SERVE_MAX_GRACE_SECONDS:g} seconds, got {grace!r}",
                         "pass --grace SECONDS")
    if engine not in defaults.SERVE_ENGINES:
        raise InputError(f"unknown engine {engine!r}", "use builtin or vllm (Ray Serve: serve run deltahub.integrations.ray:app)")
    if engine == "vllm":
        return _serve_vllm(names, serve_all, home, host, port, device, dtype, max_batch, memory_budget, api_key, pull,
                           max_context, grace, json_logs, engine_args)
    if engine_args:
        raise InputError("--engine-arg goes with --engine vllm", "leave it out, or add --engine vllm")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise InputError(f"deltahub serve runs on the CPU or CUDA, not {kind!r}", "use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available here (no GPU, or a CPU-only torch)", "use --device cpu or auto")
    budget = _size_arg(memory_budget)
    configure_logging(json_logs)
    sock = bind(host, port)  # before the models load: a port in use fails at once
    try:
        pool = ModelPool(home, names, serve_all=serve_all, device=device, dtype=dtype, max_batch=max_batch,
                         memory_budget=budget, pull=pull, max_context=max_context)
        try:
            run(pool, sock, api_key=api_key, grace=grace, max_waiting=max_waiting)
        finally:
            pool.close(cancel=True, timeout=grace)
    finally:
        sock.close()
    return 0


def _serve_vllm(names: Sequence[str], serve_all: bool, home: str | Path | None, host: str, port: int, device: str,
                dtype: str | None, max_batch: int, memory_budget: int | str | None, api_key: str | None, pull: bool,
                max_context: int | None, grace: float, json_logs: bool, engine_args: Sequence[str]) -> int:
    from deltahub.ops.context import StoreContext
    from deltahub.ops.vllm_engine import plan_vllm, run_vllm

    unsupported = [flag for flag, on in (("--all", serve_all), ("--json-logs", json_logs),
                                         ("--memory-budget", memory_budget is not None),
                                         ("--device", device not in ("auto", defaults.SERVE_DEVICE))) if on]
    if unsupported:
        raise InputError(f"not available with --engine vllm: {', '.join(unsupported)} (built-in engine only)",
                         "name the models; pass vLLM's own options with --engine-arg (e.g. --engine-arg=--gpu-memory-utilization=0.5)")
    from deltahub.serve import configure_logging

    configure_logging(False)
    ctx = StoreContext(home)
    try:
        with ctx.reading():
            launch = plan_vllm(ctx, list(names), host, port, dtype, max_batch, max_context, api_key, list(engine_args),
                               pull=pull)
    finally:
        ctx.close()
    return run_vllm(launch, grace)


def load_model(
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str = defaults.DEFAULT_DEVICE,
    home: str | Path | None = None,
    mode: str = defaults.DEFAULT_LOAD_MODE,
    trainable_scales: bool = False,
    bits: int | None = None,
    max_size: int | str | None = None,
) -> Any:
    """A transformers model for stored model ``name``, built without writing a checkpoint.

    ``mode="delta"``: the base's weights plus the packed deltas, applied at inference. ``bits`` /
    ``max_size`` (bytes, or ``"40MB"``): from a prefix of its planes only (a smaller delta)."""
    with Store(home) as store:
        return store.load_model(name, dtype=dtype, device=device, mode=mode, trainable_scales=trainable_scales,
                                bits=bits, max_size=max_size)


def load_tokenizer(name: str, home: str | Path | None = None) -> Any:
    """The tokenizer stored with model ``name``."""
    with Store(home) as store:
        return store.load_tokenizer(name)


def load_multi_tenant(
    names: list[str],
    dtype: str | torch.dtype | None = None,
    device: str = defaults.DEFAULT_DEVICE,
    home: str | Path | None = None,
) -> MultiTenantModel:
    """One base model serving the stored fine-tunes ``names`` row by row (``.generate(pairs)``)."""
    with Store(home) as store:
        return store.load_multi_tenant(names, dtype=dtype, device=device)
