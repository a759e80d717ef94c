"""``ModelPool.unload``: what a cache outside the pool (Ray Serve's multiplexing) uses to give
memory back. A model in use stays; a base goes with its fine-tunes; a later request reloads."""

from __future__ import annotations

import pytest
from serve_fixtures import make_serve_store

from deltahub.errors import NameNotFoundError
from deltahub.ops.pool import ModelPool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    home = make_serve_store(tmp_path_factory.mktemp("pool"))
    p = ModelPool(home, ["base", "ft1", "ft2"], device="cpu", preload=False)
    yield p
    p.close(cancel=True, timeout=5)


def test_unload_frees_a_delta_unless_in_use_and_a_base_with_its_fine_tunes(pool):
    for name in ("ft1", "ft2"):
        pool.acquire(name)
        pool.release(name)
    resident = pool.resident()
    assert "ft1" in resident and "ft2" in resident and any(k.startswith("base:") for k in resident)
    pool.acquire("ft1")  # in use: it stays
    assert pool.unload("ft1") is False and "ft1" in pool.resident()
    pool.release("ft1")
    assert pool.unload("ft1") is True
    assert "ft1" not in pool.resident() and "ft2" in pool.resident()
    assert pool.unload("ft1") is True  # not resident: nothing to do
    used = pool.used_bytes()
    assert pool.unload("ft2", base=True) is True
    assert pool.resident() == {} and pool.used_bytes() < used
    pool.acquire("ft1")  # loads again on demand
    pool.release("ft1")
    assert "ft1" in pool.resident()
    with pytest.raises(NameNotFoundError):
        pool.unload("nope")
