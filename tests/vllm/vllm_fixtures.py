"""A store with one tiny Llama base (head_dim 32, as vLLM's CPU attention needs) and its fine-tunes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny-model helpers

from conftest import VOCAB, fine_tune_like, save_checkpoint  # noqa: E402

#: name -> (fine-tune seed, codec, codec options); "base" is the base itself
FINETUNES = {
    "ft-sign1": (1, "sign1", None),
    "ft-planes": (2, "planes", {"planes": 2, "scales": "row"}),
    "ft-group": (3, "planes", {"planes": 1, "scales": "group", "group_size": 64}),
}


def tiny_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=176,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, tie_word_embeddings=False))
    if seed:
        fine_tune_like(m, seed=seed, scale=0.6)
    return m


def make_vllm_store(root: Path) -> Path:
    """``root/home`` with ``base`` and the :data:`FINETUNES`; their checkpoints under ``root/ck``."""
    import deltahub

    save_checkpoint(tiny_llama(0), root / "ck" / "base")
    home = root / "home"
    with deltahub.Store(home) as store:
        store.add(root / "ck" / "base", name="base")
        for name, (seed, codec, options) in FINETUNES.items():
            save_checkpoint(tiny_llama(seed), root / "ck" / name)
            store.compress(root / "ck" / name, base="base", name=name, codec=codec, codec_options=options)
    return home
