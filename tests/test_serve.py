"""`deltahub serve` driven by the real OpenAI client over HTTP on 127.0.0.1 (a real server process).

Greedy answers from concurrent clients over several fine-tunes and the base equal what `deltahub
generate` gives for each alone; streaming, chat templates, the model list, eviction and reload under a
memory budget, every error case (the server still serving afterwards), and SIGTERM draining."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is part of the test extras")
import openai  # noqa: E402
from hub_fixtures import hub_server  # noqa: E402,F401
from serve_fixtures import Server, make_serve_store  # noqa: E402

import deltahub  # noqa: E402

PROMPTS = ["w1 w2 w3", "w7", "w10 w11 w12 w13 w14", "w5 w5"]


@pytest.fixture(scope="module")
def serve_home(tmp_path_factory):
    return make_serve_store(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(serve_home):
    """What `deltahub generate` (each model alone, greedy) gives for (name, prompt, n)."""
    cache: dict[tuple[str, str, int], str] = {}

    def get(name: str, prompt: str, n: int) -> str:
        key = (name, prompt, n)
        if key not in cache:
            with deltahub.Store(serve_home) as store:
                [g] = store.generate([(name, prompt)], max_new_tokens=n)
            cache[key] = g.text
        return cache[key]

    return get


@pytest.fixture(scope="module")
def server(serve_home):
    s = Server(serve_home, "ft1", "ft2", "ft3", "base", "--max-batch", "4")
    yield s
    assert s.stop() == 0, s.log()


def test_concurrent_greedy_completions_equal_generate_alone(server, reference, serve_home):
    client = server.client()
    tok = deltahub.load_tokenizer("base", home=serve_home)
    jobs = [(name, prompt, 6 + (i % 5)) for i, (name, prompt) in
            enumerate((n, p) for p in PROMPTS for n in ("ft1", "ft2", "ft3", "base"))]

    def ask(job):
        name, prompt, n = job
        r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, r.usage

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, n), (text, usage) in zip(jobs, answers):
        assert text == reference(name, prompt, n), (name, prompt)
        assert usage.completion_tokens <= n and usage.prompt_tokens == len(tok(prompt)["input_ids"])
    # different fine-tunes really differ (the rows did not all use one model)
    assert len({reference(n, PROMPTS[0], 6) for n in ("ft1", "ft2", "ft3", "base")}) > 1
    log = server.log()
    assert "deltahub.access" in log and "ttft=" in log and "out=" in log


def test_streaming_concatenates_to_the_non_streamed_text(server):
    client = server.client()
    for name in ("ft2", "base"):
        whole = client.completions.create(model=name, prompt="w3 w4", max_tokens=12, temperature=0).choices[0].text
        chunks = list(client.completions.create(model=name, prompt="w3 w4", max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole and len([c for c in chunks if c.choices]) >= 2
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_chat_applies_the_fine_tunes_own_template(server, serve_home):
    client = server.client()
    messages = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    chat = client.chat.completions.create(model="ft1", messages=messages, max_tokens=8, temperature=0)
    tok = deltahub.load_tokenizer("ft1", home=serve_home)
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[:3] == tok.convert_tokens_to_ids(["<s>", "system", "w1"]) if "system" in tok.get_vocab() else True
    plain = client.completions.create(model="ft1", prompt=ids, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(ids)
    streamed = client.chat.completions.create(model="ft1", messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="ft2", messages=messages, max_tokens=4)


def test_models_lists_names_with_their_base_as_parent(server):
    models = {m.id: m for m in server.client().models.list()}
    assert set(models) == {"ft1", "ft2", "ft3", "base"}
    assert models["ft1"].parent == "base" and models["base"].parent is None
    assert all(m.resident for m in models.values())


def test_stop_seed_and_sampling(server):
    client = server.client()
    whole = client.completions.create(model="ft3", prompt="w1 w2", max_tokens=10, temperature=0).choices[0].text
    words = whole.split()
    if len(words) >= 3:
        cut = client.completions.create(model="ft3", prompt="w1 w2", max_tokens=10, temperature=0, stop=[" " + words[2]])
        assert cut.choices[0].text == " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"
    tiny = client.completions.create(model="ft3", prompt="w1 w2", max_tokens=10, temperature=1e-30)
    assert tiny.choices[0].text == whole  # a temperature that would overflow decodes greedily
    a = client.completions.create(model="ft2", prompt="w1", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="ft2", prompt="w1", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_errors_are_clear_and_the_server_keeps_serving(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="w1", max_tokens=2)
    assert "ft1" in str(e.value) and "base" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="ft1", prompt="w1 " * 1100, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="ft1", prompt="w1", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model="ft1", prompt="w1", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="ft1", prompt="w1", max_tokens=2, temperature=-1)
    raw = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]
    deep = httpx.post(server.url + "/v1/completions", content=b"[" * 100000 + b"]" * 100000, timeout=10)
    assert deep.status_code == 400
    surrogate = httpx.post(server.url + "/v1/completions", content=b'{"model": "ft1", "prompt": "\\ud800"}', timeout=10)
    assert surrogate.status_code == 400 and "JSON" in surrogate.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.completions.create(model="ft1", prompt=[5, 10**6], max_tokens=2)
    dup = httpx.post(server.url + "/v1/completions", content=b'{"model": "ft1", "model": "ft2", "prompt": "w1"}', timeout=10)
    assert dup.status_code == 400 and "duplicate" in dup.json()["error"]["message"]
    route = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert route.status_code == 404 and "/v1/completions" in route.json()["error"]["message"]
    assert httpx.put(server.url + "/v1/completions", timeout=10).json()["error"]["message"].startswith("PUT")
    assert client.models.retrieve("ft2").parent == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    forged = httpx.post(server.url + "/v1/completions", json={"model": "x\n00:00:00 deltahub.access: FORGED", "prompt": "w1"},
                        timeout=10)
    assert forged.status_code == 404
    assert not any(line.startswith("00:00:00 deltahub.access: FORGED") for line in server.log().splitlines())
    assert httpx.post(server.url + "/v1/completions", json={"model": "m" * 10000, "prompt": "w1"}, timeout=10).status_code == 404
    huge = httpx.post(server.url + "/v1/completions", content=b" " * (9 << 20), timeout=30)
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="ft1", prompt="w1", max_tokens=2, logprobs=2)
    assert client.completions.create(model="ft1", prompt="w1", max_tokens=2, temperature=0).choices[0].text


def test_memory_budget_evicts_and_reloads_with_identical_results(serve_home, reference):
    probe = Server(serve_home, "base", "ft1")
    sizes = {m.id: m.bytes for m in probe.client().models.list()}
    assert probe.stop() == 0
    budget = sizes["base"] + sizes["ft1"] * 3 // 2  # room for the base and one fine-tune: a switch evicts
    s = Server(serve_home, "--all", "--memory-budget", str(budget))
    try:
        client = s.client()
        for name in ("ft1", "ft2", "ft3", "ft1", "base", "ft2"):
            text = client.completions.create(model=name, prompt="w1 w2 w3", max_tokens=6, temperature=0).choices[0].text
            assert text == reference(name, "w1 w2 w3", 6), name
            resident = {m.id for m in client.models.list() if m.resident}
            assert name in resident and len(resident - {"base"}) <= 1, resident
        assert "evicted" in s.log()
        # concurrent requests over fine-tunes that cannot all be resident: they wait for each other's
        # models to be released, and every answer is still right
        jobs = [name for name in ("ft1", "ft2", "ft3", "base") for _ in range(3)]

        def ask(name):
            return client.completions.create(model=name, prompt="w1 w2 w3", max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, jobs))
        assert answers == [reference(name, "w1 w2 w3", 6) for name in jobs]
        with pytest.raises(RuntimeError, match="does not fit in the memory budget"):
            Server(serve_home, "ft1", "--memory-budget", str(sizes["base"] // 2))
    finally:
        assert s.stop() == 0, s.log()


def test_full_queue_429_disconnect_frees_the_slot_api_key_and_sigterm_drains(serve_home):
    s = Server(serve_home, "ft1", "--max-batch", "1", "--max-waiting", "0", "--api-key", "sekret", "--grace", "30")
    try:
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # no key needed
        r = httpx.get(s.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="ft1", prompt="w1", max_tokens=2)
        client = s.client("sekret")
        # a client still sending its body holds no request slot
        import socket

        slow = socket.create_connection(s.url.removeprefix("http://").split(":")[0:1] + [int(s.url.rsplit(":", 1)[1])])
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        time.sleep(0.3)
        assert client.completions.create(model="ft1", prompt="w1", max_tokens=2, temperature=0).choices[0].text
        slow.close()
        # a non-streamed request whose client gives up is cancelled while its tokens still flow
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                       json={"model": "ft1", "prompt": "w1", "max_tokens": 1000, "temperature": 0}, timeout=0.3)
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health", timeout=10).json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health", timeout=10).json()["in_flight"] == 0
        assert "out=1000" not in s.log()
        # one long stream holds the only slot: another request gets 429 with Retry-After
        stream = client.completions.create(model="ft1", prompt="w1", max_tokens=1000, temperature=0, stream=True)
        next(iter(stream))
        busy = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                          json={"model": "ft1", "prompt": "w1", "max_tokens": 2}, timeout=10)
        assert busy.status_code == 429 and busy.headers["Retry-After"]
        # the client goes away mid-stream: its slot is free at once
        stream.close()
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health", timeout=10).json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health", timeout=10).json()["in_flight"] == 0
        assert "499" in s.log()
        assert client.completions.create(model="ft1", prompt="w1", max_tokens=2, temperature=0).choices[0].text
        # SIGTERM while a request is in flight: it finishes, then the process exits 0
        out: dict = {}

        def long_request():
            out["r"] = client.completions.create(model="ft1", prompt="w1", max_tokens=600, temperature=0)

        t = threading.Thread(target=long_request)
        t.start()
        while not httpx.get(s.url + "/health", timeout=10).json()["in_flight"]:
            time.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert out["r"].choices[0].finish_reason in ("length", "stop") and out["r"].usage.completion_tokens >= 1
        assert s.proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()


def test_sigterm_after_the_grace_period_ends_streams_with_abort(serve_home):
    s = Server(serve_home, "ft1", "--grace", "2")
    try:
        stream = s.client().completions.create(model="ft1", prompt="w1", max_tokens=1000, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        s.proc.send_signal(signal.SIGTERM)
        finish = [c.choices[0].finish_reason for c in it if c.choices]
        assert finish[-1] in ("abort", "length")  # (length if the machine decoded 1000 tokens in 1 s)
        assert s.proc.wait(60) == 0
        assert "Traceback" not in s.log()
    finally:
        s.stop()


def test_access_log_json_lines(serve_home):
    s = Server(serve_home, "ft2", "--json-logs")
    try:
        s.client().completions.create(model="ft2", prompt="w1", max_tokens=3, temperature=0)
        s.client().models.list()
    finally:
        assert s.stop() == 0
    records = [json.loads(line) for line in s.lines if line.startswith("{")]
    [req] = [r for r in records if r.get("event") == "request"]
    assert req["model"] == "ft2" and req["tokens_out"] >= 1 and req["ttft_s"] is not None and req["total_s"] > 0
    assert any("resident: ft2" in r["message"] for r in records)


def test_cli_refuses_bad_arguments(serve_home):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "deltahub.cli", "--home", str(serve_home), "serve", *args],
                              capture_output=True, text=True, timeout=120)

    r = run()
    assert r.returncode == 2 and "--all" in r.stderr
    r = run("nope", "--port", "0")
    assert r.returncode != 0 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = run("ft1", "--memory-budget", "lots")
    assert r.returncode == 2 and "--memory-budget" in r.stderr
    for args, needle in ((("--grace", "inf"), "--grace"), (("--grace", "nan"), "grace"), (("--device", "tpu"), "unknown device"),
                         (("--api-key", "ключ"), "ASCII")):
        r = run("ft1", *args)
        assert r.returncode not in (0, 70) and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = run("ft1", "--port", str(taken.getsockname()[1]))
    assert r.returncode == 5 and "cannot listen" in r.stderr and "resident" not in r.stderr  # before any model loads


def test_pull_on_demand_serves_a_hub_delta(serve_home, reference, tmp_path, hub_server):
    from hub_fixtures import FAKE_USER, plant_repo

    repo = f"{FAKE_USER}/ft2-delta"
    plant_repo(hub_server, "someone/tiny-base", "b" * 40)
    with deltahub.Store(serve_home) as store:
        store.push("ft2", repo, base_repo=f"someone/tiny-base@{'b' * 40}")
    fresh = tmp_path / "fresh"
    with deltahub.Store(fresh) as store:
        store.add(serve_home.parent / "ck" / "base", name="base")
    s = Server(fresh, "base", "--pull")
    try:
        client = s.client()
        text = client.completions.create(model=repo, prompt="w1 w2 w3", max_tokens=6, temperature=0).choices[0].text
        assert text == reference("ft2", "w1 w2 w3", 6)
        assert repo in {m.id for m in client.models.list()}
        for hostile in (f"{FAKE_USER}/missing", "../../etc/passwd", "a" * 300):
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=hostile, prompt="w1", max_tokens=2)
    finally:
        assert s.stop() == 0, s.log()


def test_two_bases_one_runtime_each_and_loads_while_others_decode(serve_home, reference, model_dirs, tmp_path):
    """A GPT-2 base and its fine-tune beside the Llama ones (--all: loaded on first request); a
    fine-tune loaded while a long stream on another decodes does not stop that stream."""
    import shutil

    home = tmp_path / "two"
    shutil.copytree(serve_home, home)
    with deltahub.Store(home) as store:
        store.add(model_dirs["gpt2"]["base"], name="gbase")
        store.compress(model_dirs["gpt2"]["ft"], base="gbase", name="gft")
        [want_g] = store.generate([("gft", "w1 w2")], max_new_tokens=5)
    s = Server(home, "ft1", "--all")
    try:
        client = s.client()
        stream = client.completions.create(model="ft1", prompt="w1", max_tokens=800, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        got = {}

        def other():
            got["start"] = time.monotonic()
            got["ft3"] = client.completions.create(model="ft3", prompt="w1 w2 w3", max_tokens=6, temperature=0)
            got["gft"] = client.completions.create(model="gft", prompt="w1 w2", max_tokens=5, temperature=0)
            got["end"] = time.monotonic()

        t = threading.Thread(target=other)
        t.start()
        stamps = [time.monotonic() for _ in it]
        t.join(120)
        assert any(got["start"] < ts < got["end"] for ts in stamps), "the stream stalled while models loaded"
        assert got["ft3"].choices[0].text == reference("ft3", "w1 w2 w3", 6)
        assert got["gft"].choices[0].text == want_g.text
        models = {m.id: m for m in client.models.list()}
        assert models["gft"].parent == "gbase" and models["ft3"].parent == "base"
        assert models["gft"].resident and models["gbase"].resident
    finally:
        assert s.stop() == 0, s.log()
