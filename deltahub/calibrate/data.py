"""Calibration and evaluation text, cut into fixed-length token samples.

Sources (:func:`load_samples`):

* a plain UTF-8 text file (any name but ``*.jsonl`` / ``*.ndjson``): the whole file is one document;
* a JSONL file (``*.jsonl`` / ``*.ndjson``): one JSON object per line, either ``{"text": "..."}`` or
  ``{"messages": [{"role": ..., "content": ...}, ...]}``, the latter rendered through the tokenizer's
  chat template (``tokenizer.apply_chat_template(messages, tokenize=False)``); blank lines are skipped;
* nothing (``path=None``): the bundled corpus ``deltahub/calibrate/data/alice.txt`` (chapters I-III of
  Lewis Carroll's *Alice's Adventures in Wonderland*, 1865, public domain). Its tokens are split
  80/20: calibration samples come from the first 80 %, evaluation samples from the last 20 %, so the
  default evaluation text is held out from the default calibration text.

Documents are tokenized without special tokens and joined into one stream, with the tokenizer's EOS
token between documents when it has one. The stream is cut into non-overlapping windows of
``seq_len`` tokens; ``samples`` of them are taken (a seeded random choice for calibration, evenly
spread for evaluation). Fewer windows than asked is allowed (a warning says so); less text than one
window is an :class:`~deltahub.errors.InputError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from deltahub.errors import InputError
from deltahub.formats import safe_json

__all__ = [
    "BUNDLED_CORPUS",
    "CALIBRATION_SHARE",
    "Samples",
    "read_documents",
    "token_stream",
    "cut_samples",
    "load_samples",
]

logger = logging.getLogger(__name__)

#: The bundled default corpus (package data).
BUNDLED_CORPUS = "alice.txt"
#: Share of the bundled corpus's tokens used for calibration; the rest is the default eval text.
CALIBRATION_SHARE = 0.8
JSONL_SUFFIXES = (".jsonl", ".ndjson")

Role = Literal["calibration", "eval"]


@dataclass
class Samples:
    """Token samples and where they came from.

    Attributes:
        tokens: int64 ``[S, T]``: ``S`` samples of ``T = seq_len`` token ids.
        description: the source, for the index (``"bundled:alice.txt[:80%]"``, a path, ...).
        available: how many non-overlapping windows the source had.
    """

    tokens: torch.Tensor
    description: str
    available: int

    @property
    def n_samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(f"data file {path} does not exist", "give the path of a text or JSONL file")
    if not path.is_file():
        raise InputError(f"data path {path} is not a file", "give the path of a text or JSONL file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise InputError(
            f"{path} is not a text file (it holds NUL bytes)", "give a UTF-8 text file or a JSONL file"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (byte {exc.start} is invalid)", "convert it to UTF-8 first"
        ) from None
    if not text.strip():
        raise InputError(f"data file {path} is empty", "give a file with some text in it")
    return text


def _render_messages(messages: Any, tokenizer: Any, where: str) -> str:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise InputError(
            f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}} objects",
            'fix that line, or use {"text": "..."}',
        )
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where}: chat messages need a chat template, and this model's tokenizer has none",
            'use {"text": "..."} lines or a plain text file',
        )
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    except Exception as exc:  # a template error (jinja) is the data's or the template's fault
        raise InputError(f"{where}: the chat template failed on these messages: {exc}", "check the messages") from None


def _jsonl_documents(path: Path, text: str, tokenizer: Any) -> list[str]:
    docs: list[str] = []
    # lines end at \n only: U+2028, U+2029 and U+0085 are valid inside a JSON string (splitlines splits there)
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = safe_json.loads(line, "the line")
        except safe_json.JSONInputError as exc:
            raise InputError(
                f"{where} is not valid JSON ({exc})",
                'a JSONL file holds one object per line: {"text": "..."} or {"messages": [...]}',
            ) from None
        if not isinstance(obj, dict) or ("text" not in obj and "messages" not in obj):
            raise InputError(
                f'{where} has neither "text" nor "messages"',
                'each line must be {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}',
            )
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise InputError(f'{where}: "text" must be a string', "fix that line")
            doc = obj["text"]
        else:
            doc = _render_messages(obj["messages"], tokenizer, where)
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but no text
            raise InputError(f"{where} holds a character that is not valid Unicode text ({exc.reason}, "
                             f"{doc[exc.start:exc.end]!r})", "remove the lone \\uD800-\\uDFFF escape from that line") from None
        if doc.strip():
            docs.append(doc)
    if not docs:
        raise InputError(f"data file {path} holds no text", 'add lines like {"text": "..."}')
    return docs


def read_documents(path: Path | str | None, tokenizer: Any) -> tuple[list[str], str]:
    """The documents of ``path`` (``None``: the bundled corpus) and a description of the source.

    Raises:
        InputError: a missing, empty, binary or malformed file (with the line for JSONL).
    """
    if path is None:
        text = resources.files("deltahub.calibrate").joinpath("data", BUNDLED_CORPUS).read_text("utf-8")
        return [text], f"bundled:{BUNDLED_CORPUS}"
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise InputError(
            f"{path} is a .json file; calibration data is plain text or JSONL (one JSON object per line)",
            'write one {"text": ...} or {"messages": [...]} object per line into a .jsonl file',
        )
    text = _read_text(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_documents(path, text, tokenizer), f"jsonl:{path}"
    return [text], f"text:{path}"


def token_stream(docs: list[str], tokenizer: Any) -> torch.Tensor:
    """int64 ``[L]``: every document's tokens (no special tokens), EOS between documents."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def cut_samples(
    stream: torch.Tensor, samples: int, seq_len: int, spread: bool, seed: int, what: str
) -> tuple[torch.Tensor, int]:
    """``(tokens [S, seq_len], windows available)`` from a token stream ``[L]``.

    ``spread``: windows evenly spaced over the stream (deterministic); otherwise a random choice
    seeded with ``seed``. Raises :class:`InputError` when the stream is shorter than one window.
    """
    if samples < 1 or seq_len < 2:
        raise InputError(
            f"need at least 1 sample of at least 2 tokens, got {samples} of {seq_len}",
            "raise the number of samples or the sequence length",
        )
    available = int(stream.numel()) // seq_len
    if available < 1:
        raise InputError(
            f"{what} has {stream.numel()} tokens, shorter than one sequence of {seq_len}",
            "give more text, or lower the sequence length",
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    if available <= samples:
        if available < samples:
            logger.warning("%s has %d sequences of %d tokens; using those instead of %d", what, available, seq_len, samples)
        return windows.clone(), available
    if spread:
        pick = torch.linspace(0, available - 1, samples).round().long()
    else:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(available, generator=gen)[:samples].sort().values
    return windows[pick].clone(), available


def load_samples(
    path: Path | str | None,
    tokenizer: Any,
    samples: int,
    seq_len: int,
    role: Role = "calibration",
    seed: int = 0,
) -> Samples:
    """Read, tokenize and cut ``path`` (``None``: the bundled corpus) into samples for ``role``.

    Calibration samples are a seeded random choice; evaluation samples are evenly spread. With the
    bundled corpus, calibration uses its first :data:`CALIBRATION_SHARE` of tokens and eval the rest.
    """
    docs, description = read_documents(path, tokenizer)
    stream = token_stream(docs, tokenizer)
    if path is None:
        cut = int(stream.numel() * CALIBRATION_SHARE)
        if role == "calibration":
            stream, description = stream[:cut], f"{description}[:{CALIBRATION_SHARE:.0%}]"
        else:
            stream, description = stream[cut:], f"{description}[{CALIBRATION_SHARE:.0%}:]"
    what = "the bundled corpus" if path is None else str(path)
    tokens, available = cut_samples(stream, samples, seq_len, spread=(role == "eval"), seed=seed, what=what)
    return Samples(tokens, description, available)
