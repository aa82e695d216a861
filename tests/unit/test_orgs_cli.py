"""``loraforge orgs``: an operator sets a plan and per-org limits, and the API applies them."""

from __future__ import annotations

import pytest
import typer
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from loraforge import cli, cli_orgs
from loraforge.api.app import create_app
from loraforge.db.models import Organization
from loraforge.db.session import make_engine, make_sessionmaker
from loraforge.plans import UNLIMITED, GiB, limits_for, tier_limits
from loraforge.settings import Settings


def test_plan_table_and_overrides() -> None:
    assert [(t.requests_per_minute, t.max_concurrent_requests, t.max_hosted_models) for t in (
        tier_limits("trial"), tier_limits("core"), tier_limits("scale"), tier_limits("enterprise")
    )] == [(30, 20, 1), (600, 100, 10), (1200, 100, 25), (None, 100, None)]  # fmt: skip
    assert tier_limits("no-such-plan") == tier_limits("trial")
    org = Organization(id="org-x", name="x", tier="core", created_at=0, requests_per_minute=UNLIMITED)
    org.storage_bytes, org.max_hosted_models = 5 * GiB, 0
    limits = limits_for(org)
    assert limits.requests_per_minute is None and limits.storage_bytes == 5 * GiB
    assert limits.max_hosted_models == 0 and limits.max_concurrent_requests == 100


def test_parse_limit() -> None:
    assert cli_orgs.parse_limit("default") is None and cli_orgs.parse_limit("unlimited") == UNLIMITED
    assert cli_orgs.parse_limit("25") == 25 and cli_orgs.parse_limit("0") == 0
    assert cli_orgs.parse_limit("10GiB", sizes=True) == 10 * GiB
    assert cli_orgs.parse_limit("500MB", sizes=True) == 500 * 10**6
    for bad in ("lots", "-3", "10GiB"):
        with pytest.raises(typer.BadParameter):
            cli_orgs.parse_limit(bad)


def test_orgs_set_show_list_and_the_api_applies_it(
    settings: Settings,
    make_key,
    dispatcher,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    key = make_key("acme", tier="trial")
    monkeypatch.setattr(cli_orgs, "get_settings", lambda: settings)
    runner = CliRunner()
    args = ["--tier", "core", "--rpm", "2", "--storage-bytes", "1MiB", "--max-hosted-models", "unlimited"]
    result = runner.invoke(cli.app, ["orgs", "set", "acme", *args])
    assert result.exit_code == 0, result.output
    assert "plan core" in result.output and "set for the org" in result.output
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as session:
        org = session.execute(select(Organization).where(Organization.name == "acme")).scalar_one()
        assert (org.tier, org.requests_per_minute, org.storage_bytes, org.max_hosted_models) == (
            "core", 2, 2**20, UNLIMITED
        )  # fmt: skip
    engine.dispose()
    assert "acme" in runner.invoke(cli.app, ["orgs", "list"]).output
    shown = runner.invoke(cli.app, ["orgs", "show", "acme"])
    assert shown.exit_code == 0 and "1048576" in shown.output
    assert runner.invoke(cli.app, ["orgs", "set", "nobody", "--rpm", "5"]).exit_code == 2
    assert runner.invoke(cli.app, ["orgs", "set", "acme", "--tier", "gold"]).exit_code != 0

    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        auth = {"authorization": f"Bearer {key}"}
        assert [client.get("/v1/models", headers=auth).status_code for _ in range(3)] == [200, 200, 429]
    # Back to the plan's number.
    assert runner.invoke(cli.app, ["orgs", "set", "acme", "--rpm", "default"]).exit_code == 0
    with TestClient(create_app(settings, dispatcher=dispatcher)) as client:
        answer = client.get("/v1/models", headers=auth)
        assert answer.headers["x-ratelimit-limit-requests"] == "600"
