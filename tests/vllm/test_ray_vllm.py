"""Ray Serve in front of vLLM engines (``build_app(engine="vllm")``): each replica runs
``deltahub serve BASE FT... --engine vllm`` (vLLM with deltahub's plug-in, the fine-tunes as
adapters) on a private port; the ingress routes by ``model``. Greedy answers through Ray's HTTP
proxy equal transformers on each materialized model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # (the main .venv has no Ray; .venv-vllm has it and runs this)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_fixtures import MAX_TOKENS, PROMPTS, free_port, vstore  # noqa: E402,F401


def test_ray_routes_to_vllm_replicas_serving_a_base_and_its_adapters(vstore):
    import openai
    from ray import serve
    from transformers import AutoTokenizer

    from deltahub.integrations.ray import build

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
            "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"home": str(vstore["home"]), "names": "base,ad-sign1,ad-planes", "engine": "vllm",
                         "dtype": "float32", "max_context": "256", "num_cpus": "0.5", "max_batch": "4",
                         "engine_args": "--gpu-memory-utilization=0.1"}), name="dh-vllm", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
        tok = AutoTokenizer.from_pretrained(vstore["stub"]["base"])
        for name in ("ad-planes", "base", "ad-sign1"):
            r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text.split() == tok.decode(vstore["want"][name][0], skip_special_tokens=True).split()
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="w1", max_tokens=2)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
