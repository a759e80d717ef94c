"""The store's SQLite index (SQLAlchemy ORM models, Alembic-managed schema).

It records objects, manifests, per-tensor statistics and names; it never touches object
bytes (that is ``deltahub.store``'s job). The rest of deltahub calls the methods of :class:`Index`
(:mod:`deltahub.index.queries`) and gets plain dataclasses (:mod:`deltahub.index.records`) back;
only this package opens sessions or touches ORM rows (the row classes are exported for the
migrations and the tests).
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
from deltahub.index.records import (
    IndexSnapshot,
    ManifestDetails,
    ManifestEntry,
    NamedModel,
    NameEntry,
    NewManifest,
    ObjectEntry,
    Pruned,
    ResolvedName,
    TensorStat,
    TensorStatEntry,
)

__all__ = [
    "SCHEMA_HEAD",
    "Base",
    "Index",
    "IndexSnapshot",
    "ManifestDetails",
    "ManifestEntry",
    "ManifestObjectRow",
    "ManifestRow",
    "NameEntry",
    "NameRow",
    "NamedModel",
    "NewManifest",
    "ObjectEntry",
    "ObjectRow",
    "Pruned",
    "ResolvedName",
    "TensorStat",
    "TensorStatEntry",
    "TensorStatRow",
    "UTCDateTime",
    "alembic_config",
    "migrations_dir",
    "models",
    "utcnow",
]
