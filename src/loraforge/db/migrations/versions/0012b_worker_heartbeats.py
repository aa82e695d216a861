"""worker heartbeats (readiness: a live worker per train pool)

Revision ID: 0012b_worker_heartbeats
Revises: 0001
Create Date: 2026-12-03 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012b_worker_heartbeats"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pools", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Integer(), nullable=False),
        sa.Column("beat_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("ix_worker_heartbeats_worker_id", "worker_heartbeats", ["worker_id"], unique=True)
    op.create_index("ix_worker_heartbeats_beat_at", "worker_heartbeats", ["beat_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_worker_heartbeats_beat_at", table_name="worker_heartbeats")
    op.drop_index("ix_worker_heartbeats_worker_id", table_name="worker_heartbeats")
    op.drop_table("worker_heartbeats")
