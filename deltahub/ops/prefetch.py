"""Read the next items while the current one is processed (a few items ahead, in threads)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Inputs of the items being read ahead plus the current one stay within this many bytes.
PREFETCH_BUDGET = 512 << 20
#: Items read ahead at once. Reading and hash-verifying (sha256, ~1.8 GB/s a core) is the slow
#: part of materialize and compress, and two readers keep both cores busy with it.
PREFETCH_DEPTH = 2


def prefetched(
    items: Sequence[T],
    load: Callable[[T], R],
    size: Callable[[T], int] | None = None,
    budget: int = PREFETCH_BUDGET,
    depth: int = PREFETCH_DEPTH,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, running ``load`` for up to ``depth`` later items in
    background threads meanwhile. File reads, sha256 and torch ops release the GIL, so reading and
    hash-verifying overlap with decoding and writing.

    With ``size``, items are read ahead only while the current item and those in flight fit in
    ``budget`` bytes; an item that does not fit is read when its turn comes. A pair of large
    tensors (embeddings, LM head) is thus never held at once, and memory stays bounded by the
    budget or the largest tensor, not by the model.
    """
    if not items:
        return
    sizes = [size(item) for item in items] if size is not None else [0] * len(items)
    with ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="deltahub-prefetch") as pool:
        pending: deque[Future[R]] = deque()
        submitted = 0  # items[:submitted] have been submitted (or loaded inline)
        for i, item in enumerate(items):
            if not pending:
                # Nothing in flight: the current item was not read ahead (budget); read it now.
                result = load(item)
                submitted = i + 1
            else:
                result = pending.popleft().result()
            in_flight = sizes[i] + sum(sizes[submitted - len(pending) : submitted])
            while (
                submitted < len(items)
                and len(pending) < depth
                and (size is None or in_flight + sizes[submitted] <= budget)
            ):
                pending.append(pool.submit(load, items[submitted]))
                in_flight += sizes[submitted]
                submitted += 1
            yield item, result
            del result
