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

from pathlib import Path
from typing import Any

import torch

from deltahub.formats.hf_writer import DEFAULT_MAX_SHARD_BYTES, parse_size
from deltahub.ops import add as _add
from deltahub.ops import compress as _compress
from deltahub.ops import load as _load
from deltahub.ops import manage as _manage
from deltahub.ops import materialize as _materialize
from deltahub.ops import pull as _pull
from deltahub.ops import push as _push
from deltahub.ops.context import StoreContext

EmbeddingsMode = _compress.EmbeddingsMode


class Store:
    """A deltahub store on disk. Several processes may use one store at once."""

    def __init__(self, home: str | Path | None = None) -> None:
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

    def add(self, src: str | Path, name: str | None = None, force: bool = False) -> _add.AddResult:
        """Import a base model from a local Hugging Face checkpoint directory, or from the Hub.

        ``src`` that is no local path but looks like ``"REPO_ID[@REVISION]"`` is downloaded at that
        revision (pinned to its commit, into the HF cache; reused when cached, offline too) and its
        Hub id and commit are recorded, so pushing deltas on it needs no ``base_repo``.
        """
        return _add.add_base(self._ctx, Path(src), name=name, force=force)

    def compress(
        self,
        src: str | Path,
        base: str,
        name: str,
        embeddings: str = _compress.DEFAULT_EMBEDDINGS.value,
        force: bool = False,
    ) -> _compress.CompressResult:
        """Store the fine-tune at ``src`` as a 1-bit delta against stored base ``base``.

        ``src`` that is no local path but looks like ``"REPO_ID[@REVISION]"`` is downloaded from the
        Hub like :meth:`add` does (pinned to its commit, into the HF cache; reused when cached).
        """
        return _compress.compress_finetune(self._ctx, Path(src), base, name, embeddings=embeddings, force=force)

    def materialize(
        self,
        name: str,
        out_dir: str | Path,
        dtype: str | torch.dtype | None = None,
        force: bool = False,
        max_shard_size: str | int = DEFAULT_MAX_SHARD_BYTES,
    ) -> _materialize.MaterializeResult:
        """Write ``name`` as an ordinary Hugging Face checkpoint into ``out_dir``."""
        return _materialize.materialize(
            self._ctx, name, Path(out_dir), dtype=dtype, force=force, max_shard_bytes=parse_size(max_shard_size)
        )

    def push(
        self,
        name: str,
        repo_id: str,
        revision: str | None = None,
        private: bool = False,
        message: str | None = None,
        base_repo: str | None = None,
        max_shard_size: str | int = DEFAULT_MAX_SHARD_BYTES,
    ) -> _push.PushResult:
        """Publish stored delta ``name`` as Hub model repo ``repo_id`` in one commit (none if unchanged).

        ``base_repo`` (``"REPO_ID[@REVISION]"``) says where the base lives when the store does not know.
        """
        return _push.push(
            self._ctx,
            name,
            repo_id,
            revision=revision,
            private=private,
            message=message,
            base_repo=base_repo,
            max_shard_bytes=parse_size(max_shard_size),
        )

    def pull(self, repo: str, name: str | None = None, force: bool = False) -> _pull.PullResult:
        """Fetch the delta in Hub repo ``repo`` (``"REPO_ID[@REVISION]"``), verify every byte and store it.

        The revision is pinned to its commit id first. A base the store lacks is added from the Hub
        repo and revision ``deltahub.json`` names (``result.base_fetched``) and checked.
        ``name`` defaults to the repo's name part; ``force`` re-points a name that is taken.
        """
        return _pull.pull(self._ctx, repo, name=name, force=force)

    def list(self) -> list[dict[str, Any]]:
        return _manage.list_models(self._ctx)

    def show(self, name: str, tensors: bool = False) -> dict[str, Any]:
        return _manage.show_model(self._ctx, name, tensors=tensors)

    def du(self) -> dict[str, Any]:
        return _manage.disk_usage(self._ctx)

    def rm(self, name: str, force: bool = False) -> dict[str, Any]:
        return _manage.remove(self._ctx, name, force=force)

    def gc(self, dry_run: bool = False) -> _manage.GcReport:
        return _manage.garbage_collect(self._ctx, dry_run=dry_run)

    def verify(self) -> _manage.VerifyReport:
        return _manage.verify_store(self._ctx)

    def load_model(self, name: str, dtype: str | torch.dtype | None = None, device: str = "cpu") -> Any:
        return _load.load_model(self._ctx, name, dtype=dtype, device=device)

    def load_tokenizer(self, name: str) -> Any:
        return _load.load_tokenizer(self._ctx, name)


def load_model(
    name: str, dtype: str | torch.dtype | None = None, device: str = "cpu", home: str | Path | None = None
) -> Any:
    """A transformers model for stored model ``name``, built without writing a checkpoint."""
    with Store(home) as store:
        return store.load_model(name, dtype=dtype, device=device)


def load_tokenizer(name: str, home: str | Path | None = None) -> Any:
    """The tokenizer stored with model ``name``."""
    with Store(home) as store:
        return store.load_tokenizer(name)
