"""The web platform in a real browser (Debian's Chromium driven by Playwright) against a live
loraforge: sign in -> upload a file -> create a job from the form -> watch it succeed with a live
chart -> download the result file and the export -> chat with the model in the playground ->
jobs, files and models pages; pause / resume / cancel on a second job.

Screenshots of each page land in the test's temporary folder; with LORAFORGE_UPDATE_SCREENSHOTS=1
they are also written to docs/screenshots/ (the ones the README shows).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from openai import OpenAI

from tests.helpers import (
    ANSWER,
    SYSTEM,
    WEATHER_TOOL,
    chat_examples,
    to_jsonl,
    training_prompt,
    weather_question,
)
from tests.integration.conftest import TOOL_CITIES, Stack, only_embedded

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1366, "height": 800}
DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TINY = "loraforge/tiny-llama"
JOB_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Session:
    """One signed-in browser page, with the page errors and downloads it saw."""

    def __init__(self, browser: Any, stack: Stack, shots: Path) -> None:
        self.stack = stack
        self.shots = shots
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.downloads: list[Any] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # The pages must work under the API's Content-Security-Policy: a blocked script, style,
        # image or request is reported on the console (and would break the page).
        self.page.on(
            "console",
            lambda msg: self.errors.append(msg.text) if "Content Security Policy" in msg.text else None,
        )
        self.page.on("download", lambda download: self.downloads.append(download))
        self.page.on("dialog", lambda dialog: dialog.accept())  # confirm() on cancel / delete

    def go(self, route: str) -> None:
        self.page.goto(f"{self.stack.api_url}/#{route}")

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        if os.environ.get("LORAFORGE_UPDATE_SCREENSHOTS") == "1":
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, DOCS_SHOTS / path.name)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser: Any, stack: Stack, tmp_path: Path) -> Iterator[Session]:
    only_embedded(stack)
    s = Session(browser, stack, tmp_path)
    yield s
    s.close()
    assert not s.errors, f"JavaScript errors on the page: {s.errors}"


def sign_in(s: Session, key: str, screenshot: bool = False) -> None:
    page = s.page
    s.go("/jobs")
    page.wait_for_selector("input[name=api_key]")
    if screenshot:
        s.shot("signin")
    page.fill("input[name=api_key]", "sk-lf-not-a-key")
    page.click("button[type=submit]")
    page.wait_for_selector(".error-box:has-text('Incorrect API key')")
    page.fill("input[name=api_key]", key)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Fine-tuning')")
    # The key lives in sessionStorage only.
    assert page.evaluate("sessionStorage.getItem('loraforge.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0


def test_platform_end_to_end(session: Session, stack: Stack, tmp_path: Path) -> None:
    s, page = session, session.page
    key = stack.key("web-org")
    client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    train, valid, bad = tmp_path / "train.jsonl", tmp_path / "valid.jsonl", tmp_path / "bad.jsonl"
    train.write_bytes(to_jsonl(chat_examples(20)))
    valid.write_bytes(to_jsonl(chat_examples(10)))
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    weights = tmp_path / "weights.jsonl"
    examples = chat_examples(20)
    examples[11]["messages"][2]["weight"] = 5
    weights.write_bytes(to_jsonl(examples))

    sign_in(s, key, screenshot=True)

    # Files: upload the validation file with progress; tiny parts take the chunked uploads API
    # when the server has it (the page falls back to one request when it does not).
    page.evaluate("sessionStorage.setItem('loraforge.chunkedAbove', '1000')")
    page.evaluate("sessionStorage.setItem('loraforge.partBytes', '1024')")
    page.click("[data-nav=files]")
    page.set_input_files("[data-testid=upload-input]", str(valid))
    page.click("[data-testid=upload-submit]")
    done = page.wait_for_selector("[data-testid=upload-done]").inner_text()
    valid_id = re.search(r"file-\w+", done).group(0)
    page.wait_for_selector(f"tr[data-file='{valid_id}']")
    assert client.files.content(valid_id).read() == valid.read_bytes()
    chunked = "in parts" in done

    # Create job: the browser's own checks name the bad lines before anything is uploaded.
    page.click("[data-nav=jobs]")
    page.click("[data-testid=create-job]")
    page.wait_for_selector("[data-testid=create-form]")
    page.set_input_files("[data-testid=training-file]", str(bad))
    problems = page.wait_for_selector("[data-testid=training-file-problems]").inner_text()
    assert "line 1" in problems and "line 2" in problems and "not valid JSON" in problems
    page.select_option("select[name=model]", TINY)
    page.select_option(".field:has([data-testid=validation-file]) select", valid_id)
    page.fill("input[name=suffix]", "web")
    page.fill("input[name=n_epochs]", "20")
    page.fill("input[name=batch_size]", "4")
    # A problem only the server knows (weight must be 0 or 1): its verdict, by line.
    page.set_input_files("[data-testid=training-file]", str(weights))
    page.wait_for_selector("[data-testid=training-file-ok]")
    page.click("[data-testid=dry-run]")
    lines = page.wait_for_selector("[data-testid=error-lines]").inner_text()
    assert "line 12" in lines and "must be 0 or 1" in lines, lines
    # The good file: the dry run's pre-flight, then the real thing.
    page.set_input_files("[data-testid=training-file]", str(train))
    assert "20 examples" in page.wait_for_selector("[data-testid=training-file-ok]").inner_text()
    page.click("[data-testid=dry-run]")
    verdict = page.wait_for_selector(
        "[data-testid=dry-run-result], .notice:has-text('Dry run is not available')"
    )
    dry_run = "not available" not in verdict.inner_text()
    if dry_run:
        assert "Steps" in verdict.inner_text() and "100" in verdict.inner_text()
    s.shot("create")
    page.click("[data-testid=create-submit]")

    # Job detail: live status, the chart fills as metrics events arrive, then success.
    page.wait_for_selector("[data-testid=job-detail]")
    job_id = page.evaluate("location.hash").rsplit("/", 1)[-1]
    assert job_id.startswith("ftjob-")
    page.wait_for_selector("[data-testid=chart-loss]:not([data-points='0'])", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("[data-testid=job-detail][data-status=succeeded]", timeout=JOB_TIMEOUT_MS)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded" and job.validation_file == valid_id and job.user_provided_suffix == "web"
    points = int(page.get_attribute("[data-testid=chart-loss]", "data-points"))
    assert points == 100, points  # one per step: 20 examples / batch 4 * 20 epochs
    assert page.locator("[data-testid=chart-loss] canvas").count() == 1
    assert page.locator("[data-testid=chart-accuracy] canvas").count() == 1
    # The memory plan chosen at creation, as the API reports it.
    plan = (job.model_extra or {})["plan"]
    assert plan["strategy"] == "lora" and plan["device"] == "cpu"
    assert page.inner_text("[data-testid=job-plan]") == plan["summary"]
    assert (
        page.locator(
            f"[data-testid=events] li:has-text('New fine-tuned model created: {job.fine_tuned_model}')"
        ).count()
        == 1
    )
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job_id).data:
        page.wait_for_selector(
            f"[data-testid=checkpoints] td:has-text('{checkpoint.fine_tuned_model_checkpoint}')"
        )
    page.evaluate("window.scrollTo(0, 0)")
    s.shot("job")

    if job.result_files:
        with page.expect_download() as result:
            page.click("[data-testid=result-download]")
        # Served base64 like OpenAI's; the page saves the decoded CSV.
        assert result.value.path().read_text().startswith("step,")
    export_ok = _export(s, tmp_path)

    # Playground: the fine-tuned model answers with the trained text, streamed over SSE.
    streams: list[str] = []
    page.on(
        "response",
        lambda r: (
            streams.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    page.click("text=Open in playground")
    page.wait_for_selector("[data-testid=pg-input]")
    assert page.input_value("[data-testid=pg-model]") == job.fine_tuned_model
    page.fill("[data-testid=pg-system]", SYSTEM)
    page.locator("[data-testid=pg-temperature]").evaluate(
        "el => { el.value = '0'; el.dispatchEvent(new Event('input', { bubbles: true })); }"
    )
    page.fill("input[name=max_tokens]", "40")
    page.fill("[data-testid=pg-input]", training_prompt(3)[1]["content"])
    page.click("[data-testid=pg-send]")
    reply = page.wait_for_selector(".msg[data-role=assistant] .msg-text").inner_text()
    assert reply == ANSWER
    assert any("text/event-stream" in ct for ct in streams), streams
    s.shot("playground")

    # Fine-tuning list: the job with its status and last metrics.
    page.click("[data-nav=jobs]")
    row = page.wait_for_selector(f"tr[data-job='{job_id}']")
    page.wait_for_selector(f"tr[data-job='{job_id}'] .metrics")
    assert "succeeded" in row.inner_text().lower() and "loss" in row.inner_text()

    page.click("[data-nav=files]")
    page.wait_for_selector(f"tr[data-file='{valid_id}']")
    s.shot("files")

    page.click("[data-nav=models]")
    page.wait_for_selector(f"tr[data-model='{job.fine_tuned_model}']")
    s.shot("models")
    page.click(f"tr[data-model='{job.fine_tuned_model}'] [data-action=delete]")
    page.wait_for_selector(f"tr[data-model='{job.fine_tuned_model}']", state="detached")
    assert job.fine_tuned_model not in [m.id for m in client.models.list().data]

    # Parts of the flow that depend on endpoints this server may not have yet: say so, loudly.
    if not chunked:
        warnings.warn("web: chunked upload not exercised: the server has no /v1/uploads", stacklevel=1)
    if not dry_run:
        warnings.warn("web: dry run not exercised: the server does not accept dry_run", stacklevel=1)
    if not export_ok:
        warnings.warn("web: export download not exercised: the server has no export endpoint", stacklevel=1)


def _export(s: Session, tmp_path: Path) -> bool:
    """Download the PEFT export from the job page; False when the server has no export endpoint."""
    page = s.page
    before = len(s.downloads)
    page.click("[data-testid=export-download]")
    outcome = page.wait_for_selector(
        "[data-testid=export-done], .notice:has-text('Export is not available')", timeout=120_000
    )
    if "not available" in outcome.inner_text():
        return False
    deadline = time.monotonic() + 10
    while len(s.downloads) == before and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    data = Path(s.downloads[-1].path()).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert "adapter_config.json" in names, names
    return True


def test_playground_shows_tool_calls(session: Session, stack: Stack, tool_model: tuple[OpenAI, str]) -> None:
    """Tools given as JSON in the playground; the tool-calling fine-tune's call is shown and can be
    answered with a result, sent back as a tool message."""
    s, page = session, session.page
    _, model = tool_model
    city = TOOL_CITIES[0]
    sign_in(s, stack.key("toolsmith"))
    s.go(f"/playground?model={quote(model)}")
    page.wait_for_selector("[data-testid=pg-input]")
    page.locator("[data-testid=pg-temperature]").evaluate(
        "el => { el.value = '0'; el.dispatchEvent(new Event('input', { bubbles: true })); }"
    )
    page.fill("input[name=max_tokens]", "40")
    page.fill("[data-testid=pg-tools]", "[{not json")
    page.fill("[data-testid=pg-input]", weather_question(city)[0]["content"])
    page.click("[data-testid=pg-send]")
    page.wait_for_selector(".error-box:has-text('Tools are not valid JSON')")
    page.fill("[data-testid=pg-tools]", json.dumps([WEATHER_TOOL], indent=2))
    page.fill("[data-testid=pg-input]", weather_question(city)[0]["content"])
    page.click("[data-testid=pg-send]")
    call = page.wait_for_selector(".msg[data-role=assistant] [data-testid=tool-call]")
    assert call.get_attribute("data-name") == "get_weather"
    assert json.loads(call.get_attribute("data-arguments") or "") == {"city": city}
    assert f'get_weather({{"city":"{city}"}})' in call.inner_text()
    # The input now answers the call; the model gets the result as a tool message and replies.
    placeholder = page.get_attribute("[data-testid=pg-input]", "placeholder") or ""
    assert placeholder.startswith("Result of get_weather (call_")
    page.fill("[data-testid=pg-input]", '{"temp_c": 21}')
    page.click("[data-testid=pg-send]")
    page.wait_for_selector(".msg[data-role=tool]:has-text('temp_c')")
    page.wait_for_selector(".msg[data-role=assistant] >> nth=1")
    s.shot("playground-tools")


def test_pause_resume_cancel_from_the_job_page(session: Session, stack: Stack, tmp_path: Path) -> None:
    s, page = session, session.page
    key = stack.key("web-org")
    client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    uploaded = client.files.create(
        file=("long.jsonl", io.BytesIO(to_jsonl(chat_examples(20)))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=uploaded.id, hyperparameters={"n_epochs": 50}
    )
    sign_in(s, key)
    # The jobs table follows the new job live, metrics included.
    page.wait_for_selector(f"tr[data-job='{job.id}'] [data-status=running]", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector(f"tr[data-job='{job.id}'] .metrics", timeout=JOB_TIMEOUT_MS)
    s.shot("jobs")
    page.click(f"tr[data-job='{job.id}'] a")
    page.wait_for_selector("[data-testid=job-detail][data-status=running]", timeout=JOB_TIMEOUT_MS)

    page.click("[data-action=pause]")
    paused = page.wait_for_selector(
        "[data-testid=job-detail][data-status=paused], .notice:has-text('Pause is not available')"
    )
    pause_works = paused.get_attribute("data-status") == "paused"
    if pause_works:
        page.click("[data-action=resume]")
        page.wait_for_selector("[data-testid=job-detail]:not([data-status=paused])")

    page.click("[data-action=cancel]")
    page.wait_for_selector("[data-testid=job-detail][data-status=cancelled]")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert page.is_disabled("[data-action=cancel]")
    if not pause_works:
        pytest.skip("cancel passed; pause / resume were not exercised: the server has no pause endpoint")


def test_every_page_works_under_the_content_security_policy(session: Session, stack: Stack) -> None:
    """Each page renders with the policy in force (the session fails on any CSP report)."""
    s, page = session, session.page
    key = stack.key("csp-org")
    OpenAI(base_url=stack.base_url, api_key=key, max_retries=0).files.create(
        file=("csp.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
    )
    violations: list[str] = []
    page.expose_function("reportViolation", lambda text: violations.append(text))
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation',"
        " e => window.reportViolation(e.violatedDirective + ' ' + e.blockedURI));"
    )
    sign_in(s, key)
    policy = page.evaluate("fetch('/').then(r => r.headers.get('content-security-policy'))")
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    for nav, ready in [
        ("files", "tr[data-file]"),
        ("models", "[data-testid=base-models]"),
        ("jobs", "h1:has-text('Fine-tuning')"),
    ]:
        page.click(f"[data-nav={nav}]")
        page.wait_for_selector(ready)
    page.click("[data-testid=create-job]")
    page.wait_for_selector("[data-testid=create-form]")
    # The form offers what this machine can train: the tiny model, first and chosen.
    assert page.input_value("select[name=model]") == TINY
    s.go("/playground")
    page.wait_for_selector("[data-testid=pg-input]")
    page.wait_for_timeout(300)  # late reports
    assert violations == [], violations


def test_api_keeps_openai_errors_and_assets_are_local(stack: Stack) -> None:
    only_embedded(stack)
    import httpx

    shell = httpx.get(f"{stack.api_url}/")
    assert shell.status_code == 200 and "text/html" in shell.headers["content-type"]
    # Nothing from a CDN: every script and stylesheet is served by the API itself.
    assert not re.search(r"(src|href)=\"https?://", shell.text)
    for asset in re.findall(r"(?:src|href)=\"(/static/[^\"]+)\"", shell.text):
        assert httpx.get(f"{stack.api_url}{asset}").status_code == 200, asset
    missing = httpx.get(f"{stack.api_url}/v1/no-such-thing")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
