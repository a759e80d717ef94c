"""deltahub behind Ray Serve (deltahub.integrations.ray), on the CPU, through Ray's HTTP proxy with
the real `openai` client: the ingress routes each request by its `model` (serve.multiplexed) to an
engine replica holding a ModelPool; greedy answers for two fine-tunes and the base equal what
deltahub gives for each model alone (materialized); Ray's LRU over model ids unloads a fine-tune
from the replica's pool; streaming passes through; an unknown model is an OpenAI 404."""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # (the main .venv has no Ray; .venv-vllm has it and runs this)
pytest.importorskip("ray.serve")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the serve store fixture
import openai  # noqa: E402
from serve_fixtures import make_serve_store  # noqa: E402

import deltahub  # noqa: E402

APP = "deltahub"
PROMPTS = ["w1 w2 w3", "w7", "w10 w11 w12 w13"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_serve_store(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def reference(home):
    """What deltahub gives for (name, prompt, n): the model materialized alone, greedy."""
    cache: dict[tuple[str, str, int], str] = {}

    def get(name: str, prompt: str, n: int) -> str:
        if (name, prompt, n) not in cache:
            with deltahub.Store(home) as store:
                [g] = store.generate([(name, prompt)], mode="materialize", max_new_tokens=n)
            cache[name, prompt, n] = g.text
        return cache[name, prompt, n]

    return get


@pytest.fixture(scope="module")
def served(home):
    """The app on a one-replica Ray cluster: (openai client, the engine deployment's handle, deploy seconds)."""
    from ray import serve

    from deltahub.integrations.ray import build

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = not ray.is_initialized()  # (a Ray started by another test is left running)
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build({"home": str(home), "names": "base,ft1,ft2", "max_models": "2", "num_cpus": "0.5",
                         "device": "cpu", "max_batch": "4"}), name=APP, route_prefix="/")
        deploy_s = time.perf_counter() - t0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, serve.get_deployment_handle("DeltahubEngine", app_name=APP), deploy_s
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def _loaded(engine) -> dict:
    return engine.loaded.remote().result(timeout_s=30)


def _until(engine, check, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = _loaded(engine)
        if check(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_routes_by_model_and_answers_like_deltahub(served, reference):
    client, engine, deploy_s = served
    print(f"deployed in {deploy_s:.1f} s")

    def ask(name: str, prompt: str, n: int):
        raw = client.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        return raw.parse(), raw.headers

    # one model at a time: Ray's multiplexing holds at most 2 ids on the replica
    for name in ("ft1", "ft2"):
        r, headers = ask(name, PROMPTS[0], 8)
        assert r.model == name and r.choices[0].text == reference(name, PROMPTS[0], 8), name
        assert headers["x-deltahub-replica"]
    info = _loaded(engine)
    assert info["multiplexed"] == ["ft1", "ft2"]
    assert {"ft1", "ft2"} <= set(info["resident"]), info
    assert reference("ft1", PROMPTS[0], 8) != reference("ft2", PROMPTS[0], 8)  # the rows really differ

    # a third id: Ray drops the least recently used (ft1), and the replica unloads it from its pool
    r, _ = ask("base", PROMPTS[0], 8)
    assert r.choices[0].text == reference("base", PROMPTS[0], 8)
    info = _until(engine, lambda i: "ft1" not in i["resident"] and not i["unloading"])
    assert info["multiplexed"] == ["base", "ft2"] and "ft1" not in info["resident"], info
    assert "ft2" in info["resident"]

    # concurrent requests over two fine-tunes (ft1 loads again) and the base, batched together
    jobs = [(name, prompt, 5 + i % 4) for i, (name, prompt) in
            enumerate((n, p) for p in PROMPTS for n in ("ft1", "ft2", "base"))]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda job: ask(*job)[0], jobs))
    for (name, prompt, n), r in zip(jobs, answers):
        assert r.choices[0].text == reference(name, prompt, n), (name, prompt, n)
        assert r.model == name and 1 <= r.usage.completion_tokens <= n


def test_streaming_chat_and_model_list(served, reference):
    client, _, _ = served
    chunks = list(client.completions.create(model="ft2", prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True))
    assert len([c for c in chunks if c.choices]) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference("ft2", PROMPTS[2], 10)
    messages = [{"role": "user", "content": "w2 w3"}]
    chat = client.chat.completions.create(model="ft1", messages=messages, max_tokens=6, temperature=0)
    streamed = client.chat.completions.create(model="ft1", messages=messages, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"base", "ft1", "ft2"} and models["ft1"].parent == "base"


def test_unknown_model_is_an_openai_404(served):
    client, engine, _ = served
    for name in ("nope", "ft3"):  # ft3 is stored but not served
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=name, prompt="w1", max_tokens=2)
        assert err.value.code == "model_not_found" and "ft1" in err.value.message
    with pytest.raises(openai.BadRequestError):  # no model at all: the engine's own 400
        client.post("/completions", body={"prompt": "w1"}, cast_to=object)
    assert "nope" not in _loaded(engine)["multiplexed"]
    # the replica still serves
    assert client.completions.create(model="ft2", prompt="w1", max_tokens=2, temperature=0).choices


def test_builder_arguments_are_checked():
    from deltahub.errors import InputError
    from deltahub.integrations.ray import build

    with pytest.raises(InputError, match="unknown argument.*bogus"):
        build({"bogus": "1"})
    with pytest.raises(InputError, match="both given"):
        build({"num_replicas": "2", "autoscaling_config": '{"max_replicas": 4}'})
    with pytest.raises(InputError, match="bad value for max_batch"):
        build({"max_batch": "many"})
    with pytest.raises(InputError, match="max_models must be"):
        build({"max_models": "0"})
    assert build({"names": "ft1,ft2", "autoscaling_config": '{"min_replicas": 1, "max_replicas": 4}'}) is not None
