"""job checkpoints, pause, continued fine-tuning, re-queue bookkeeping

Revision ID: 0003_checkpoints
Revises: 0001
Create Date: 2026-11-27 09:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_checkpoints"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_job_checkpoints",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("step_number", sa.Integer(), nullable=False),
        sa.Column("fine_tuned_model_checkpoint", sa.String(length=600), nullable=False),
        sa.Column("base_model", sa.String(length=256), nullable=False),
        sa.Column("adapter_path", sa.String(length=1024), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["fine_tuning_jobs.id"]),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"]),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("fine_tuning_job_checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fine_tuning_job_checkpoints_id"), ["id"], unique=True)
        batch_op.create_index(
            batch_op.f("ix_fine_tuning_job_checkpoints_fine_tuned_model_checkpoint"),
            ["fine_tuned_model_checkpoint"],
            unique=True,
        )
        batch_op.create_index(batch_op.f("ix_fine_tuning_job_checkpoints_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_fine_tuning_job_checkpoints_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_model", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("reserved_model", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("pause_requested", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("queued_at", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_column("queued_at")
        batch_op.drop_column("pause_requested")
        batch_op.drop_column("reserved_model")
        batch_op.drop_column("parent_model")

    with op.batch_alter_table("fine_tuning_job_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tuning_job_checkpoints_org_id"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_job_checkpoints_job_id"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_job_checkpoints_fine_tuned_model_checkpoint"))
        batch_op.drop_index(batch_op.f("ix_fine_tuning_job_checkpoints_id"))

    op.drop_table("fine_tuning_job_checkpoints")
