"""Fixtures for the calibration and evaluation tests: tiny models *really* fine-tuned.

The conftest's fine-tunes are random perturbations: their deltas carry no knowledge, so there is
nothing for calibration to recover. Here a tiny random base is fine-tuned for a few dozen steps on a
synthetic language (a noisy Markov chain over the conftest tokenizer's words ``w0..w124``), so the
fine-tune is much better than the base on that language and its delta is structured. Texts from the
same chain (other seeds) are the calibration and held-out data.

Use with ``from calibrate_fixtures import trained  # noqa: F401``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import fine_tune_like, make_model, save_checkpoint

N_WORDS = 125
TOKEN_OFFSET = 3  # ids of w0.. start after <unk>, <s>, </s>


def chain_words(n: int, seed: int, mult: int = 7, add: int = 11, noise: float = 0.15) -> list[int]:
    """Word indices of a noisy deterministic chain: next = (mult·cur + add) mod 125, or random."""
    gen = torch.Generator().manual_seed(seed)
    cur = int(torch.randint(N_WORDS, (1,), generator=gen))
    out = []
    for _ in range(n):
        out.append(cur)
        if float(torch.rand((), generator=gen)) < noise:
            cur = int(torch.randint(N_WORDS, (1,), generator=gen))
        else:
            cur = (mult * cur + add) % N_WORDS
    return out


def chain_text(n: int, seed: int) -> str:
    words = chain_words(n, seed)
    lines = [" ".join(f"w{w}" for w in words[i : i + 16]) for i in range(0, len(words), 16)]
    return "\n".join(lines) + "\n"


def train(model, steps: int = 40, seed: int = 0, batch: int = 8, seq: int = 32, lr: float = 3e-3) -> None:
    """A real (short) full fine-tune of ``model`` on the chain language, in place."""
    torch.manual_seed(seed)
    ids = torch.tensor(chain_words(20_000, seed=1000 + seed)) + TOKEN_OFFSET
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """``{arch: {"base", "ft", "other"}}`` checkpoint folders plus ``"calib"`` / ``"heldout"`` text files.

    ``other`` is a different fine-tune of the same base (random perturbation), for mismatch tests.
    """
    root = tmp_path_factory.mktemp("trained")
    out: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on 2 busy cores
    for arch in ("llama", "gpt2"):
        model = make_model(arch)
        base = save_checkpoint(model, root / arch / "base")
        train(model)
        ft = save_checkpoint(model, root / arch / "ft")
        other_model = make_model(arch)
        fine_tune_like(other_model, seed=7, scale=0.2)
        other = save_checkpoint(other_model, root / arch / "other")
        out[arch] = {"base": base, "ft": ft, "other": other}
    calib = root / "calib.txt"
    calib.write_text(chain_text(3000, seed=1))
    heldout = root / "heldout.txt"
    heldout.write_text(chain_text(3000, seed=2))
    out["calib"], out["heldout"] = calib, heldout
    torch.set_num_threads(threads)
    return out


def stored_pair(store, trained: dict, arch: str, name: str = "ft") -> str:
    """Add ``arch``'s base and compress its trained fine-tune as ``name``; returns the manifest id."""
    store.add(trained[arch]["base"], name="base")
    return store.compress(trained[arch]["ft"], base="base", name=name).manifest_id


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run much faster on one thread (two threads spin against each other and against
    other jobs on a 2-core machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


__all__ = ["chain_text", "chain_words", "one_thread", "stored_pair", "train", "trained"]

