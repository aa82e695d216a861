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


def test_schemathesis_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    only_embedded(stack)
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    key = stack.key("schemathesis")
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
