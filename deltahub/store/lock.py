"""Advisory file locks (``fcntl.flock``) shared by the processes that use one store.

``locks/gc.lock``: every writer (add, compress, ...) holds it *shared* from its first object
write until its name is published; ``gc`` holds it *exclusive*, so it never deletes objects that a
running writer has written but not yet indexed. ``locks/names.lock``: exclusive around name updates.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deltahub.errors import StoreError


@contextmanager
def file_lock(path: Path, exclusive: bool, timeout: float | None = None) -> Iterator[None]:
    """Hold a shared or exclusive flock on ``path`` for the duration of the block.

    ``timeout=None`` waits forever; otherwise raises :class:`StoreError` after ``timeout`` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:  # a store this user may only read: flock works on a read-only fd too
        fd = os.open(path, os.O_RDONLY)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"the store is busy (could not lock {path.name} in {timeout:.0f}s)",
                            "another deltahub process is running gc or writing; retry when it is done",
                        ) from None
                    time.sleep(0.05)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
