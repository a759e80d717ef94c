"""A store with one tiny base and three fine-tunes, and `deltahub serve` run on it as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import fine_tune_like, save_checkpoint

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_serve_store(root: Path) -> Path:
    """``root/home`` holding ``base`` and ``ft1`` … ``ft3`` (llama, context 1024; ``ft1`` has a chat template)."""
    import torch
    from conftest import VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltahub

    def model(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
        if seed:
            fine_tune_like(m, seed=seed, scale=0.5)
        return m

    save_checkpoint(model(0), root / "ck" / "base")
    for s in (1, 2, 3):
        path = save_checkpoint(model(s), root / "ck" / f"ft{s}")
        if s == 1:
            cfg_path = path / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["chat_template"] = CHAT_TEMPLATE
            cfg_path.write_text(json.dumps(cfg))
    home = root / "home"
    with deltahub.Store(home) as store:
        store.add(root / "ck" / "base", name="base")
        for s in (1, 2, 3):
            store.compress(root / "ck" / f"ft{s}", base="base", name=f"ft{s}")
    return home


class Server:
    """``deltahub serve`` in a subprocess on a free port; ``.url`` once it listens."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "deltahub.cli", "--home", str(home), "serve", *args, "--port", "0"]
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                hit = re.search(r"on (http://[0-9.]+:\d+)/v1", line)
                if hit and self.url is None:
                    self.url = hit.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("deltahub serve did not start:\n" + "".join(self.lines))
        if self.url is None:
            self.proc.wait(10)
            raise RuntimeError(f"deltahub serve exited {self.proc.returncode}:\n" + "".join(self.lines))
        self._wait_listening()

    def _wait_listening(self) -> None:
        import httpx

        for _ in range(100):
            try:
                httpx.get(self.url + "/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)

    def client(self, key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
