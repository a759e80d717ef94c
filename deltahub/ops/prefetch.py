"""Read the next item while the current one is processed (one item ahead, one thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


#: Read ahead only while the current and the next item's inputs fit in this many bytes.
PREFETCH_BUDGET = 512 << 20


def prefetched(
    items: Sequence[T],
    load: Callable[[T], R],
    size: Callable[[T], int] | None = None,
    budget: int = PREFETCH_BUDGET,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, running ``load`` for the next item in a background
    thread meanwhile. File reads, sha256 and torch ops release the GIL, so on two cores reading and
    hash-verifying overlap with decoding and writing.

    At most two results are alive at once, and only while ``size(current) + size(next) <= budget``
    (when ``size`` is given): a pair of large tensors (embeddings, LM head) is loaded one at a time,
    so memory stays bounded by the largest tensor rather than by the two largest.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltahub-prefetch") as pool:
        pending: Future[R] | None = pool.submit(load, items[0])
        for i, item in enumerate(items):
            result = pending.result() if pending is not None else load(item)
            pending = None
            if i + 1 < len(items):
                nxt = items[i + 1]
                if size is None or size(item) + size(nxt) <= budget:
                    pending = pool.submit(load, nxt)
            yield item, result
            del result
