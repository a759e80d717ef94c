"""Content-addressed object storage and the locks around it. Never imports ``deltahub.index``."""

from deltahub.store.lock import file_lock
from deltahub.store.objects import (
    HEADER_SIZE,
    Compression,
    Encoding,
    ObjectInfo,
    ObjectStore,
    check_object_id,
    fsync_dir,
)

__all__ = [
    "HEADER_SIZE",
    "Compression",
    "Encoding",
    "ObjectInfo",
    "ObjectStore",
    "check_object_id",
    "file_lock",
    "fsync_dir",
]
