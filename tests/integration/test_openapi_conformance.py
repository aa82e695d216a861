"""Schemathesis against a live ``loraforge serve``: every operation of ``/openapi.json``, bounded
examples, all of schemathesis's default checks (no server errors, only documented status codes and
content types, responses matching their schemas, invalid input refused, valid input accepted...).
It finds nothing.

Backend-independent: runs on the embedded stack only, as its own organization.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, only_embedded

pytestmark = pytest.mark.integration

# Examples per operation and phase: enough to walk every operation's parameters and bodies
# (about two minutes on two busy cores), bounded so CI stays short; the seed makes a failure
# reproducible with the command printed below.
MAX_EXAMPLES = 12
SEED = 20261203
RUN_TIMEOUT = 540


# OpenAI's contract answers a well-formed request that names something missing or unusable in its
# body or query (a training file that does not exist, an unknown cursor, an unknown purpose, a
# webhook URL that is not public) with a 400, not a 404: the positive-data check accepts it.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""


def test_schemathesis_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    only_embedded(stack)
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    key = stack.key("schemathesis")
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    command = [
        str(cli),
        "run",
        f"{stack.api_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis found problems ({' '.join(command)}):\n{output[-12000:]}"
