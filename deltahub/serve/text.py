"""Token ids to text, incrementally, with stop strings: what a streamed response sends.

The text of a response is always ``tokenizer.decode(all ids so far, skip_special_tokens=True)``
(the same as decoding the whole answer at once), cut at the first stop string. A piece is sent only
when it can no longer change: text ending in an incomplete UTF-8 character (``U+FFFD``) or in the
start of a stop string is held back until the next token settles it.
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
        self.sent = ""  # text already returned
        self.stopped = False  # a stop string was found: the text is final

    @property
    def text(self) -> str:
        return self.sent

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (possibly ``""``)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the text once no token follows (nothing is held back any more)."""
        if self.stopped:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._take(full[:cut])
        if final:
            return self._take(full)
        ready = len(full)
        if full.endswith("\ufffd"):  # an incomplete character: wait for the next token
            ready = len(full.rstrip("\ufffd"))
        for s in self.stop:  # a stop string may be starting at the end
            for k in range(min(len(s) - 1, ready), 0, -1):
                if full[:ready].endswith(s[:k]):
                    ready -= k
                    break
        return self._take(full[:ready])

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, upto: str) -> str:
        if not upto.startswith(self.sent):  # decoding changed earlier text (rare): send nothing back
            return ""
        piece = upto[len(self.sent):]
        self.sent = upto
        return piece
