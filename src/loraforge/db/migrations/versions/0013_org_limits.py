"""organization limit overrides

Revision ID: 0013_org_limits
Revises: 0001
Create Date: 2026-12-03 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_org_limits"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("requests_per_minute", sa.Integer()),
    ("max_concurrent_requests", sa.Integer()),
    ("max_hosted_models", sa.Integer()),
    ("storage_bytes", sa.BigInteger()),
    ("max_pending_uploads", sa.Integer()),
)


def upgrade() -> None:
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        for name, kind in _COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=True))
    # The storage sweeper looks for expired files.
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_expires_at", ["expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_expires_at")
    with op.batch_alter_table("organizations", schema=None) as batch_op:
        for name, _ in reversed(_COLUMNS):
            batch_op.drop_column(name)
