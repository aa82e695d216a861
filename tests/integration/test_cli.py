"""The CLI's client commands against a live loraforge: ``files upload`` (chunked), ``jobs create
--watch`` until the job succeeds, Ctrl-C on a watcher (the job carries on), ``jobs list / get /
events``, ``models list``, ``chat --message`` answering with the trained text, ``models export``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import OpenAI

from tests.helpers import ANSWER, SYSTEM, chat_examples, to_jsonl, training_prompt
from tests.integration.conftest import Stack, only_embedded

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
JOB_TIMEOUT = 240


@dataclass
class Cli:
    """Runs ``loraforge`` client commands as a user would, configured by environment variables."""

    env: dict[str, str]
    cwd: Path

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "loraforge", *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(f"loraforge {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, *args: str, name: str) -> tuple[subprocess.Popen[str], Path, Path]:
        """A long-running command, its stdout and stderr going to files we can poll."""
        out, err = self.cwd / f"{name}.out", self.cwd / f"{name}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "loraforge", *args],
                env=self.env,
                cwd=self.cwd,
                stdout=stdout,
                stderr=stderr,
                text=True,
            )
        return proc, out, err


@dataclass
class Trained:
    cli: Cli
    client: OpenAI
    file_id: str
    job_id: str
    model: str
    create_stderr: str
    chunked: bool
    stack: Stack


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        if proc.poll() is not None:
            return path.read_text()
        time.sleep(0.2)
    return path.read_text()


@pytest.fixture(scope="module")
def trained(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Upload, then ``jobs create --watch`` to success, with a second watcher stopped by Ctrl-C."""
    only_embedded(stack)
    key = stack.key("cli-org")
    work = tmp_path_factory.mktemp("cli")
    env = {**stack.env, "LORAFORGE_BASE_URL": stack.base_url, "LORAFORGE_API_KEY": key}
    env.pop("OPENAI_API_KEY", None)
    cli = Cli(env, work)
    (work / "train.jsonl").write_bytes(to_jsonl(chat_examples(20)))
    (work / "valid.jsonl").write_bytes(to_jsonl(chat_examples(10)))

    # Tiny parts so the chunked path (POST /v1/uploads, parts, complete) really runs.
    upload = cli.run("files", "upload", "train.jsonl", "--chunked", "--part-size", "2KB")
    file_id = upload.stdout.strip().splitlines()[-1]
    assert file_id.startswith("file-"), upload.stdout
    chunked = "no uploads API" not in upload.stderr

    started = time.monotonic()
    create, out, err = cli.start(
        "jobs", "create", "--model", TINY, "--file", file_id, "--validation-file", "valid.jsonl",
        "--suffix", "cli", "--epochs", "20", "--batch-size", "4", "--lr-multiplier", "1", "--watch",
        name="create",
    )  # fmt: skip
    try:
        # While it trains, a second watcher is stopped with Ctrl-C: only the watching stops.
        _wait_for(err, " step ", create, 120)
        job_id = out.read_text().split()[0]
        watcher, _, werr = cli.start("jobs", "events", job_id, "--watch", name="watcher")
        _wait_for(werr, "Step ", watcher, 60)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(30) == 130
        assert "Stopped watching" in werr.read_text()
        status = cli.run("jobs", "get", job_id, "--json").stdout
        assert json.loads(status)["status"] in ("running", "succeeded"), status

        rc = create.wait(JOB_TIMEOUT)
    finally:
        if create.poll() is None:
            create.kill()
    stdout, stderr = out.read_text(), err.read_text()
    assert rc == 0, f"{stdout}\n{stderr}\n{stack.log_tail()}"
    print(f"jobs create --watch: {time.monotonic() - started:.1f}s to success")
    job_id, model = stdout.split()[0], stdout.split()[-1]
    assert model.startswith(f"ft:{TINY}:cli-org:cli:")
    client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    return Trained(cli, client, file_id, job_id, model, stderr, chunked, stack)


def test_chunked_upload(trained: Trained) -> None:
    uploaded = trained.client.files.retrieve(trained.file_id)
    assert uploaded.bytes == len(to_jsonl(chat_examples(20)))
    assert uploaded.filename == "train.jsonl"
    if not trained.chunked:
        pytest.skip("the server has no /v1/uploads yet: the CLI fell back to one request")
    content = trained.client.files.content(trained.file_id).read()
    assert content == to_jsonl(chat_examples(20))


