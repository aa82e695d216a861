"""Webhooks in process: signatures the openai SDK accepts, the /v1/webhook_endpoints API, the
outbox written by job transitions, and delivery with back-off retries to a real local server."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types.webhooks import FineTuningJobCancelledWebhookEvent, FineTuningJobSucceededWebhookEvent
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loraforge.db.models import Job, WebhookDelivery, WebhookDeliveryAttempt
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.jobs.state import JobStatus, transition
from loraforge.settings import Settings
from loraforge.webhooks import delivery
from loraforge.webhooks.signing import new_secret, signed_headers
from loraforge.webhooks.sweeper import Sweeper, dispatch_due
from tests.helpers import chat_examples, to_jsonl
from tests.webhook_receiver import Receiver, webhook_receiver

TINY = "loraforge/tiny-llama"
SUCCEEDED = "fine_tuning.job.succeeded"
ALL_JOB_EVENTS = [SUCCEEDED, "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


def verifier(secret: str) -> OpenAI:
    return OpenAI(api_key="unused", webhook_secret=secret)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The receiver runs on 127.0.0.1, which webhook URLs may not name unless the operator allows it.
    return settings.model_copy(update={"webhook_allowed_hosts": ["127.0.0.1"]})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def sessions(settings: Settings, api: TestClient) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings)  # the api fixture has migrated the database
    yield make_sessionmaker(engine)
    engine.dispose()


# -- signatures ---------------------------------------------------------------------------------


def test_signature_is_accepted_by_the_openai_sdk_and_tampering_is_not() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    body = json.dumps(
        {"id": "evt_1", "object": "event", "type": SUCCEEDED, "created_at": 1, "data": {"id": "ftjob-1"}}
    )
    headers = signed_headers("msg_1", int(time.time()), body, [secret])
    assert headers["webhook-signature"].startswith("v1,")
    event = verifier(secret).webhooks.unwrap(body, headers)
    assert isinstance(event, FineTuningJobSucceededWebhookEvent) and event.data.id == "ftjob-1"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier(secret).webhooks.unwrap(body.replace("ftjob-1", "ftjob-2"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier(new_secret()).webhooks.unwrap(body, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier(secret).webhooks.unwrap(body, {**headers, "webhook-id": "msg_2"})


def test_rotation_grace_period_signs_with_both_secrets() -> None:
    old, new = new_secret(), new_secret()
    body = '{"id":"evt_1","type":"fine_tuning.job.failed","created_at":1,"data":{"id":"ftjob-1"}}'
    headers = signed_headers("msg_1", int(time.time()), body, [new, old])
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        verifier(secret).webhooks.verify_signature(body, headers)


# -- the endpoints API --------------------------------------------------------------------------


def test_endpoint_lifecycle_through_the_sdk(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    created = client.webhooks.create(event_types=[SUCCEEDED], name="ci", url="https://example.com/hook")
    assert created.object == "webhook_endpoint" and created.id.startswith("we_")
    assert created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint == "whsec_****" + created.signing_secret[-4:]
    assert created.updated_at == created.created_at

    got = client.webhooks.retrieve(created.id)
    assert got.url == "https://example.com/hook" and got.event_types == [SUCCEEDED]
    assert "signing_secret" not in got.model_dump()

    unchanged = client.webhooks.update(created.id, name="ci")
    assert unchanged.updated_at == created.updated_at
    updated = client.webhooks.update(created.id, event_types=ALL_JOB_EVENTS, url="http://127.0.0.1:1/x")
    assert updated.event_types == ALL_JOB_EVENTS and updated.url == "http://127.0.0.1:1/x"

    rotated = client.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret

    assert client.webhooks.event_types.list().data == ALL_JOB_EVENTS

    deleted = client.webhooks.delete(created.id)
    assert deleted.deleted is True and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(created.id)


def test_list_paginates_newest_first_and_is_per_org(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    acme, umbrella = sdk(api, make_key("acme")), sdk(api, make_key("umbrella"))
    ids = [
        acme.webhooks.create(event_types=[SUCCEEDED], name=f"e{i}", url=f"https://example.com/{i}").id
        for i in range(3)
    ]
    page = acme.webhooks.list(limit=2)
    assert [e.id for e in page.data] == ids[::-1][:2] and page.has_more is True
    assert [e.id for e in acme.webhooks.list(limit=2)] == ids[::-1]
    assert umbrella.webhooks.list().data == []
    with pytest.raises(openai.NotFoundError):
        umbrella.webhooks.retrieve(ids[0])


def test_bad_endpoints_are_400s(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    with pytest.raises(openai.BadRequestError) as exc:
        client.webhooks.create(event_types=["batch.completed"], name="x", url="https://example.com")
    assert exc.value.param == "event_types" and "batch.completed" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.webhooks.create(event_types=[], name="x", url="https://example.com")
    assert exc.value.param == "event_types"
    with pytest.raises(openai.BadRequestError) as exc:
        client.webhooks.create(event_types=[SUCCEEDED], name="x", url="ftp://example.com")
    assert exc.value.param == "url"


def test_test_event_reaches_the_receiver_signed(api: TestClient, make_key, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    endpoint = client.webhooks.create(event_types=[SUCCEEDED], name="t", url=f"{receiver.url}/hook")
    result = client.webhooks.test(endpoint.id, event_type="fine_tuning.job.cancelled")
    assert result.status_code == 200 and result.success is True and result.webhook_endpoint_id == endpoint.id
    (got,) = receiver.on("/hook")
    event = verifier(endpoint.signing_secret).webhooks.unwrap(got.body, got.headers)
    assert isinstance(event, FineTuningJobCancelledWebhookEvent) and event.object == "event"

    receiver.fail_first["/down"] = 1
    down = client.webhooks.update(endpoint.id, url=f"{receiver.url}/down")
    failed = client.webhooks.test(down.id, event_type=SUCCEEDED)
    assert failed.status_code == 503 and failed.success is False
    client.webhooks.update(endpoint.id, url="http://127.0.0.1:9/nothing-listens")
    with pytest.raises(openai.BadRequestError) as exc:
        client.webhooks.test(endpoint.id, event_type=SUCCEEDED)
    assert exc.value.code == "webhook_unreachable"


def test_rotate_keeping_the_old_secret_signs_with_both(api: TestClient, make_key, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    endpoint = client.webhooks.create(event_types=[SUCCEEDED], name="r", url=f"{receiver.url}/r")
    rotated = client.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
    client.webhooks.test(endpoint.id, event_type=SUCCEEDED)
    (got,) = receiver.on("/r")
    for secret in (endpoint.signing_secret, rotated.signing_secret):
        verifier(secret).webhooks.unwrap(got.body, got.headers)
    # Without the grace period the old secret stops working at once.
    client.webhooks.rotate_secret(endpoint.id)
    client.webhooks.test(endpoint.id, event_type=SUCCEEDED)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier(rotated.signing_secret).webhooks.unwrap(
            receiver.on("/r")[1].body, receiver.on("/r")[1].headers
        )


# -- outbox and delivery -------------------------------------------------------------------------


def make_job(api: TestClient, key: str) -> str:
    client = sdk(api, key)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(chat_examples(12)))), purpose="fine-tune"
    ).id
    return client.fine_tuning.jobs.create(model=TINY, training_file=file_id).id


def deliveries(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with session_scope(sessions) as session:
        return list(session.execute(select(WebhookDelivery).order_by(WebhookDelivery.seq)).scalars())


def test_terminal_transition_writes_the_outbox_in_its_transaction(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session]
) -> None:
    key = make_key("acme")
    client = sdk(api, key)
    hook = client.webhooks.create(event_types=[SUCCEEDED], name="s", url="https://example.com/s").id
    both = client.webhooks.create(event_types=ALL_JOB_EVENTS, name="a", url="https://example.com/a").id
    sdk(api, make_key("umbrella")).webhooks.create(
        event_types=ALL_JOB_EVENTS, name="o", url="https://o.example"
    )
    job_id = make_job(api, key)

    with session_scope(sessions) as session:
        assert transition(session, job_id, JobStatus.QUEUED, "queued")
    assert deliveries(sessions) == []  # not terminal
    session = sessions()
    assert transition(session, job_id, JobStatus.FAILED, "boom")
    session.rollback()  # the event goes with the change it reports
    session.close()
    assert deliveries(sessions) == []

    client.fine_tuning.jobs.cancel(job_id)  # the API's transition
    (only,) = deliveries(sessions)
    assert only.endpoint_id == both and only.status == "pending" and only.event_type.endswith("cancelled")
    assert hook not in {d.endpoint_id for d in deliveries(sessions)}
    with session_scope(sessions) as session:
        finished_at = session.execute(select(Job.finished_at).where(Job.id == job_id)).scalar_one()
    assert json.loads(only.payload) == {
        "id": only.event_id,
        "object": "event",
        "type": "fine_tuning.job.cancelled",
        "created_at": finished_at,
        "data": {"id": job_id},
    }


@pytest.mark.slow  # waits out real back-off delays
def test_retries_back_off_with_a_stable_webhook_id(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    settings = Settings(
        home=api.app.state.services.settings.home,
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_retry_base_seconds=0.2,
        webhook_poll_seconds=0.02,
    )
    key = make_key("acme")
    endpoint = sdk(api, key).webhooks.create(
        event_types=ALL_JOB_EVENTS, name="f", url=f"{receiver.url}/flaky"
    )
    receiver.fail_first["/flaky"] = 3
    sweeper = Sweeper(
        settings, sessions, send=lambda delivery_id: delivery.deliver(settings, sessions, delivery_id)
    )
    sweeper.start()
    try:
        sdk(api, key).fine_tuning.jobs.cancel(make_job(api, key))
        got = receiver.wait_for(lambda r: len(r) == 4, timeout=20)
    finally:
        sweeper.stop()
    assert [r.answered for r in got] == [503, 503, 503, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    # base * 2**(n-1): 0.2, 0.4, 0.8 s (plus up to one poll interval and the attempt itself).
    for gap, expected in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert expected <= gap < expected + 0.5, gaps
    for r in got:  # every attempt is separately signed and verifies
        verifier(endpoint.signing_secret).webhooks.unwrap(r.body, r.headers)
    (row,) = deliveries(sessions)
    assert row.id == got[0].headers["webhook-id"] and row.status == "succeeded" and row.attempts == 4
    with session_scope(sessions) as session:
        attempts = list(
            session.execute(select(WebhookDeliveryAttempt).order_by(WebhookDeliveryAttempt.seq)).scalars()
        )
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 503), (2, 503), (3, 503), (4, 200)]


def test_gives_up_after_max_attempts_and_deleted_endpoints_cancel(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    settings = Settings(
        home=api.app.state.services.settings.home,
        webhook_allowed_hosts=["127.0.0.1"],
        webhook_retry_base_seconds=0,
        webhook_max_attempts=2,
    )
    key = make_key("acme")
    client = sdk(api, key)
    client.webhooks.create(event_types=ALL_JOB_EVENTS, name="f", url=f"{receiver.url}/down")
    receiver.fail_first["/down"] = 99
    client.fine_tuning.jobs.cancel(make_job(api, key))
    for _ in range(3):
        dispatch_due(settings, sessions, lambda i: delivery.deliver(settings, sessions, i))
    (row,) = deliveries(sessions)
    assert row.status == "failed" and row.attempts == 2 and row.last_status_code == 503

    gone = client.webhooks.create(event_types=ALL_JOB_EVENTS, name="g", url=f"{receiver.url}/gone")
    client.fine_tuning.jobs.cancel(make_job(api, key))
    client.webhooks.delete(gone.id)
    statuses = {d.endpoint_id: d.status for d in deliveries(sessions)[1:]}
    assert statuses[gone.id] == "cancelled"
    assert receiver.on("/gone") == []


def test_lost_tasks_are_dispatched_again_and_duplicates_do_nothing(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    settings = api.app.state.services.settings
    key = make_key("acme")
    sdk(api, key).webhooks.create(event_types=ALL_JOB_EVENTS, name="d", url=f"{receiver.url}/d")
    sdk(api, key).fine_tuning.jobs.cancel(make_job(api, key))
    sent: list[str] = []
    assert dispatch_due(settings, sessions, sent.append) == sent and len(sent) == 1
    assert dispatch_due(settings, sessions, sent.append) == []  # claimed: not sent twice
    # The task was lost (worker killed): once the claim lapses the sweeper sends it again.
    with session_scope(sessions) as session:
        session.execute(update(WebhookDelivery).values(lease_until=time.time() - 1))
    assert dispatch_due(settings, sessions, sent.append) == [sent[0]]
    # Both copies of the task run; only one makes the attempt.
    results = [delivery.deliver(settings, sessions, sent[0]) for _ in range(2)]
    assert results == ["succeeded", None]
    assert len(receiver.on("/d")) == 1


def test_send_failure_puts_the_delivery_back(  # type: ignore[no-untyped-def]
    api: TestClient, make_key, sessions: sessionmaker[Session]
) -> None:
    settings = api.app.state.services.settings
    key = make_key("acme")
    sdk(api, key).webhooks.create(event_types=ALL_JOB_EVENTS, name="d", url="https://example.com")
    sdk(api, key).fine_tuning.jobs.cancel(make_job(api, key))

    def broker_down(delivery_id: str) -> None:
        raise ConnectionError("broker down")

    assert dispatch_due(settings, sessions, broker_down) == []
    (row,) = deliveries(sessions)
    assert row.status == "pending" and row.lease_until is None
