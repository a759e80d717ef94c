"""Shared fixtures: tiny random models of two architectures, fine-tunes of them, fresh stores.

* ``llama`` — Llama-style, untied embeddings, no biases, fp32 base.
* ``gpt2``  — GPT-2 style, tied embeddings, biases (Conv1D weights), fp32 base.

A "fine-tune" perturbs every 2-D weight (embeddings included), changes some 1-D tensors, leaves
others bit-identical, so all three codecs (sign1, dense, same) appear.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["DELTAHUB_DISABLE_PROGRESS_BARS"] = "1"
# Hundreds of test stores: no 4 MiB space reserve each (GBs of /tmp per run). Tests of the reserve
# itself set DELTAHUB_RESERVE_BYTES back (tests/faults/test_limits.py, test_api.py).
os.environ["DELTAHUB_RESERVE_BYTES"] = "0"

# tests/vllm need vLLM, which lives in its own environment (.venv-vllm, scripts/test-vllm.sh):
# elsewhere they are not collected. scripts/test.sh (CI) runs both environments.
import importlib.util  # noqa: E402

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]



def pytest_addoption(parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the fault-injection suite (tests/faults) at full length: more kills, longer concurrency",
    )


@pytest.fixture(scope="session")
def soak(request) -> bool:
    """True with ``--soak``: fault tests run many more iterations (tests/faults)."""
    return bool(request.config.getoption("--soak"))


VOCAB = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_model(arch: str, seed: int = 0):
    """A tiny random transformers model of ``arch`` ('llama' or 'gpt2')."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=64,
            intermediate_size=88,  # K=88 for down_proj: not a multiple of 32
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=48, n_layer=2, n_head=4, n_positions=64)
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def fine_tune_like(model, seed: int = 1, scale: float = 0.02) -> None:
    """Perturb ``model`` in place like a fine-tune would (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
            elif "layers.0" in name or ".h.0." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            # other 1-D tensors stay bit-identical -> codec "same"


def save_checkpoint(model, path: Path, dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    _save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{arch: {"base": dir, "ft": dir}} for every test architecture, built once per session."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, dict[str, Path]] = {}
    for arch in ("llama", "gpt2"):
        model = make_model(arch)
        base = save_checkpoint(model, root / arch / "base")
        fine_tune_like(model)
        ft = save_checkpoint(model, root / arch / "ft")
        out[arch] = {"base": base, "ft": ft}
    return out


@pytest.fixture(params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def home(tmp_path) -> Path:
    """An empty store folder, also exported as DELTAHUB_HOME."""
    path = tmp_path / "store"
    old = os.environ.get("DELTAHUB_HOME")
    os.environ["DELTAHUB_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DELTAHUB_HOME", None)
    else:
        os.environ["DELTAHUB_HOME"] = old


@pytest.fixture
def store(home) -> Iterator:
    import deltahub

    s = deltahub.Store(home)
    yield s
    s.close()


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot_store(home: Path) -> dict:
    """Everything observable about a store: its object files and its index rows (for 'unchanged')."""
    import sqlite3

    files = {}
    objects = home / "objects"
    if objects.is_dir():
        for p in sorted(objects.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(home))] = p.read_bytes()
    rows = {}
    db = home / "index.sqlite"
    if db.exists():
        con = sqlite3.connect(db)
        try:
            for (table,) in con.execute("select name from sqlite_master where type='table' order by name"):
                rows[table] = sorted(con.execute(f"select * from {table}").fetchall(), key=repr)
        finally:
            con.close()
    return {"files": files, "rows": rows}


BASE = "base"


@pytest.fixture(scope="session")
def based_template(tmp_path_factory, model_dirs) -> Path:
    """A store holding the llama base as ``base``, built once and copied for each test (``based``)."""
    import deltahub

    path = tmp_path_factory.mktemp("based-template") / "store"
    with deltahub.Store(path) as s:
        s.add(model_dirs["llama"]["base"], name=BASE)
    return path


@pytest.fixture
def based(home, based_template):
    """A fresh copy of the template store; yields (store, home, snapshot after the add)."""
    import deltahub

    shutil.copytree(based_template, home)
    store = deltahub.Store(home)
    yield store, home, snapshot_store(home)
    store.close()


def assert_store_unchanged(home: Path, snap: dict) -> None:
    """``home`` holds exactly what ``snap`` (a :func:`snapshot_store`) saw, and no temporary file."""
    after = snapshot_store(home)
    assert sorted(after["files"]) == sorted(snap["files"]), "object files were added or removed"
    assert after == snap
    tmp = home / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir()), "temporary files left behind"


def rewrite_safetensors(path: Path, mutate) -> None:
    """Load a safetensors file, let ``mutate`` edit the dict of tensors, save it back."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    mutate(sd)
    save_file(sd, path, metadata={"format": "pt"})


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
