"""The store's SQLite index (SQLAlchemy ORM models, Alembic-managed schema).

It records objects, manifests, per-tensor statistics and names; it never touches object
bytes (that is ``deltahub.store``'s job).
"""

from __future__ import annotations

from deltahub.index import models
from deltahub.index.db import SCHEMA_HEAD, Index, alembic_config, migrations_dir
from deltahub.index.models import (
    Base,
    ManifestObjectRow,
    ManifestRow,
    NameRow,
    ObjectRow,
    TensorStatRow,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "SCHEMA_HEAD",
    "Base",
    "Index",
    "ManifestObjectRow",
    "ManifestRow",
    "NameRow",
    "ObjectRow",
    "TensorStatRow",
    "UTCDateTime",
    "alembic_config",
    "migrations_dir",
    "models",
    "utcnow",
]
