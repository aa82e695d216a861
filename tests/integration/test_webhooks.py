"""Webhooks and Idempotency-Key against a live ``loraforge serve`` with the unmodified openai SDK:
a job that succeeds (finished by the worker) and one that is cancelled (by the API) each reach a
real HTTP server on 127.0.0.1, signed so that ``OpenAI(webhook_secret=...).webhooks.unwrap``
accepts them; a receiver that fails the first attempt gets a retry with the same webhook-id."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from openai import OpenAI
from openai.types.webhooks import FineTuningJobCancelledWebhookEvent, FineTuningJobSucceededWebhookEvent
from sqlalchemy import select

from loraforge.db.models import WebhookDelivery, WebhookDeliveryAttempt
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from tests.helpers import chat_examples, to_jsonl
from tests.integration.conftest import Stack, only_embedded
from tests.webhook_receiver import Received, webhook_receiver

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
SUCCEEDED, CANCELLED = "fine_tuning.job.succeeded", "fine_tuning.job.cancelled"
ALL_JOB_EVENTS = [SUCCEEDED, "fine_tuning.job.failed", CANCELLED]


def retry_base(stack: Stack) -> float:
    """The back-off base the stack's worker runs with (the default unless its env sets one)."""
    default = Settings.model_fields["webhook_retry_base_seconds"].default
    return float(stack.env.get("LORAFORGE_WEBHOOK_RETRY_BASE_SECONDS", default))


def wait_finished(client: OpenAI, job_id: str, stack: Stack, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while (status := client.fine_tuning.jobs.retrieve(job_id).status) not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {status} after {timeout}s\n{stack.log_tail()}")
        time.sleep(0.5)
    return status


def test_job_webhooks_are_signed_retried_and_idempotent_creates_replay(stack: Stack) -> None:
    only_embedded(stack)
    client = OpenAI(base_url=stack.base_url, api_key=stack.key("webhooks-it"), max_retries=0, timeout=120)
    with webhook_receiver() as receiver:
        receiver.fail_first["/flaky"] = 1
        ok = client.webhooks.create(event_types=ALL_JOB_EVENTS, name="ok", url=f"{receiver.url}/ok")
        flaky = client.webhooks.create(event_types=[SUCCEEDED], name="flaky", url=f"{receiver.url}/flaky")

        # Idempotency-Key: a retried create returns the original object, once.
        data = to_jsonl(chat_examples(20))
        files = [
            client.files.create(
                file=("train.jsonl", io.BytesIO(data)),
                purpose="fine-tune",
                extra_headers={"Idempotency-Key": "it-file"},
            )
            for _ in range(2)
        ]
        assert files[0].id == files[1].id and [f.id for f in client.files.list()] == [files[0].id]
        jobs = [
            client.fine_tuning.jobs.create(
                model=TINY,
                training_file=files[0].id,
                hyperparameters={"n_epochs": 3},
                extra_headers={"Idempotency-Key": "it-job"},
            )
            for _ in range(2)
        ]
        job = jobs[0]
        assert jobs[1].id == job.id

        doomed = client.fine_tuning.jobs.create(model=TINY, training_file=files[0].id)
        client.fine_tuning.jobs.cancel(doomed.id)
        assert wait_finished(client, job.id, stack) == "succeeded", stack.log_tail()
        assert [j.id for j in client.fine_tuning.jobs.list()] == [doomed.id, job.id]

        got = receiver.wait_for(
            lambda r: (
                len([x for x in r if x.path == "/ok"]) >= 2 and len([x for x in r if x.path == "/flaky"]) >= 2
            ),
            timeout=60 + 2 * retry_base(stack),
        )

    # Every delivery verifies with the endpoint's secret and carries the thin payload.
    by_type: dict[str, Received] = {}
    for delivery in (r for r in got if r.path == "/ok"):
        event = OpenAI(api_key="unused", webhook_secret=ok.signing_secret).webhooks.unwrap(
            delivery.body, delivery.headers
        )
        by_type[event.type] = delivery
        assert set(json.loads(delivery.body)) == {"id", "object", "type", "created_at", "data"}
    succeeded = OpenAI(api_key="x", webhook_secret=ok.signing_secret).webhooks.unwrap(
        by_type[SUCCEEDED].body, by_type[SUCCEEDED].headers
    )
    cancelled = OpenAI(api_key="x", webhook_secret=ok.signing_secret).webhooks.unwrap(
        by_type[CANCELLED].body, by_type[CANCELLED].headers
    )
    assert isinstance(succeeded, FineTuningJobSucceededWebhookEvent) and succeeded.data.id == job.id
    assert isinstance(cancelled, FineTuningJobCancelledWebhookEvent) and cancelled.data.id == doomed.id
    assert succeeded.created_at == client.fine_tuning.jobs.retrieve(job.id).finished_at
    assert succeeded.id.startswith("evt_")

    # A tampered body, or the wrong secret, is rejected.
    tampered = by_type[SUCCEEDED].body.replace(job.id.encode(), doomed.id.encode())
    with pytest.raises(openai.InvalidWebhookSignatureError):
        OpenAI(api_key="x", webhook_secret=ok.signing_secret).webhooks.unwrap(
            tampered, by_type[SUCCEEDED].headers
        )
    with pytest.raises(openai.InvalidWebhookSignatureError):
        OpenAI(api_key="x", webhook_secret=flaky.signing_secret).webhooks.unwrap(
            by_type[SUCCEEDED].body, by_type[SUCCEEDED].headers
        )

    # The receiver that failed once got a retry after the back-off, with the same webhook-id.
    first, second = [r for r in got if r.path == "/flaky"][:2]
    assert (first.answered, second.answered) == (503, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
    assert second.at - first.at >= retry_base(stack) * 0.9
    OpenAI(api_key="x", webhook_secret=flaky.signing_secret).webhooks.unwrap(second.body, second.headers)

    # The attempts are recorded.
    engine = make_engine(Settings(home=stack.home))
    with session_scope(make_sessionmaker(engine)) as session:
        row = session.execute(
            select(WebhookDelivery).where(WebhookDelivery.id == first.headers["webhook-id"])
        ).scalar_one()
        attempts = session.execute(
            select(WebhookDeliveryAttempt.status_code).where(WebhookDeliveryAttempt.delivery_id == row.id)
        ).scalars()
        assert row.status == "succeeded" and row.endpoint_id == flaky.id and list(attempts) == [503, 200]
    engine.dispose()
