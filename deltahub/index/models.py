"""SQLAlchemy 2.x ORM models of the store's SQLite index.

The index only *describes* what lives in the object store: which objects exist (by sha256),
which manifests reference them, per-tensor statistics and the human-readable names that
point at manifests. It never reads or writes object bytes.

The schema is owned by the Alembic migrations in ``deltahub.migrations`` (the repository's
top-level ``migrations/`` folder). Any change here needs a new revision there; the test-suite
checks that the migrations and these models agree (no autogenerate drift).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "NAMING_CONVENTION",
    "Base",
    "CalibrationRow",
    "EvaluationRow",
    "ManifestObjectRow",
    "ManifestRow",
    "NameRow",
    "ObjectRow",
    "TensorStatRow",
    "UTCDateTime",
    "latest_record",
    "record_from",
    "utcnow",
]

#: Constraint/index naming rules shared by the models and the migrations, so that
#: autogenerate and batch operations (SQLite table rebuilds) see stable names.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC ``datetime``."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp that round-trips through SQLite.

    SQLite has no timezone support, so values are stored as *naive* UTC (``DATETIME``) and
    handed back as aware UTC datetimes. Aware inputs in any timezone are converted to UTC;
    naive inputs are rejected, since their meaning is ambiguous.

    The underlying column type is a plain ``DateTime()``, which is what the migrations create
    and what SQLite reflects, so Alembic's autogenerate reports no type drift.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to naive UTC for storage."""
        if value is None:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"naive datetime {value!r} given; pass a timezone-aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to the naive value read back from the database."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def __repr__(self) -> str:
        # Autogenerate renders unknown types via repr(); keep it importable-looking.
        return "UTCDateTime()"


class Base(DeclarativeBase):
    """Declarative base of every index table (shared ``MetaData`` with naming rules)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class ObjectRow(Base):
    """One content-addressed object of the store (a blob named by its sha256)."""

    __tablename__ = "objects"
    __table_args__ = (CheckConstraint("encoding IN ('raw', 'zstd')", name="encoding"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Uncompressed size in bytes.
    size: Mapped[int] = mapped_column(Integer)
    #: Size in bytes on disk (after compression, if any).
    stored_size: Mapped[int] = mapped_column(Integer)
    #: ``'raw'`` or ``'zstd'``.
    encoding: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def __repr__(self) -> str:
        return f"ObjectRow(sha256={self.sha256!r}, size={self.size!r}, encoding={self.encoding!r})"


class ManifestRow(Base):
    """A stored model: a base or a delta, identified by the sha256 of its manifest object."""

    __tablename__ = "manifests"
    __table_args__ = (CheckConstraint("kind IN ('base', 'delta')", name="kind"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: ``'base'`` or ``'delta'``.
    kind: Mapped[str] = mapped_column(String(16))
    format_version: Mapped[int] = mapped_column(Integer)
    #: For deltas: the manifest of the base they apply to.
    base_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("manifests.id"), index=True
    )
    model_type: Mapped[str | None] = mapped_column(String(64))
    #: The model's main dtype (e.g. ``'bfloat16'``).
    dtype: Mapped[str | None] = mapped_column(String(16))
    n_tensors: Mapped[int] = mapped_column(Integer)
    #: Bytes on disk of the objects this manifest references (each object counted once).
    stored_bytes: Mapped[int] = mapped_column(Integer)
    #: What the model's tensors would take in fp16.
    fp16_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: JSON blob for extra per-model data (calibration, evaluation results...).
    info: Mapped[str | None] = mapped_column(Text)

    base: Mapped[ManifestRow | None] = relationship(remote_side=[id])
    objects: Mapped[list[ManifestObjectRow]] = relationship(
        back_populates="manifest", cascade="all, delete-orphan", passive_deletes=True
    )
    tensor_stats: Mapped[list[TensorStatRow]] = relationship(
        back_populates="manifest", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"ManifestRow(id={self.id!r}, kind={self.kind!r}, base_id={self.base_id!r})"


class ManifestObjectRow(Base):
    """Link between a manifest and an object it references (for garbage collection)."""

    __tablename__ = "manifest_objects"
    __table_args__ = (
        CheckConstraint("role IN ('manifest', 'tensor', 'file')", name="role"),
    )

    manifest_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True
    )
    object_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("objects.sha256"), primary_key=True, index=True
    )
    #: ``'manifest'``, ``'tensor'`` or ``'file'``.
    role: Mapped[str] = mapped_column(String(16))

    manifest: Mapped[ManifestRow] = relationship(back_populates="objects")

    def __repr__(self) -> str:
        return (
            f"ManifestObjectRow(manifest_id={self.manifest_id!r}, "
            f"object_id={self.object_id!r}, role={self.role!r})"
        )


def _default_initial_scale(context: Any) -> float | None:
    """``initial_scale`` of a new ``tensor_stats`` row that does not give one: its own ``scale``
    for tensors whose codec has a scale (a freshly compressed delta's scales are its initial scales)."""
    params = context.get_current_parameters()
    return params.get("scale")


class TensorStatRow(Base):
    """Per-tensor statistics of a manifest (codec, sizes, delta scale and errors)."""

    __tablename__ = "tensor_stats"

    manifest_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String, primary_key=True)
    codec: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(16))
    #: JSON list of ints.
    shape: Mapped[str] = mapped_column(Text)
    numel: Mapped[int] = mapped_column(Integer)
    stored_bytes: Mapped[int] = mapped_column(Integer)
    #: The scale this manifest stores (``sign1`` only): calibrated when the manifest was calibrated.
    scale: Mapped[float | None] = mapped_column(Float)
    #: The scale ``mean(|delta|)`` written at compress time, kept through every calibration.
    #: (Rows written without it, i.e. at compress time, default to their ``scale`` when ``sign1``.)
    initial_scale: Mapped[float | None] = mapped_column(Float, default=_default_initial_scale)
    rel_delta_norm: Mapped[float | None] = mapped_column(Float)
    #: ``|delta - scale*sign(delta)| / |delta|`` for this manifest's ``scale``.
    rel_recon_error: Mapped[float | None] = mapped_column(Float)

    manifest: Mapped[ManifestRow] = relationship(back_populates="tensor_stats")

    def __repr__(self) -> str:
        return (
            f"TensorStatRow(manifest_id={self.manifest_id!r}, name={self.name!r}, "
            f"codec={self.codec!r})"
        )


