"""An S3 endpoint on a loopback port for the tests: moto's server (``moto[server]``, a dev
dependency), started by the tests themselves, one per session.

Processes reach it with the standard variables only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``): what a deployment on real S3 or MinIO sets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.net import free_port


@dataclass
class S3Server:
    """A running moto S3 server."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment a process needs to use it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def new_url(self, name: str = "lf") -> str:
        """A ``s3://bucket/prefix`` URL nobody used yet (the store creates the bucket)."""
        return f"s3://{name}-{uuid.uuid4().hex[:12]}/store"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_s3(log_dir: Path, timeout: float = 60) -> S3Server:
    """Start moto's S3 server on a free loopback port and wait until it answers.

    Skips the calling test when moto is not installed (``pip install -e '.[dev]'`` brings it).
    """
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto's S3 server is not installed (moto[server], in the dev extra)")
    port = free_port()
    log_path = log_dir / "moto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    server = S3Server(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited:\n{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    pytest.fail(f"moto_server did not answer within {timeout}s")


def apply_env(server: S3Server) -> dict[str, str]:
    """Set the server's variables in this process (for in-process stores); return the old values."""
    old = {key: os.environ.get(key, "") for key in server.env}
    os.environ.update(server.env)
    return old