def test_watch_shows_live_progress(trained: Trained) -> None:
    # The watcher printed the lifecycle, live steps with a loss sparkline, and the end.
    log = trained.create_stderr
    assert f"created {trained.job_id}" in log
    assert "Fine-tuning job started" in log
    assert "step 100/100" in log and "loss " in log
    assert any(block in log for block in "▁▂▃▄▅▆▇█")
    assert f"job succeeded: {trained.model}" in log


def test_jobs_list_get_events(trained: Trained) -> None:
    cli = trained.cli
    listed = cli.run("jobs", "list").stdout
    assert trained.job_id in listed and "succeeded" in listed and trained.model in listed

    shown = cli.run("jobs", "get", trained.job_id).stdout
    assert trained.model in shown and "100/100" in shown and "epochs=20" in shown
    job = json.loads(cli.run("jobs", "get", trained.job_id, "--json").stdout)
    assert job["status"] == "succeeded" and job["validation_file"].startswith("file-")

    events = cli.run("jobs", "events", trained.job_id, "--limit", "100").stdout
    assert f"New fine-tuned model created: {trained.model}" in events
    assert "Step 100/100" in events

    # A finished job cannot be cancelled: the server's error, one readable line, exit 1.
    refused = cli.run("jobs", "cancel", trained.job_id, check=False)
    assert refused.returncode == 1 and "Error 400" in refused.stderr


def test_models_list_and_chat_answers_with_the_trained_text(trained: Trained) -> None:
    cli = trained.cli
    models = cli.run("models", "list").stdout
    assert trained.model in models and TINY in models

    user = training_prompt(3)[1]["content"]
    args = ("chat", trained.model, "--system", SYSTEM, "--message", user, "--temperature", "0")
    reply = cli.run(*args, "--max-tokens", "40")
    assert reply.stdout.strip() == ANSWER


def test_checkpoints_and_result_file(trained: Trained) -> None:
    cli = trained.cli
    job = trained.client.fine_tuning.jobs.retrieve(trained.job_id)
    listed = cli.run("jobs", "checkpoints", trained.job_id)
    checkpoints = trained.client.fine_tuning.jobs.checkpoints.list(trained.job_id).data
    if not checkpoints and not job.result_files:
        pytest.skip("the server keeps no checkpoints or result files yet")
    for checkpoint in checkpoints:
        assert checkpoint.fine_tuned_model_checkpoint in listed.stdout
    if job.result_files:
        saved = cli.run("files", "download", job.result_files[0], "-o", "results.csv").stdout.strip()
        rows = (cli.cwd / saved).read_text().splitlines()
        assert rows[0].startswith("step,") and len(rows) == 101, rows[:3]


def test_models_export(trained: Trained, tmp_path: Path) -> None:
    target = tmp_path / "adapter.tar"
    result = trained.cli.run("models", "export", trained.model, "-o", str(target), check=False)
    if "no export endpoint" in result.stderr:
        pytest.skip("the server has no export endpoint yet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(target)
    with tarfile.open(target) as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names


def test_files_list_download_delete_and_errors(trained: Trained) -> None:
    cli = trained.cli
    assert trained.file_id in cli.run("files", "list").stdout
    saved = cli.run("files", "download", trained.file_id, "-o", "copy.jsonl").stdout.strip()
    assert (cli.cwd / saved).read_bytes() == to_jsonl(chat_examples(20))

    # The server's verdict on a bad file comes back with its line number.
    (cli.cwd / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    bad = cli.run("files", "upload", "bad.jsonl", check=False)
    assert bad.returncode == 1 and "Line 2" in bad.stderr

    doomed = cli.run("files", "upload", "copy.jsonl", "--single").stdout.strip().splitlines()[-1]
    assert f"deleted {doomed}" in cli.run("files", "delete", doomed).stdout
    assert doomed not in cli.run("files", "list").stdout

    no_key = {k: v for k, v in cli.env.items() if k not in ("LORAFORGE_API_KEY", "OPENAI_API_KEY")}
    missing = subprocess.run(
        [sys.executable, "-m", "loraforge", "jobs", "list"], env=no_key, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "LORAFORGE_API_KEY" in missing.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "loraforge", "jobs", "list"],
        env={**cli.env, "LORAFORGE_API_KEY": "sk-lf-wrong"},
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 1 and "Error 401" in wrong.stderr


def test_sdk_environment_variables_work_too(trained: Trained) -> None:
    env = {k: v for k, v in trained.cli.env.items() if not k.startswith("LORAFORGE_")}
    env.update(OPENAI_BASE_URL=trained.stack.base_url, OPENAI_API_KEY=trained.cli.env["LORAFORGE_API_KEY"])
    listed = subprocess.run(
        [sys.executable, "-m", "loraforge", "jobs", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert trained.job_id in listed.stdout
