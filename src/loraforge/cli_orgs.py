"""``loraforge orgs``: an operator's view and settings of organizations' plans and limits.

    loraforge orgs list
    loraforge orgs show acme
    loraforge orgs set acme --tier core --rpm 1200 --max-concurrent 50 --storage-bytes 200GiB
    loraforge orgs set acme --rpm default          # back to the plan's
    loraforge orgs set acme --max-hosted-models unlimited
    loraforge orgs wandb acme                      # the W&B key, read from stdin or a prompt
    loraforge orgs wandb acme --entity my-team < key.txt
    loraforge orgs wandb acme --clear

Values are stored on the organization's row (``loraforge.plans``: NULL is the plan's, -1
unlimited). API processes pick a change up within ``auth_cache_seconds``.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Organization
from loraforge.settings import get_settings

orgs_app = typer.Typer(help="Organizations' plans and limits.", no_args_is_help=True)
err = Console(stderr=True)

_SIZE = re.compile(r"^(\d+)\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_HELP = "a number, 'unlimited', or 'default' (the plan's)"


def parse_limit(text: str, *, sizes: bool = False) -> int | None:
    """A limit as stored: None for ``default``, -1 for ``unlimited``, else a number (``10GiB``
    and the like when ``sizes``).

    Raises:
        typer.BadParameter: anything else.
    """
    from loraforge.plans import UNLIMITED

    value = text.strip().lower()
    if value in ("default", "plan"):
        return None
    if value in ("unlimited", "none"):
        return UNLIMITED
    match = _SIZE.match(value) if sizes else re.match(r"^(\d+)()$", value)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not {_HELP}" + (" (sizes: 500MB, 10GiB)" if sizes else ""))
    return int(match.group(1)) * _UNITS[(match.group(2) or "").lower()]


def _sessions() -> tuple[Engine, sessionmaker[Session]]:
    from loraforge.db.session import make_engine, make_sessionmaker, migrate

    settings = get_settings()
    migrate(settings)
    engine = make_engine(settings)
    return engine, make_sessionmaker(engine)


def _show(session: Session, org: Organization) -> Table:
    from loraforge.files.quota import storage_used
    from loraforge.jobs.limits import hosted_model_usage
    from loraforge.plans import LIMIT_NAMES, describe, limits_for

    limits = limits_for(org)
    used = {
        "max_hosted_models": hosted_model_usage(session, org),
        "storage_bytes": storage_used(session, org.id),
    }
    table = Table(title=f"{org.name} ({org.id}), plan {org.tier}")
    for column in ("limit", "value", "source", "in use"):
        table.add_column(column)
    for name in LIMIT_NAMES:
        source = "plan" if getattr(org, name) is None else "set for the org"
        table.add_row(name, describe(getattr(limits, name)), source, str(used.get(name, "")))
    return table


@orgs_app.command("set")
def set_limits(
    org: Annotated[str, typer.Argument(help="Organization name")],
    tier: Annotated[str | None, typer.Option(help="Plan: trial | core | scale | enterprise")] = None,
    rpm: Annotated[str | None, typer.Option(help=f"Requests per minute: {_HELP}")] = None,
    max_concurrent: Annotated[str | None, typer.Option(help=f"Concurrent requests: {_HELP}")] = None,
    max_hosted_models: Annotated[str | None, typer.Option(help=f"Hosted fine-tuned models: {_HELP}")] = None,
    storage_bytes: Annotated[
        str | None, typer.Option(help=f"Stored bytes (files + uploads): {_HELP}")
    ] = None,
    max_pending_uploads: Annotated[str | None, typer.Option(help=f"Pending uploads: {_HELP}")] = None,
) -> None:
    """Change an organization's plan or any of its limits, then show them."""
    from loraforge.db.session import session_scope
    from loraforge.plans import TIERS

    if tier is not None and tier not in TIERS:
        raise typer.BadParameter(f"--tier must be one of {', '.join(TIERS)}")
    changes = {
        name: parse_limit(text, sizes=name == "storage_bytes")
        for name, text in (
            ("requests_per_minute", rpm),
            ("max_concurrent_requests", max_concurrent),
            ("max_hosted_models", max_hosted_models),
            ("storage_bytes", storage_bytes),
            ("max_pending_uploads", max_pending_uploads),
        )
        if text is not None
    }
    engine, sessions = _sessions()
    with session_scope(sessions) as session:
        row = session.execute(select(Organization).where(Organization.name == org)).scalar_one_or_none()
        if row is None:
            err.print(
                f"[red]No organization named {org!r} (create one with `loraforge keys create --org`).[/red]"
            )
            raise typer.Exit(2)
        if tier is not None:
            row.tier = tier
        for name, value in changes.items():
            setattr(row, name, value)
        session.flush()
        Console().print(_show(session, row))
    engine.dispose()


@orgs_app.command("show")
def show(org: Annotated[str, typer.Argument(help="Organization name")]) -> None:
    """An organization's plan, limits (and where each comes from) and usage."""

    engine, sessions = _sessions()
    with sessions() as session:
        row = session.execute(select(Organization).where(Organization.name == org)).scalar_one_or_none()
        if row is None:
            err.print(f"[red]No organization named {org!r}.[/red]")
            raise typer.Exit(2)
        Console().print(_show(session, row))
    engine.dispose()


@orgs_app.command("list")
def list_orgs() -> None:
    """Every organization with its plan and effective limits."""
    from loraforge.plans import LIMIT_NAMES, describe, limits_for

    engine, sessions = _sessions()
    table = Table(
        "name", "id", "tier", "rpm", "concurrent", "hosted models", "storage bytes", "pending uploads"
    )
    with sessions() as session:
        for org in session.execute(select(Organization).order_by(Organization.seq)).scalars():
            limits = limits_for(org)
            table.add_row(org.name, org.id, org.tier, *(describe(getattr(limits, n)) for n in LIMIT_NAMES))
    Console().print(table)
    engine.dispose()


@orgs_app.command("wandb")
def wandb_key(
    org: Annotated[str, typer.Argument(help="Organization name")],
    entity: Annotated[str | None, typer.Option(help="Default W&B entity (team or user) of its runs")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Forget the organization's W&B key")] = False,
) -> None:
    """Set the organization's Weights & Biases API key (read from stdin, or a hidden prompt; stored
    encrypted, never shown again), used by its jobs' ``wandb`` integrations."""
    import sys

    from loraforge import org_integrations
    from loraforge.db.session import session_scope

    key = ""
    if not clear:
        key = sys.stdin.readline() if not sys.stdin.isatty() else typer.prompt("W&B API key", hide_input=True)
        key = key.strip()
        if not key:
            raise typer.BadParameter("no W&B API key on stdin")
    engine, sessions = _sessions()
    with session_scope(sessions) as session:
        row = session.execute(select(Organization).where(Organization.name == org)).scalar_one_or_none()
        if row is None:
            err.print(f"[red]No organization named {org!r}.[/red]")
            raise typer.Exit(2)
        if clear:
            found = org_integrations.delete_wandb(session, row.id)
            Console().print(f"{org}: W&B key {'removed' if found else 'was not set'}")
        else:
            stored = org_integrations.set_wandb(session, get_settings(), row.id, key, entity)
            Console().print(
                f"{org}: W&B key {stored.api_key_hint} set" + (f", entity {entity}" if entity else "")
            )
    engine.dispose()
