"""Calibration and fidelity: tensor_stats.initial_scale, calibrations, evaluations.

Revision ID: 0002_calibration
Revises: 0001_initial
Create Date: 2025-02-01 00:00:00.000000

Before this revision no scale was ever calibrated, so every stored ``sign1`` scale is its initial
scale: the upgrade copies ``scale`` into ``initial_scale`` for ``sign1`` rows. Constraint names
follow ``deltahub.index.models.NAMING_CONVENTION``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002_calibration"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``tensor_stats.initial_scale`` (backfilled) and the two new tables."""
    op.add_column("tensor_stats", sa.Column("initial_scale", sa.Float(), nullable=True))
    op.execute("UPDATE tensor_stats SET initial_scale = scale WHERE codec = 'sign1'")

    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("manifest_id", sa.String(length=64), nullable=False),
        sa.Column("previous_manifest_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("teacher", sa.Text(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("seq_len", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("n_scales", sa.Integer(), nullable=False),
        sa.Column("loss_before", sa.Float(), nullable=False),
        sa.Column("loss_after", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["manifests.id"],
            name=op.f("fk_calibrations_manifest_id_manifests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index(op.f("ix_calibrations_manifest_id"), "calibrations", ["manifest_id"], unique=False)

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("manifest_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("seq_len", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("finetune", sa.Text(), nullable=True),
        sa.Column("ppl_base", sa.Float(), nullable=False),
        sa.Column("ppl_finetune", sa.Float(), nullable=True),
        sa.Column("ppl_delta", sa.Float(), nullable=False),
        sa.Column("kl_mean", sa.Float(), nullable=True),
        sa.Column("kept_logppl", sa.Float(), nullable=True),
        sa.Column("kept_ppl", sa.Float(), nullable=True),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["manifests.id"],
            name=op.f("fk_evaluations_manifest_id_manifests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_manifest_id"), "evaluations", ["manifest_id"], unique=False)


def downgrade() -> None:
    """Drop the two tables and ``tensor_stats.initial_scale`` (calibrated scales stay in ``scale``)."""
    op.drop_index(op.f("ix_evaluations_manifest_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index(op.f("ix_calibrations_manifest_id"), table_name="calibrations")
    op.drop_table("calibrations")
    with op.batch_alter_table("tensor_stats") as batch:
        batch.drop_column("initial_scale")
