"""The OpenAI request bodies ``deltahub serve`` accepts, checked field by field.

Each parser takes the decoded JSON object of a request and returns a :class:`GenerationParams` or
raises :class:`RequestError` (HTTP 400) naming the field and what to send instead. Fields the server
cannot honour (``n`` > 1, ``logprobs``, penalties, ``logit_bias``, …) are refused, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltahub import defaults
from deltahub.codec.codecs import HintedError

__all__ = ["MAX_STOP", "GenerationParams", "RequestError", "parse_chat", "parse_completion"]

MAX_STOP = 4  # stop sequences per request (as OpenAI)
MAX_STOP_CHARS = 256  # characters per stop sequence (each is matched against the text at every token)
MAX_SEED = 2**63 - 1
MAX_MODEL_CHARS = 256  # longer than any store name or Hub repo id (with its revision)


class RequestError(HintedError, ValueError):
    """A request body the server refuses (HTTP ``status``, 400 unless said otherwise)."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.param = param


@dataclass
class GenerationParams:
    """What one request asks for. ``prompt``: text, or token ids (completions only);
    ``messages``: chat messages (chat only)."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None  # None: the endpoint's default, capped by the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}", param=key)
    return float(value)


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{key}' must be a whole number from {low} to {high}, got {value!r}", param=key)
    return value


def _common(body: Any, endpoint: str) -> GenerationParams:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", f"see the OpenAI {endpoint} API")
    model = body.get("model")
    if isinstance(model, str) and len(model) > MAX_MODEL_CHARS:
        raise RequestError(f"'model' is {len(model)} characters long; stored names and Hub repo ids are shorter",
                           "GET /v1/models lists the names served", param="model", status=404)
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: the stored name of a fine-tune or base",
                           "GET /v1/models lists the names served", param="model")
    n = body.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise RequestError(f"'n' must be 1 (one choice per request), got {n!r}", "send one request per choice",
                           param="n")
    for key, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("logit_bias", None),
                         ("logprobs", None), ("top_logprobs", None), ("best_of", 1), ("suffix", None),
                         ("tools", None), ("functions", None), ("tool_choice", "none"), ("function_call", "none"),
                         ("response_format", {"type": "text"})):
        value = body.get(key)
        if value is not None and value != neutral and value is not False and value != {}:
            raise RequestError(f"'{key}' is not supported by deltahub serve", f"leave '{key}' out", param=key)
    if body.get("echo"):
        raise RequestError("'echo' is not supported by deltahub serve", "leave 'echo' out", param="echo")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise RequestError(f"'stop' takes at most {MAX_STOP} non-empty strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"a stop string is longer than {MAX_STOP_CHARS} characters", "shorten it", param="stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    return GenerationParams(
        model=model,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,  # 0 keeps only the top token
        stop=stops,
        seed=_int(body, "seed", -MAX_SEED, MAX_SEED),
        stream=_bool(body, "stream", False),
        include_usage=bool(options and options.get("include_usage") is True),
    )


def parse_completion(body: Any) -> GenerationParams:
    """A ``POST /v1/completions`` body: ``prompt`` is text or token ids (one prompt)."""
    params = _common(body, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", "give some text to continue", param="prompt")
        params.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        params.prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("one prompt per request", "send one request per prompt", param="prompt")
    else:
        raise RequestError("'prompt' must be a string or a list of token ids", param="prompt")
    params.max_tokens = _int(body, "max_tokens", 1, 1 << 30)
    return params


_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: Any) -> GenerationParams:
    """A ``POST /v1/chat/completions`` body: ``messages`` with text content."""
    params = _common(body, "chat completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise RequestError(f"messages[{i}] needs a 'role' of {', '.join(_ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be text", param="messages")
        out.append({"role": m["role"], "content": content})
    params.messages = out
    mt = _int(body, "max_completion_tokens", 1, 1 << 30)
    params.max_tokens = mt if mt is not None else _int(body, "max_tokens", 1, 1 << 30)
    return params


def default_max_tokens(chat: bool) -> int:
    return defaults.SERVE_CHAT_MAX_TOKENS if chat else defaults.SERVE_COMPLETION_MAX_TOKENS
