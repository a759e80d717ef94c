"""Incremental detokenizing for streamed responses: pieces concatenate to the whole text, stop strings
cut it (also across tokens), nothing that a later token could change is sent early."""

from __future__ import annotations

import pytest

from deltahub.serve.protocol import RequestError, parse_chat, parse_completion
from deltahub.serve.text import TextStream


class Chars:
    """A tokenizer whose token i is ``PIECES[i]``; id 9 is half of a 2-token character."""

    PIECES = ["Hel", "lo", " wor", "ld", "!", " St", "OP", " end", "\n"]

    def decode(self, ids, skip_special_tokens=True):
        out, pending = "", False
        for i in ids:
            if i == 9:
                pending = True
                continue
            if pending and i == 10:
                out += "é"
                pending = False
                continue
            out += self.PIECES[i]
        return out + ("\ufffd" if pending else "")


def _run(ids, stop=()):
    s = TextStream(Chars(), stop)
    pieces = [s.push(i) for i in ids]
    pieces.append(s.finish())
    return pieces, s


def test_pieces_concatenate_to_the_whole_text():
    pieces, s = _run([0, 1, 2, 3, 4])
    assert "".join(pieces) == "Hello world!" == s.text and pieces[0] == "Hel"


def test_stop_string_across_tokens_is_held_back_then_cut():
    pieces, s = _run([0, 1, 5, 6, 7], stop=[" StOP"])
    assert "".join(pieces) == "Hello" and s.stopped
    assert pieces[2] == ""  # " St" could start the stop string: not sent
    pieces, s = _run([0, 1, 5, 7], stop=[" StOP"])  # " St" then " end": it was not the stop string
    assert "".join(pieces) == "Hello St end" and not s.stopped


def test_incomplete_character_waits_for_its_second_token():
    pieces, _ = _run([0, 9, 10, 4])
    assert pieces[1] == "" and pieces[2] == "é" and "".join(pieces) == "Helé!"


def test_request_bodies_are_checked_field_by_field():
    p = parse_completion({"model": "m", "prompt": ["w1 w2"], "stop": "x", "seed": 3, "stream": True})
    assert p.prompt == "w1 w2" and p.stop == ["x"] and p.seed == 3 and p.stream and p.max_tokens is None
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    c = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 5})
    assert c.messages == [{"role": "user", "content": "hi"}] and c.max_tokens == 5
    for bad, field in [({"prompt": "x"}, "model"), ({"model": "m"}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
                       ({"model": "m", "prompt": "x", "n": 3}, "'n'"), ({"model": "m", "prompt": "x", "top_p": 2}, "top_p"),
                       ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "stop"),
                       ({"model": "m", "prompt": "x", "stop": "a" * 257}, "longer"),
                       ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
                       ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
                       ({"model": "m", "prompt": ["a", "b"]}, "one prompt"),
                       ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty")]:
        with pytest.raises(RequestError, match=field):
            parse_completion(bad)
    with pytest.raises(RequestError, match="role"):
        parse_chat({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for key, value in (("response_format", {"type": "json_object"}), ("tool_choice", "auto"), ("function_call", "auto")):
        with pytest.raises(RequestError, match=f"'{key}' is not supported"):  # refused, not silently ignored
            parse_chat({**chat, key: value})
    assert parse_chat({**chat, "response_format": {"type": "text"}, "tool_choice": "none"}).messages
    with pytest.raises(RequestError, match="JSON object"):
        parse_completion([1, 2])


class _Present:
    """A client that never goes away (``is_disconnected`` is always False), counting the checks."""

    def __init__(self) -> None:
        self.checks = 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return False


def test_a_slow_engine_is_no_disconnect(monkeypatch):
    """Tokens slower than the disconnect-check interval: the request still ends with its own
    finish reason and every token (a regression: a quiet interval was once read as the end)."""
    import asyncio

    from deltahub.serve import app as app_mod
    from deltahub.serve.protocol import GenerationParams

    monkeypatch.setattr(app_mod, "DISCONNECT_CHECK_S", 0.01)
    job = app_mod._Job(GenerationParams(model="m", prompt=[1]), runtime=None, tenant=0, tokenizer=None, chat=False, t0=0.0)
    client = _Present()

    async def run() -> dict:
        async def engine() -> None:
            for t in (5, 6, 7):
                await asyncio.sleep(0.05)  # 5 check intervals without an event
                job.queue.put_nowait(("token", t))
            job.queue.put_nowait(("done", "length"))

        feeder = asyncio.ensure_future(engine())
        out = await job.collect(client)
        await feeder
        return out

    out = asyncio.run(run())
    assert job.tokens == [5, 6, 7] and job.finish_reason == "length" and job.status == 200
    assert out is not None and out["usage"]["completion_tokens"] == 3
    assert client.checks >= 5  # the client was checked while the engine was quiet
