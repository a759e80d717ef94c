"""Alembic environment of the deltahub index.

Two ways in:

* programmatically from :class:`deltahub.index.db.Index`, which passes an open SQLAlchemy
  connection (already inside a transaction) through ``config.attributes["connection"]``;
* from the ``alembic`` command line with the repository's ``alembic.ini`` (developers, e.g.
  ``alembic -c alembic.ini revision --autogenerate -m "..."``), which builds an engine from
  ``sqlalchemy.url`` (override with ``-x url=sqlite:///path/to/scratch.db``).
"""

from __future__ import annotations

import logging
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import engine_from_config, pool
from sqlalchemy.engine import Connection

from deltahub.index.models import Base, UTCDateTime

config = context.config

# Only configure logging when run from the alembic CLI with an ini file; a programmatic
# caller (deltahub itself) keeps its own logging set-up.
if (
    config.config_file_name is not None
    and config.attributes.get("connection") is None
    and config.file_config.has_section("loggers")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

logger = logging.getLogger("deltahub.migrations")

target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Render deltahub's column types as plain SQLAlchemy types in generated migrations.

    ``UTCDateTime`` is a Python-side conversion only; in the database it is a ``DateTime``.
    Migrations must not import deltahub code, so render it as ``sa.DateTime()``.
    """
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def _configure_kwargs() -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "render_as_batch": True,
        "compare_type": True,
        "render_item": render_item,
    }


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    return url or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    """Emit SQL to the script output instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_kwargs(),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_kwargs())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations against a live database."""
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _run_with_connection(connection)
        return

    section = dict(config.get_section(config.config_ini_section, {}))
    section["sqlalchemy.url"] = _url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    try:
        with connectable.connect() as conn:
            _run_with_connection(conn)
    finally:
        connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
