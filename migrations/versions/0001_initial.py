"""Initial index schema: objects, manifests, manifest_objects, tensor_stats, names.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00.000000

Constraint names follow ``deltahub.index.models.NAMING_CONVENTION``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the five index tables."""
    op.create_table(
        "objects",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("stored_size", sa.Integer(), nullable=False),
        sa.Column("encoding", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("encoding IN ('raw', 'zstd')", name=op.f("ck_objects_encoding")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_objects")),
    )

    op.create_table(
        "manifests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.String(length=64), nullable=True),
        sa.Column("model_type", sa.String(length=64), nullable=True),
        sa.Column("dtype", sa.String(length=16), nullable=True),
        sa.Column("n_tensors", sa.Integer(), nullable=False),
        sa.Column("stored_bytes", sa.Integer(), nullable=False),
        sa.Column("fp16_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("info", sa.Text(), nullable=True),
        sa.CheckConstraint("kind IN ('base', 'delta')", name=op.f("ck_manifests_kind")),
        sa.ForeignKeyConstraint(
            ["base_id"], ["manifests.id"], name=op.f("fk_manifests_base_id_manifests")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_manifests")),
    )
    op.create_index(op.f("ix_manifests_base_id"), "manifests", ["base_id"], unique=False)

    op.create_table(
        "manifest_objects",
        sa.Column("manifest_id", sa.String(length=64), nullable=False),
        sa.Column("object_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.CheckConstraint(
            "role IN ('manifest', 'tensor', 'file')", name=op.f("ck_manifest_objects_role")
        ),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["manifests.id"],
            name=op.f("fk_manifest_objects_manifest_id_manifests"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["object_id"], ["objects.sha256"], name=op.f("fk_manifest_objects_object_id_objects")
        ),
        sa.PrimaryKeyConstraint("manifest_id", "object_id", name=op.f("pk_manifest_objects")),
    )
    op.create_index(
        op.f("ix_manifest_objects_object_id"), "manifest_objects", ["object_id"], unique=False
    )

    op.create_table(
        "tensor_stats",
        sa.Column("manifest_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("codec", sa.String(length=16), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("shape", sa.Text(), nullable=False),
        sa.Column("numel", sa.Integer(), nullable=False),
        sa.Column("stored_bytes", sa.Integer(), nullable=False),
        sa.Column("scale", sa.Float(), nullable=True),
        sa.Column("rel_delta_norm", sa.Float(), nullable=True),
        sa.Column("rel_recon_error", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["manifests.id"],
            name=op.f("fk_tensor_stats_manifest_id_manifests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("manifest_id", "name", name=op.f("pk_tensor_stats")),
    )

    op.create_table(
        "names",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("manifest_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"], ["manifests.id"], name=op.f("fk_names_manifest_id_manifests")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_names")),
    )
    op.create_index(op.f("ix_names_manifest_id"), "names", ["manifest_id"], unique=False)


def downgrade() -> None:
    """Drop the five index tables (children first)."""
    op.drop_index(op.f("ix_names_manifest_id"), table_name="names")
    op.drop_table("names")
    op.drop_table("tensor_stats")
    op.drop_index(op.f("ix_manifest_objects_object_id"), table_name="manifest_objects")
    op.drop_table("manifest_objects")
    op.drop_index(op.f("ix_manifests_base_id"), table_name="manifests")
    op.drop_table("manifests")
    op.drop_table("objects")
