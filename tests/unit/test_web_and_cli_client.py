"""Fast checks of the web platform's serving and the CLI client's pieces (no browser, no server):
the browser and live-server flows are in tests/integration/test_web.py and test_cli.py."""

from __future__ import annotations

import re

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loraforge.cli import app as cli_app
from loraforge.cli_client.common import parse_size
from loraforge.cli_client.watch import WatchState, sparkline
from loraforge.web import STATIC_DIR


def test_platform_shell_and_assets_are_served_locally(api: TestClient) -> None:
    shell = api.get("/")
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert shell.headers["cache-control"] == "no-cache"
    assert not re.search(r"(src|href)=\"https?://", shell.text), "nothing may come from a CDN"
    assets = re.findall(r"(?:(?:src|href)=|\"[a-z/]+\": )\"(/static/[^\"]+)\"", shell.text)
    assert "/static/js/main.js" in assets and "/static/vendor/preact.mjs" in assets
    for asset in assets:
        assert api.get(asset).status_code == 200, asset


def test_every_module_import_resolves_to_a_shipped_file() -> None:
    # Relative imports between the modules must point at files that exist (a typo is a blank page).
    for module in STATIC_DIR.glob("js/**/*.js"):
        for target in re.findall(r"from \"(\.{1,2}/[^\"]+)\"", module.read_text()):
            assert (module.parent / target).resolve().is_file(), f"{module.name} imports {target}"
    for license_name in ("LICENSE.preact", "LICENSE.htm", "LICENSE.uplot"):
        assert (STATIC_DIR / "vendor" / license_name).is_file()


def test_api_paths_keep_the_openai_error_envelope(api: TestClient) -> None:
    for path in ("/v1/no-such-thing", "/static/no-such-file.js", "/nope"):
        response = api.get(path)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, path
    assert api.get("/v1/models").status_code == 401


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("2KB") == parse_size("2k") == parse_size("2KiB") == 2048
    assert parse_size("64MiB") == 64 * 1024 * 1024
    assert parse_size("1.5 MB") == int(1.5 * 1024 * 1024)
    with pytest.raises(typer.BadParameter):
        parse_size("lots")


def test_sparkline_shows_the_whole_run_scaled() -> None:
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0, 0.0]) == "█▆▃▁"
    long = sparkline([100.0 - i for i in range(100)], width=10)
    assert len(long) == 10 and long[0] == "█" and long[-1] == "▁"
    assert sparkline([1.0, float("nan"), 1.0]) == "▁▁"


def test_watch_state_line_has_step_loss_and_eta() -> None:
    class Job:
        id, status, model, estimated_finish = "ftjob-x", "running", "m", None

    state = WatchState(Job())
    for step in range(1, 6):
        state.add_metrics({"step": step, "total_steps": 10, "train_loss": 1.0 / step, "valid_loss": 0.5})
    line = state.line()
    assert "step 5/10" in line and "loss 0.2000" in line and "valid 0.5000" in line and "ETA" in line


def test_client_commands_are_registered_next_to_the_server_ones() -> None:
    result = CliRunner().invoke(cli_app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "api", "worker", "engine", "keys", "files", "jobs", "models", "batches", "chat"):
        assert re.search(rf"│ {command}\b", result.output), command


def test_client_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORAFORGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli_app, ["jobs", "list"])
    assert result.exit_code == 2
