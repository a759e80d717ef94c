"""The SQLite index: Alembic migrations, schema drift, locking, pragmas and sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from deltahub.errors import UnsupportedFormatError
from deltahub.index import (
    SCHEMA_HEAD,
    Base,
    Index,
    ManifestObjectRow,
    ManifestRow,
    NameRow,
    ObjectRow,
    TensorStatRow,
    alembic_config,
    migrations_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
INDEX_TABLES = {
    "objects", "manifests", "manifest_objects", "tensor_stats", "names", "calibrations", "evaluations",
}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A bare SQLite engine on an empty file (no deltahub pragmas)."""
    eng = create_engine(f"sqlite:///{tmp_path / 'bare.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    ix = Index(tmp_path / "store" / "index.db", tmp_path / "store" / "index.lock")
    yield ix
    ix.close()


def _upgrade(engine: Engine, target: str = "head") -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), target)


def _downgrade(engine: Engine, target: str = "base") -> None:
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), target)


def _drift(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _add_manifest(session: object, manifest_id: str = "m" * 64, **kwargs: object) -> ManifestRow:
    fields: dict[str, object] = {
        "kind": "base",
        "format_version": 1,
        "n_tensors": 2,
        "stored_bytes": 10,
        "fp16_bytes": 20,
    }
    fields.update(kwargs)
    row = ManifestRow(id=manifest_id, **fields)
    session.add(row)  # type: ignore[attr-defined]
    return row


# --------------------------------------------------------------------------- migrations


def test_migrations_are_found_and_head_matches_code() -> None:
    folder = migrations_dir()
    assert (folder / "env.py").is_file()
    assert (folder / "versions" / "0001_initial.py").is_file()
    assert (folder / "versions" / "0002_calibration.py").is_file()
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [SCHEMA_HEAD]


def test_upgrade_head_creates_all_tables(engine: Engine) -> None:
    _upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert tables == INDEX_TABLES | {"alembic_version"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_HEAD
    indexes = {
        ix["name"] for table in INDEX_TABLES for ix in inspect(engine).get_indexes(table)
    }
    assert {
        "ix_manifest_objects_object_id",
        "ix_names_manifest_id",
        "ix_manifests_base_id",
        "ix_calibrations_manifest_id",
        "ix_evaluations_manifest_id",
    } <= indexes


def test_no_drift_between_migrations_and_models(engine: Engine) -> None:
    _upgrade(engine)
    assert _drift(engine) == []


def test_no_drift_on_a_store_opened_by_index(index: Index) -> None:
    assert _drift(index.engine) == []


def test_downgrade_to_base_then_upgrade_again(engine: Engine) -> None:
    _upgrade(engine)
    _downgrade(engine)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
    _upgrade(engine)
    assert INDEX_TABLES <= set(inspect(engine).get_table_names())
    assert _drift(engine) == []


def test_alembic_cli_with_repo_ini_sees_no_drift(tmp_path: Path) -> None:
    """The developer path: ``alembic -c alembic.ini`` runs env.py without a connection."""
    url = f"sqlite:///{tmp_path / 'scratch.db'}"
    base_cmd = [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "-x"]
    for args in (["upgrade", "head"], ["check"], ["current"]):
        proc = subprocess.run(
            [*base_cmd, f"url={url}", *args],
            cwd=tmp_path,
            env=_subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    assert SCHEMA_HEAD in proc.stdout + proc.stderr


# ------------------------------------------------------------------------ Index opening


def test_open_index_twice_is_idempotent(tmp_path: Path) -> None:
    db, lock = tmp_path / "index.db", tmp_path / "index.lock"
    with Index(db, lock) as first:
        assert first.current_revision() == SCHEMA_HEAD
        with first.session() as s:
            _add_manifest(s)
    with Index(db, lock) as second:
        assert second.current_revision() == SCHEMA_HEAD
        with second.session(write=False) as s:
            assert s.scalar(select(func.count()).select_from(ManifestRow)) == 1
        assert _drift(second.engine) == []


def test_open_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    db, lock = tmp_path / "index.db", tmp_path / "index.lock"
    Index(db, lock).close()
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from deltahub.index import Index
        ix = Index(Path({str(db)!r}), Path({str(lock)!r}))
        print(ix.current_revision(), "alembic" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [SCHEMA_HEAD, "False"]


def test_unknown_revision_raises_unsupported_format(tmp_path: Path) -> None:
    db, lock = tmp_path / "index.db", tmp_path / "index.lock"
    Index(db, lock).close()
    raw = create_engine(f"sqlite:///{db}")
    with raw.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    raw.dispose()
    with pytest.raises(UnsupportedFormatError) as excinfo:
        Index(db, lock)
    message = str(excinfo.value)
    assert "newer deltahub" in message
    assert "upgrade deltahub" in message
    assert "9999_from_the_future" in message


def test_older_known_revision_is_upgraded(tmp_path: Path) -> None:
    """A database left at base (all tables dropped, version row gone) is brought to head."""
    db, lock = tmp_path / "index.db", tmp_path / "index.lock"
    raw = create_engine(f"sqlite:///{db}")
    _upgrade(raw)
    _downgrade(raw)
    raw.dispose()
    with Index(db, lock) as ix:
        assert ix.current_revision() == SCHEMA_HEAD
        assert INDEX_TABLES <= set(inspect(ix.engine).get_table_names())


_OPENER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from deltahub.index import Index   # import first, then start all together
    db, lock, ready, go = map(Path, sys.argv[1:5])
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    ix = Index(db, lock)
    print(ix.current_revision())
    ix.close()
    """
)


def test_concurrent_processes_open_a_new_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    db, lock = store / "index.db", store / "index.lock"
    go = tmp_path / "go"
    n = 4
    procs = []
    for i in range(n):
        ready = tmp_path / f"ready{i}"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [sys.executable, "-c", _OPENER, str(db), str(lock), str(ready), str(go)],
                    env=_subprocess_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    deadline = time.monotonic() + 120
    while not all(r.exists() or p.poll() is not None for r, p in procs):
        assert time.monotonic() < deadline, "openers did not start"
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=120) for _, p in procs]
    for (_, proc), (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == SCHEMA_HEAD
    upgrades = sum(err.count("upgrading the index schema") for _, err in outputs)
    assert upgrades == 1, [err for _, err in outputs]
    with Index(db, lock) as ix:
        assert _drift(ix.engine) == []


# ------------------------------------------------------------------- pragmas and sessions


def test_wal_mode_and_pragmas(index: Index) -> None:
    with index.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert (index.db_path.parent / (index.db_path.name + "-wal")).exists()


def test_foreign_keys_enforced_and_delete_cascades(index: Index) -> None:
    mid = "a" * 64
    with index.session() as s:
        s.add(ObjectRow(sha256="b" * 64, size=100, stored_size=40, encoding="zstd"))
        _add_manifest(s, mid)
        s.flush()
        s.add(ManifestObjectRow(manifest_id=mid, object_id="b" * 64, role="tensor"))
        s.add_all(
            TensorStatRow(
                manifest_id=mid,
                name=f"layers.{i}.weight",
                codec="bitdelta",
                dtype="bfloat16",
                shape=json.dumps([4, 4]),
                numel=16,
                stored_bytes=6,
                scale=0.01,
            )
            for i in range(2)
        )
    with index.session() as s:
        manifest = s.get(ManifestRow, mid)
        assert manifest is not None
        s.delete(manifest)
    with index.session(write=False) as s:
        assert s.scalar(select(func.count()).select_from(TensorStatRow)) == 0
        assert s.scalar(select(func.count()).select_from(ManifestObjectRow)) == 0
        assert s.get(ObjectRow, "b" * 64) is not None  # objects are collected elsewhere

    # Cascade also happens in plain SQL, i.e. in the database, not only in the ORM.
    with index.session() as s:
        _add_manifest(s, mid)
        s.flush()
        s.add(
            TensorStatRow(
                manifest_id=mid, name="w", codec="raw", dtype="float16",
                shape="[1]", numel=1, stored_bytes=2,
            )
        )
    with index.session() as s:
        s.execute(text("DELETE FROM manifests WHERE id = :id"), {"id": mid})
    with index.session(write=False) as s:
        assert s.scalar(select(func.count()).select_from(TensorStatRow)) == 0

    # A name pointing at a missing manifest is refused, and the session rolls back.
    with pytest.raises(IntegrityError):
        with index.session() as s:
            s.add(NameRow(name="ghost", manifest_id="f" * 64))
    with index.session(write=False) as s:
        assert s.get(NameRow, "ghost") is None


def test_base_with_deltas_cannot_be_deleted(index: Index) -> None:
    with index.session() as s:
        _add_manifest(s, "1" * 64)
        s.flush()
        _add_manifest(s, "2" * 64, kind="delta", base_id="1" * 64)
    with pytest.raises(IntegrityError):
        with index.session() as s:
            s.execute(text("DELETE FROM manifests WHERE id = :id"), {"id": "1" * 64})


def test_check_constraints(index: Index) -> None:
    with pytest.raises(IntegrityError):
        with index.session() as s:
            s.add(ObjectRow(sha256="c" * 64, size=1, stored_size=1, encoding="gzip"))


def test_session_rolls_back_on_error(index: Index) -> None:
    with pytest.raises(RuntimeError):
        with index.session() as s:
            _add_manifest(s)
            s.flush()
            raise RuntimeError("boom")
    with index.session(write=False) as s:
        assert s.scalar(select(func.count()).select_from(ManifestRow)) == 0


def test_utc_datetime_round_trip(index: Index) -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    when = datetime(2024, 5, 17, 12, 30, 15, 123456, tzinfo=tz)
    with index.session() as s:
        mid = "d" * 64
        _add_manifest(s, mid, created_at=when)
        s.flush()
        s.add(NameRow(name="llama/chat", manifest_id=mid))
    with index.session(write=False) as s:
        manifest = s.get(ManifestRow, mid)
        name = s.get(NameRow, "llama/chat")
        assert manifest is not None and name is not None
        assert manifest.created_at == when
        assert manifest.created_at.tzinfo == timezone.utc
        assert name.created_at.tzinfo == timezone.utc
        assert abs(datetime.now(timezone.utc) - name.updated_at) < timedelta(minutes=5)
    with index.engine.connect() as conn:
        stored = conn.exec_driver_sql(
            "SELECT created_at FROM manifests WHERE id = ?", (mid,)
        ).scalar()
    assert str(stored).startswith("2024-05-17 07:00:15")  # naive UTC on disk

    with pytest.raises(Exception, match="naive datetime"):
        with index.session() as s:
            _add_manifest(s, "e" * 64, created_at=datetime(2024, 1, 1))


# ------------------------------------------------------------------ 0001 -> 0002 with data


def _fill_0001(engine: Engine) -> None:
    """A store's index as deltahub 0001 wrote it: a base, a delta on it, stats and names."""
    now = "2024-06-01 12:00:00.000000"
    with engine.begin() as conn:
        for oid in ("1" * 64, "2" * 64, "3" * 64):
            conn.execute(
                text("INSERT INTO objects VALUES (:s, 10, 10, 'raw', :t)"), {"s": oid, "t": now}
            )
        conn.execute(
            text(
                "INSERT INTO manifests (id, kind, format_version, base_id, model_type, dtype, n_tensors, "
                "stored_bytes, fp16_bytes, created_at, info) VALUES "
                "(:id, :kind, 1, :base, 'llama', 'float32', 2, 20, 40, :t, NULL)"
            ),
            [
                {"id": "b" * 64, "kind": "base", "base": None, "t": now},
                {"id": "d" * 64, "kind": "delta", "base": "b" * 64, "t": now},
            ],
        )
        conn.execute(
            text("INSERT INTO manifest_objects VALUES (:m, :o, 'tensor')"),
            [{"m": "b" * 64, "o": "1" * 64}, {"m": "d" * 64, "o": "2" * 64}, {"m": "d" * 64, "o": "3" * 64}],
        )
        conn.execute(
            text(
                "INSERT INTO tensor_stats (manifest_id, name, codec, dtype, shape, numel, stored_bytes, scale, "
                "rel_delta_norm, rel_recon_error) VALUES (:m, :n, :c, 'float32', '[4,4]', 16, 8, :s, 0.1, :e)"
            ),
            [
                {"m": "d" * 64, "n": "w.weight", "c": "sign1", "s": 0.125, "e": 0.6},
                {"m": "d" * 64, "n": "norm.weight", "c": "dense", "s": None, "e": 0.0},
            ],
        )
        conn.execute(
            text("INSERT INTO names VALUES (:n, :m, :t, :t)"),
            [{"n": "base", "m": "b" * 64, "t": now}, {"n": "ft", "m": "d" * 64, "t": now}],
        )


def test_upgrade_a_0001_store_with_data(tmp_path: Path) -> None:
    """Opening a store written at 0001 upgrades it in place: every row kept, initial scales filled."""
    db, lock = tmp_path / "index.db", tmp_path / "index.lock"
    raw = create_engine(f"sqlite:///{db}")
    _upgrade(raw, "0001_initial")
    _fill_0001(raw)
    with raw.connect() as conn:
        before = {
            t: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {t}"))), key=repr)
            for t in ("objects", "manifests", "manifest_objects", "names")
        }
    raw.dispose()

    with Index(db, lock) as ix:
        assert ix.current_revision() == SCHEMA_HEAD == "0002_calibration"
        assert _drift(ix.engine) == []
        with ix.engine.connect() as conn:
            for table, rows in before.items():
                assert sorted(map(tuple, conn.execute(text(f"SELECT * FROM {table}"))), key=repr) == rows
        from deltahub.index.models import CalibrationRow, EvaluationRow

        with ix.session(write=False) as s:
            stats = {st.name: st for st in s.scalars(select(TensorStatRow))}
            assert stats["w.weight"].scale == 0.125 and stats["w.weight"].initial_scale == 0.125
            assert stats["w.weight"].rel_recon_error == 0.6
            assert stats["norm.weight"].initial_scale is None
            assert s.scalar(select(func.count()).select_from(CalibrationRow)) == 0
        # The new tables work, and go with their manifest (cascade in the database).
        with ix.session() as s:
            s.add(
                CalibrationRow(
                    manifest_id="d" * 64, previous_manifest_id="c" * 64, teacher="ft/", data="x", samples=1,
                    seq_len=8, steps=2, lr=0.01, seed=0, device="cpu", top_k=None, n_scales=1,
                    loss_before=0.5, loss_after=0.25, seconds=1.0,
                )
            )
            s.add(
                EvaluationRow(
                    manifest_id="d" * 64, data="x", samples=1, seq_len=8, n_tokens=7, finetune=None,
                    ppl_base=3.0, ppl_finetune=None, ppl_delta=2.0, kl_mean=None, kept_logppl=None,
                    kept_ppl=None, top_k=None, device="cpu", seconds=1.0,
                )
            )
        with ix.session() as s:
            s.execute(text("DELETE FROM names WHERE name = 'ft'"))
            s.execute(text("DELETE FROM manifests WHERE id = :id"), {"id": "d" * 64})
        with ix.session(write=False) as s:
            assert s.scalar(select(func.count()).select_from(CalibrationRow)) == 0
            assert s.scalar(select(func.count()).select_from(EvaluationRow)) == 0


def test_downgrade_0002_to_0001_keeps_the_data(tmp_path: Path) -> None:
    raw = create_engine(f"sqlite:///{tmp_path / 'index.db'}")
    _upgrade(raw, "0001_initial")
    _fill_0001(raw)
    _upgrade(raw)
    _downgrade(raw, "0001_initial")
    with raw.connect() as conn:
        cols = {c["name"] for c in inspect(raw).get_columns("tensor_stats")}
        assert "initial_scale" not in cols
        assert conn.execute(text("SELECT scale FROM tensor_stats WHERE name = 'w.weight'")).scalar() == 0.125
        assert conn.execute(text("SELECT count(*) FROM names")).scalar() == 2
    assert "calibrations" not in inspect(raw).get_table_names()
    raw.dispose()