class NameRow(Base):
    """A human-readable model name pointing at a manifest."""

    __tablename__ = "names"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    manifest_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("manifests.id"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    manifest: Mapped[ManifestRow] = relationship()

    def __repr__(self) -> str:
        return f"NameRow(name={self.name!r}, manifest_id={self.manifest_id!r})"


class CalibrationRow(Base):
    """One scale calibration: it produced manifest ``manifest_id`` from ``previous_manifest_id``.

    The previous manifest is not a foreign key: once no name reaches it, gc prunes its rows while
    this record stays.
    """

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("manifests.id", ondelete="CASCADE"), index=True
    )
    previous_manifest_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: The fine-tune used as teacher (a path, a Hub id or a stored name).
    teacher: Mapped[str] = mapped_column(Text)
    #: Where the calibration text came from.
    data: Mapped[str] = mapped_column(Text)
    samples: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    #: Teacher distribution kept per position: its top-k (``None``: the full distribution).
    top_k: Mapped[int | None] = mapped_column(Integer)
    #: How many sign1 scales were trained.
    n_scales: Mapped[int] = mapped_column(Integer)
    #: Mean distillation loss (KL, nats per position) on the calibration data, before and after.
    loss_before: Mapped[float] = mapped_column(Float)
    loss_after: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)

    def __repr__(self) -> str:
        return (
            f"CalibrationRow(manifest_id={self.manifest_id!r}, loss_before={self.loss_before!r}, "
            f"loss_after={self.loss_after!r})"
        )


class EvaluationRow(Base):
    """Fidelity of a stored delta on held-out text (``deltahub eval``)."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("manifests.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    data: Mapped[str] = mapped_column(Text)
    samples: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    #: Tokens scored for perplexity.
    n_tokens: Mapped[int] = mapped_column(Integer)
    #: The fine-tune compared against (``None``: none was given).
    finetune: Mapped[str | None] = mapped_column(Text)
    ppl_base: Mapped[float] = mapped_column(Float)
    ppl_finetune: Mapped[float | None] = mapped_column(Float)
    ppl_delta: Mapped[float] = mapped_column(Float)
    #: Mean KL(fine-tune || delta) of the next-token distributions, nats per position.
    kl_mean: Mapped[float | None] = mapped_column(Float)
    #: Share of the fine-tune's improvement kept, on log-perplexity (mean NLL) and on perplexity.
    kept_logppl: Mapped[float | None] = mapped_column(Float)
    kept_ppl: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    seconds: Mapped[float] = mapped_column(Float)

    def __repr__(self) -> str:
        return (
            f"EvaluationRow(manifest_id={self.manifest_id!r}, ppl_delta={self.ppl_delta!r}, "
            f"kl_mean={self.kl_mean!r})"
        )


_Record = TypeVar("_Record", CalibrationRow, EvaluationRow)


def record_from(row_cls: type[_Record], values: Mapping[str, Any], **overrides: Any) -> _Record:
    """A new ``calibrations`` / ``evaluations`` row from ``values`` (e.g. a result's ``to_json()``)
    and ``overrides``: every key that names a column of the table, the others ignored."""
    columns = set(row_cls.__table__.columns.keys())
    return row_cls(**{k: v for k, v in {**values, **overrides}.items() if k in columns})


def latest_record(session: Session, row_cls: type[_Record], manifest_id: str) -> dict[str, Any] | None:
    """The newest ``row_cls`` row of ``manifest_id`` as a dict of its columns but ``id`` and
    ``manifest_id`` (``created_at`` in ISO 8601); ``None`` when there is none."""
    row = session.scalars(
        select(row_cls)
        .where(row_cls.manifest_id == manifest_id)
        .order_by(row_cls.created_at.desc(), row_cls.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    out = {key: getattr(row, key) for key in row_cls.__table__.columns.keys() if key not in ("id", "manifest_id")}
    out["created_at"] = row.created_at.isoformat()
    return out
