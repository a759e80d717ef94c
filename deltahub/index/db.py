"""The store's SQLite index: engine set-up, schema migrations and short transactions.

:class:`Index` opens (creating if needed) the SQLite database, sets the per-connection
pragmas (WAL, ``synchronous=NORMAL``, foreign keys, busy timeout) and brings the schema to
:data:`SCHEMA_HEAD` with Alembic, under an exclusive ``flock`` so that concurrent processes
opening a brand-new store do not race. Opening a database that is already at head costs one
small query and does not import Alembic at all.

This module does no I/O on store objects and never imports ``deltahub.store``.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import importlib.resources
import logging
import os
import resource
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from deltahub.errors import DiskFullError, StoreError, UnsupportedFormatError
from deltahub.fileio import disk_full_error, free_bytes, is_disk_full
from deltahub.index.queries import IndexQueries

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["SCHEMA_HEAD", "Index", "alembic_config", "migrations_dir"]

logger = logging.getLogger(__name__)

#: The Alembic revision this deltahub writes and expects (the single head of the migrations).
SCHEMA_HEAD = "0002_calibration"

#: Pragmas run on every new DBAPI connection. ``busy_timeout`` comes first so that switching
#: a new database to WAL waits for a concurrent opener instead of failing.
_CONNECT_PRAGMAS: tuple[str, ...] = (
    "PRAGMA busy_timeout=30000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)

#: Execution option read by the ``begin`` listener: ``"IMMEDIATE"`` or ``"DEFERRED"``.
_BEGIN_MODE = "deltahub_sqlite_begin"

_UPGRADE_HINT = "upgrade deltahub (pip install -U deltahub)"

#: Below this many free bytes on the index's disk, the store's reserve is released before SQLite
#: opens or writes (its -shm file alone is 32 kB; a small write transaction a few pages).
LOW_SPACE_BYTES = 1 << 20
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14


def migrations_dir() -> Path:
    """The folder holding ``env.py`` and ``versions/`` of the index migrations.

    In an installed deltahub (regular or editable) that is the package
    ``deltahub.migrations``; in a bare source checkout (not installed, ``PYTHONPATH=.``) it
    falls back to the repository's top-level ``migrations/`` folder next to ``deltahub/``.

    Raises:
        StoreError: the migrations cannot be found (a broken installation).
    """
    path: Path | None = None
    try:
        package = importlib.import_module("deltahub.migrations")
    except ModuleNotFoundError as exc:
        if exc.name not in ("deltahub.migrations", "deltahub"):
            raise
        package = None
    if package is not None:
        files = importlib.resources.files(package)
        if isinstance(files, Path):
            path = files
        elif getattr(package, "__file__", None):
            path = Path(str(package.__file__)).parent
    if path is None:
        path = Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise StoreError(
            f"the index migrations are missing (looked in {path})",
            hint="reinstall deltahub",
        )
    return path


def alembic_config(connection: Connection | None = None) -> Config:
    """A programmatic Alembic config pointing at the installed migrations.

    ``connection``, if given, is handed to ``env.py`` through
    ``config.attributes["connection"]``; migrations then run on it, inside whatever
    transaction it is in.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


#: How long a connect-time pragma retries while another connection holds the lock it needs.
_PRAGMA_BUSY_SECONDS = 30.0


