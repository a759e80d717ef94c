"""Token ids to text, incrementally, with stop strings: what a streamed response sends.

Each token's text is the difference between decoding a short window of the latest tokens with and
without it (as TGI and vLLM do: linear in the answer's length, and exact for tokenizers whose
pieces join, such as byte-level BPE or word-level ones), cut at the first stop string. A piece is
sent only when it can no longer change: text ending in an incomplete UTF-8 character (``U+FFFD``)
waits for the next token, and text that could be the start of a stop string is held back until the
next token settles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """Feed token ids with :meth:`push`; each call returns the new text that is final."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.decoded = ""  # the text of every token so far that is complete
        self.sent = ""  # text already returned (a prefix of ``decoded``)
        self._prefix = 0  # the decoding window: ids[_prefix:_read] is already in ``decoded``
        self._read = 0
        self.stopped = False  # a stop string was found: the text is final

    @property
    def text(self) -> str:
        return self.sent

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (possibly ``""``)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self._decode_new(final=False)
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the text once no token follows (nothing is held back any more)."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._advance(final=True)

    def _decode_new(self, final: bool) -> None:
        """Append the text of the tokens after ``_read`` to ``decoded`` (unless it ends mid-character)."""
        if self._read >= len(self.ids):
            return
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not final and (after.endswith("\ufffd") or len(after) <= len(before)):
            return  # an incomplete character (or nothing yet): wait for the next token
        self.decoded += after[len(before):] if after.startswith(before) else after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)

    def _advance(self, final: bool) -> str:
        full = self.decoded
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._take(full[:cut])
        if final:
            return self._take(full)
        ready = len(full)
        for s in self.stop:  # a stop string may be starting at the end: hold that much back
            for k in range(min(len(s) - 1, ready - len(self.sent)), 0, -1):
                if full.endswith(s[:k], 0, ready):
                    ready -= k
                    break
        return self._take(full[:ready])

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        piece = upto[len(self.sent):]
        self.sent = upto
        return piece
