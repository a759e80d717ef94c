"""A store with one tiny Llama base (head_dim 32, as vLLM's CPU attention needs) and its fine-tunes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny-model helpers

from conftest import VOCAB, fine_tune_like, save_checkpoint  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = ["w1 w2 w3 w4", "w9 w8 w7", "w30 w31"]
MAX_TOKENS = 10

#: name -> (fine-tune seed, codec, codec options); "base" is the base itself
FINETUNES = {
    "ft-sign1": (1, "sign1", None),
    "ft-planes": (2, "planes", {"planes": 2, "scales": "row"}),
    "ft-group": (3, "planes", {"planes": 1, "scales": "group", "group_size": 64}),
}


#: fine-tunes that change only the decoder's Linear weights: what a vLLM adapter slot carries
ADAPTERS = {
    "ad-sign1": (4, "sign1", None),
    "ad-planes": (5, "planes", {"planes": 2, "scales": "row"}),
    "ad-matrix": (6, "planes", {"planes": 1, "scales": "matrix"}),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int, linear_only: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=176,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, tie_word_embeddings=False))
    if seed and linear_only:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.rsplit(".", 2)[-2] in LINEAR:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.6 * p.abs().mean())
    elif seed:
        fine_tune_like(m, seed=seed, scale=0.6)
    return m


def make_vllm_store(root: Path) -> Path:
    """``root/home`` with ``base``, the :data:`FINETUNES` and :data:`ADAPTERS`; checkpoints under ``root/ck``."""
    import deltahub

    save_checkpoint(tiny_llama(0), root / "ck" / "base")
    home = root / "home"
    with deltahub.Store(home) as store:
        store.add(root / "ck" / "base", name="base")
        for name, (seed, codec, options) in {**FINETUNES, **ADAPTERS}.items():
            save_checkpoint(tiny_llama(seed, linear_only=name in ADAPTERS), root / "ck" / name)
            store.compress(root / "ck" / name, base="base", name=name, codec=codec, codec_options=options)
    return home


@pytest.fixture(scope="session")
def vstore(tmp_path_factory) -> dict:
    """The store, each fine-tune's stub folder and transformers' greedy tokens on its materialized copy."""
    import deltahub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("vllm")
    home = make_vllm_store(root)
    tok = AutoTokenizer.from_pretrained(root / "ck" / "base")
    out: dict = {"home": home, "root": root, "stub": {}, "want": {}}
    with deltahub.Store(home) as store:
        for name in ["base", *FINETUNES, *ADAPTERS]:
            slots = {"adapter_planes": 2} if name == "base" else {}
            out["stub"][name] = store.vllm_prepare(name, root / "stub" / name, dtype="float32", **slots).out_dir
            store.materialize(name, root / "mat" / name, dtype="float32")
            model = AutoModelForCausalLM.from_pretrained(root / "mat" / name).eval()
            want = []
            for p in PROMPTS:
                ids = tok(p, return_tensors="pt").input_ids
                gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
                want.append(gen[0, ids.shape[1]:].tolist())
            out["want"][name] = want
    return out




def run_engines(tmp_path: Path, runs: list[dict], timeout: int = 600) -> list[dict]:
    """``runs`` through tests/vllm/engine_run.py in a child process (see its docstring)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["runs"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def one_rank():
    """vLLM's distributed state for one rank on gloo, and a current vLLM config."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel, model_parallel_is_initialized

    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():  # (once per process: test modules share it)
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
            initialize_model_parallel(1, 1)
        from deltahub.integrations.vllm import register

        register()
        yield