def _execute_pragma(cursor: sqlite3.Cursor, pragma: str) -> None:
    """Run one connect-time pragma, retrying while the database is locked.

    Switching a brand-new database to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once, without calling the busy handler, when another process is switching it or
    creating the schema at that moment (two ``deltahub add`` into a new store). The pragma is
    retried for up to :data:`_PRAGMA_BUSY_SECONDS`, the same patience as ``busy_timeout``.
    """
    deadline = time.monotonic() + _PRAGMA_BUSY_SECONDS
    delay = 0.005
    while True:
        try:
            cursor.execute(pragma)
            return
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            locked = "database is locked" in text or "database is busy" in text
            if not locked or time.monotonic() >= deadline:
                raise
            logger.debug("%s: the database is locked; retrying", pragma)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _install_sqlite_listeners(engine: Engine) -> None:
    """Set the pragmas on connect and let SQLAlchemy, not pysqlite, emit ``BEGIN``.

    pysqlite's own transaction handling does not begin a transaction before DDL or
    ``SELECT``; taking it over (``isolation_level = None`` plus an explicit ``BEGIN``) makes
    migrations transactional and lets write sessions take the write lock up front.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _CONNECT_PRAGMAS:
                _execute_pragma(cursor, pragma)
                if pragma.startswith("PRAGMA journal_mode"):
                    mode = cursor.fetchone()
                    if not mode or str(mode[0]).lower() != "wal":
                        logger.warning(
                            "SQLite refused WAL journal mode (got %r); concurrent access "
                            "to the index will be slower",
                            mode[0] if mode else None,
                        )
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def _exclusive_lock(lock_path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(
            f"cannot open the index lock file {lock_path}: {exc.strerror}",
            hint="check the store directory's permissions",
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreError(
                        f"cannot lock {lock_path}: {exc.strerror}",
                        hint="check the store directory's permissions",
                    ) from exc
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"timed out after {timeout:.0f}s waiting for the index lock {lock_path}",
                        hint="another deltahub process is upgrading the store; retry later",
                    ) from exc
                if not waited:
                    logger.info("waiting for another process to finish setting up the index")
                    waited = True
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Index(IndexQueries):
    """The SQLite index of a store; its queries and writes are :class:`IndexQueries`' methods.

    Args:
        db_path: the SQLite database file (created if missing, parent directories too).
        lock_path: a file used only to serialise schema creation/upgrades between processes
            (created if missing). Do not hold an ``flock`` on it yourself while opening an
            ``Index`` in the same process: ``flock`` locks are per open file, so that would
            wait for itself until ``lock_timeout``.
        lock_timeout: seconds to wait for that lock before giving up with :class:`StoreError`.

    Raises:
        UnsupportedFormatError: the database was written by a newer deltahub.
        StoreError: the database cannot be opened or upgraded.
    """

    def __init__(
        self,
        db_path: Path,
        lock_path: Path,
        *,
        lock_timeout: float = 120.0,
        low_space: Callable[[], object] | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.lock_path = Path(lock_path)
        self._lock_timeout = lock_timeout
        #: called before SQLite is opened or written when the disk is nearly full (the store
        #: releases its space reserve there, so that rm, gc and reads keep working)
        self._low_space = low_space
        #: why the index could only be opened read-only ("full", "not writable"), else "" (writable)
        self.read_only = ""
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the index directory {self.db_path.parent}: {exc.strerror}",
                hint="check the store directory's permissions",
            ) from exc

        self._make_engines()
        self._check_space()
        try:
            self._ensure_schema()
        except DiskFullError:
            self._engine.dispose()
            if not self._open_read_only("full"):
                raise
        except StoreError:
            self._engine.dispose()
            # a store the user may read but not write (a shared, read-only folder): reads still work
            if os.access(self.db_path.parent, os.W_OK) or not self._open_read_only("not writable"):
                raise
        except BaseException:
            self._engine.dispose()
            raise

    def _make_engines(self) -> None:
        self._engine: Engine = create_engine(
            # URL.create: a path holding "?" or "#" is a path, not a query string
            URL.create("sqlite", database=str(self.db_path)), connect_args={"timeout": 30}
        )
        _install_sqlite_listeners(self._engine)
        self._write_engine: Engine = self._engine.execution_options(
            **{_BEGIN_MODE: "IMMEDIATE"}
        )
        self.read_only = ""

    # ------------------------------------------------------------------------ full disks

    def _check_space(self) -> None:
        """Before SQLite needs room (its -shm and -wal files, a write transaction): on a nearly full
        disk, let the store free its reserve first."""
        if self._low_space is None:
            return
        free = free_bytes(self.db_path.parent)
        if free is not None and free < LOW_SPACE_BYTES:
            logger.info("the disk holding %s is nearly full (%d bytes free)", self.db_path, free)
            self._low_space()

    def _disk_full(self, exc: BaseException) -> bool:
        """Whether SQLite failed for lack of room: SQLITE_FULL, or an I/O error (it cannot grow its
        -shm or -wal file) on a disk with almost nothing free."""
        original = getattr(exc, "orig", None) or exc
        code = getattr(original, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(original).lower()
        if primary == _SQLITE_FULL or "database or disk is full" in text:
            return True
        if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk i/o error" in text:
            free = free_bytes(self.db_path.parent)
            return (free is not None and free < LOW_SPACE_BYTES) or self._file_size_limited()
        return is_disk_full(original)

    def _file_size_limited(self) -> bool:
        """Whether the file size limit (``ulimit -f``) is too low for the index to grow: SQLite reports
        the EFBIG of its -shm (32 KiB) or -wal file as a plain I/O error."""
        try:
            soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        except (OSError, ValueError):
            return False
        if soft == resource.RLIM_INFINITY or soft < 0:
            return False
        sizes = [32 << 10]
        for path in (self.db_path, self.db_path.with_name(self.db_path.name + "-wal")):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                pass
        return soft <= max(sizes) + (1 << 20)

    def _full_error(self, what: str) -> DiskFullError:
        if self._file_size_limited():
            return disk_full_error(OSError(errno.EFBIG, os.strerror(errno.EFBIG)), self.db_path.parent, what)
        return disk_full_error(None, self.db_path.parent, what)

    def _open_read_only(self, why: str) -> bool:
        """On a full disk (``why="full"``) or in a folder this user may not write (``"not
        writable"``), open the index read-only when that reads everything: SQLite cannot create its
        -shm file, but when no write-ahead log is pending the database file is complete and is read
        as immutable. Reads (ls, show, du, verify, materialize) then work; writes raise
        :class:`DiskFullError` or :class:`StoreError`."""
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        try:
            pending = wal.exists() and wal.stat().st_size > 0
        except OSError:
            pending = True
        if pending or not self.db_path.is_file():
            return False
        uri = "file:" + urllib.parse.quote(str(self.db_path.resolve())) + "?mode=ro&immutable=1"
        self._engine = create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        )

        @event.listens_for(self._engine, "connect")
        def _ro_connect(dbapi_connection: Any, connection_record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(self._engine, "begin")
        def _ro_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN DEFERRED")

        self._write_engine = self._engine
        try:
            if self.current_revision() != SCHEMA_HEAD:
                self._engine.dispose()
                return False
        except (StoreError, SQLAlchemyError):
            self._engine.dispose()
            return False
        self.read_only = why
        if why == "full" and self._file_size_limited():
            logger.warning("the file size limit (ulimit -f) is too low for %s to grow: the index was opened read-only",
                           self.db_path)
        elif why == "full":
            logger.warning("the disk holding %s is full: the index was opened read-only", self.db_path)
        else:
            logger.info("%s is not writable: the index was opened read-only", self.db_path.parent)
        return True

    def reopen(self) -> None:
        """Open the index for writing again (after space was freed), if it was opened read-only."""
        if self.read_only != "full":  # writable already, or a folder this user may not write
            return
        self._engine.dispose()
        self._make_engines()
        self._check_space()
        self._ensure_schema()

    # ----------------------------------------------------------------------------- schema

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (``None`` for an empty database)."""
        try:
            with self._engine.connect() as conn:
                exists = conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
                ).first()
                if exists is None:
                    return None
                rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        except SQLAlchemyError as exc:
            if self._disk_full(exc):
                raise self._full_error("opening the store's index") from exc
            raise self._store_error("cannot read the index", exc) from exc
        if not rows:
            return None
        if len(rows) > 1:
            # Several heads: not something any released deltahub writes.
            return ",".join(sorted(str(row[0]) for row in rows))
        return str(rows[0][0])

    def _ensure_schema(self) -> None:
        """Bring the schema to :data:`SCHEMA_HEAD`; cheap when it is already there."""
        if self.current_revision() == SCHEMA_HEAD:
            return
        with _exclusive_lock(self.lock_path, self._lock_timeout):
            revision = self.current_revision()  # another process may have done it meanwhile
            if revision == SCHEMA_HEAD:
                return
            self._upgrade(revision)

    def _upgrade(self, revision: str | None) -> None:
        """Run the Alembic upgrade from ``revision`` to head (caller holds the lock)."""
        from alembic import command
        from alembic.script import ScriptDirectory
        from alembic.script.revision import RevisionError
        from alembic.util import CommandError

        script = ScriptDirectory.from_config(alembic_config())
        if revision is not None:
            try:
                known = script.get_revision(revision) is not None
            except (RevisionError, CommandError):
                known = False
            if not known:
                raise UnsupportedFormatError(
                    f"the store index {self.db_path} is at schema revision {revision!r}, "
                    "which this deltahub does not know: the store was written by a newer "
                    "deltahub",
                    hint=_UPGRADE_HINT,
                )
        heads = script.get_heads()
        if heads != [SCHEMA_HEAD]:
            raise StoreError(
                f"the installed index migrations end at {heads}, expected {SCHEMA_HEAD!r}",
                hint="reinstall deltahub",
            )

        logger.info(
            "upgrading the index schema of %s from %s to %s",
            self.db_path,
            revision or "an empty database",
            SCHEMA_HEAD,
        )
        try:
            with self._engine.connect() as conn:
                # SQLite rebuilds tables in batch migrations; with foreign keys on, dropping
                # the old table would cascade-delete child rows. Foreign keys can only be
                # switched outside a transaction, so this goes straight to the DBAPI
                # connection (in autocommit mode, see _install_sqlite_listeners) rather
                # than through SQLAlchemy, which would autobegin one. Integrity is checked
                # before committing instead.
                raw = conn.connection.driver_connection
                assert raw is not None
                raw.execute("PRAGMA foreign_keys=OFF")
                try:
                    conn.execution_options(**{_BEGIN_MODE: "IMMEDIATE"})
                    with conn.begin():
                        command.upgrade(alembic_config(conn), SCHEMA_HEAD)
                        violations = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if violations:
                            raise StoreError(
                                f"upgrading the index {self.db_path} would break "
                                f"{len(violations)} foreign key(s); nothing was changed",
                                hint="report this as a deltahub bug",
                            )
                finally:
                    try:
                        raw.execute("PRAGMA foreign_keys=ON")
                    except Exception:  # never pool a connection with foreign keys off
                        conn.invalidate()
                        raise
        except (SQLAlchemyError, CommandError, RevisionError) as exc:
            raise self._store_error(
                f"cannot upgrade the index schema to {SCHEMA_HEAD}", exc
            ) from exc

    # ------------------------------------------------------------------------- sessions

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (deferred ``BEGIN``); prefer :meth:`session`."""
        return self._engine

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A short transaction: commits when the block succeeds, rolls back on any error.

        Args:
            write: take SQLite's write lock when the transaction starts (``BEGIN
                IMMEDIATE``), so a read-then-write transaction waits for other writers (up
                to the 30 s busy timeout) instead of failing half-way with "database is
                locked". Pass ``False`` for read-only work, which then never blocks.

        Objects stay usable after the block (``expire_on_commit=False``).

        Raises:
            StoreError: the index stayed locked by another process past the busy timeout.
        """
        if write:
            if self.read_only == "not writable":
                raise StoreError(
                    f"the store {self.db_path.parent} is read-only for this user: this command writes to it",
                    "run it as a user who may write the store folder; reading commands (ls, show, du, "
                    "verify, materialize) work as they are",
                )
            if self.read_only and self._file_size_limited():
                raise self._full_error("updating the store's index (it could only be opened read-only)")
            if self.read_only:
                raise disk_full_error(
                    None,
                    self.db_path.parent,
                    "updating the store's index (it could only be opened read-only)",
                    hint="free a few MB on that disk (`deltahub gc` frees what needs no index write; other files), "
                    "then run the command again; nothing was changed",
                )
            self._check_space()
        bind = self._write_engine if write else self._engine
        with Session(bind=bind, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except OperationalError as exc:
                session.rollback()
                if _is_locked(exc):
                    raise self._store_error("the index is locked", exc) from exc
                if self._disk_full(exc):
                    raise self._full_error(
                        "updating the store's index" if write else "reading the store's index"
                    ) from exc
                raise
            except BaseException:
                session.rollback()
                raise

    # -------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close all pooled connections. The index can still be used (it reconnects)."""
        self._engine.dispose()

    dispose = close

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.db_path)!r})"

    # -------------------------------------------------------------------------- helpers

    def _store_error(self, what: str, exc: BaseException) -> StoreError:
        original = getattr(exc, "orig", None) or exc
        if self._disk_full(exc):
            return self._full_error("using the store's index")
        if isinstance(exc, OperationalError) and _is_locked(exc):
            hint = "another deltahub process holds the index; retry when it has finished"
        else:
            hint = "check that the store directory is writable and its index not damaged"
        return StoreError(f"{what} ({self.db_path}): {original}", hint=hint)


def _is_locked(exc: OperationalError) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database is busy" in text
