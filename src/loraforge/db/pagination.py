"""Cursor pagination the way the OpenAI SDK expects it: ``after=<id of the last item>``,
``has_more`` always present. Rows are ordered by their insertion ``seq``."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from loraforge.errors import InvalidRequestError

T = TypeVar("T")


def paginate(
    session: Session,
    stmt: Select[T],
    model: Any,
    *,
    after: str | None,
    limit: int,
    descending: bool = True,
) -> tuple[list[T], bool]:
    """Return one page of ``stmt`` (already filtered) and whether more rows follow.

    Raises:
        InvalidRequestError: ``after`` names no row of this listing.
    """
    if after:
        # The cursor is looked up through the listing's own filters (organization, job, purpose),
        # so another organization's id answers exactly like an id that does not exist: the
        # answer must not confirm that it does.
        cursor = session.execute(
            stmt.with_only_columns(model.seq).where(model.id == after)
        ).scalar_one_or_none()
        if cursor is None:
            raise InvalidRequestError(
                f"No object with id '{after}' to page after.", param="after", code="invalid_cursor"
            )
        stmt = stmt.where(model.seq < cursor if descending else model.seq > cursor)
    stmt = stmt.order_by(model.seq.desc() if descending else model.seq.asc()).limit(limit + 1)
    rows = list(session.execute(stmt).scalars())
    return rows[:limit], len(rows) > limit
