"""Read the next item while the current one is processed (one item ahead, one thread)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Sequence[T], load: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, running ``load`` for the next item in a background
    thread meanwhile. File reads, sha256 and torch ops release the GIL, so on two cores reading and
    hash-verifying overlap with decoding and writing. At most two results are alive at once."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltahub-prefetch") as pool:
        pending: Future[R] = pool.submit(load, items[0])
        for i, item in enumerate(items):
            result = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(load, items[i + 1])
            yield item, result
            del result
