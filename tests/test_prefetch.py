"""The read-ahead helper keeps order, propagates errors and respects its memory budget."""

from __future__ import annotations

import random
import threading

import pytest

from deltahub.ops.prefetch import prefetched


def test_order_and_results():
    items = list(range(40))
    assert [(i, r) for i, r in prefetched(items, lambda x: x * 2)] == [(i, 2 * i) for i in items]
    assert list(prefetched([], lambda x: x)) == []


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_budget_bounds_what_is_held(depth):
    rng = random.Random(depth)
    items = list(range(60))
    sizes = {i: rng.choice([1, 50, 200, 700]) for i in items}
    budget = 512
    lock = threading.Lock()
    held: dict[int, int] = {}
    peaks: list[int] = []

    def load(i: int) -> int:
        with lock:
            held[i] = sizes[i]
            peaks.append(sum(held.values()))
        return i

    seen = []
    for item, result in prefetched(items, load, size=lambda i: sizes[i], budget=budget, depth=depth):
        assert item == result
        seen.append(item)
        with lock:
            held.pop(item)
    assert seen == items
    largest = max(sizes.values())
    assert max(peaks) <= max(budget, largest)


def test_errors_propagate():
    def load(i: int) -> int:
        if i == 5:
            raise ValueError("bad item")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item"):
        for item, _ in prefetched(list(range(10)), load):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
