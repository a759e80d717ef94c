"""Content-addressed object storage and the locks around it. Never imports ``deltahub.index``.

Layout: ``format`` (object path and header), ``writer`` (durable writes, batches), ``readers`` (one
payload reader per encoding), ``refs`` (reference objects), ``temp`` (the ``tmp/`` folder),
``objects`` (:class:`ObjectStore`, joining them) and ``lock`` (file locks).
"""

from deltahub.store.format import HEADER_SIZE, Encoding, ObjectInfo, check_object_id
from deltahub.store.lock import file_lock
from deltahub.store.objects import ObjectStore
from deltahub.store.writer import Compression, fsync_dir

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
