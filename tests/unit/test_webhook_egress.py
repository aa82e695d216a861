"""Webhook URLs may reach only public addresses: checked after DNS at create, update, test and
every delivery (against DNS rebinding, the connection goes to the checked address), credentials in
URLs are never shown, and ``test`` cannot tell a closed port from a silent one."""

from __future__ import annotations

import base64
import ipaddress
import socket
import threading
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select

from loraforge.api.app import create_app
from loraforge.db.models import WebhookDelivery
from loraforge.db.session import make_engine, make_sessionmaker, session_scope
from loraforge.settings import Settings
from loraforge.webhooks import delivery, egress
from tests.conftest import RecordingDispatcher
from tests.webhook_receiver import Receiver, webhook_receiver

EVENT = "fine_tuning.job.succeeded"
# Spellings of places a webhook must never reach; none needs DNS beyond /etc/hosts.
REFUSED = [
    "http://0/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://127.1:5432/",
    "http://localhost:5432/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
]


def sdk(api: TestClient, key: str) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=api, max_retries=0)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


def client_with(settings: Settings, **changes: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=changes), dispatcher=RecordingDispatcher()))


def test_internal_destinations_are_refused_at_create_and_update(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("acme"))
    ok = client.webhooks.create(event_types=[EVENT], name="ok", url="https://hooks.invalid/x")
    for url in REFUSED:
        with pytest.raises(openai.BadRequestError) as created:
            client.webhooks.create(event_types=[EVENT], name="x", url=url)
        error = created.value.body
        assert isinstance(error, dict), url
        assert created.value.param == "url" and created.value.code == "webhook_url_not_allowed", url
        # One message for every refusal: what a name resolved to is never told.
        assert error["message"] == (
            "Webhook URLs must point at public internet addresses, and this URL's host is not one (or "
            "resolves to one that is not). An operator can allow internal receivers with "
            "LORAFORGE_WEBHOOK_ALLOWED_HOSTS."
        ), url
        with pytest.raises(openai.BadRequestError) as updated:
            client.webhooks.update(ok.id, url=url)
        assert updated.value.code == "webhook_url_not_allowed", url


def test_every_address_is_judged_including_embedded_ipv4() -> None:
    for url in REFUSED:
        with pytest.raises(egress.DestinationRefused):
            egress.check(url, egress.EgressPolicy())
    assert egress.blocked_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert egress.blocked_reason(ipaddress.ip_address("2606:4700:4700::1111")) is None
    assert "metadata" in (egress.blocked_reason(ipaddress.ip_address("168.63.129.16")) or "")
    allowed = egress.EgressPolicy.of(["10.0.0.0/8", "Receiver.Internal."])
    assert allowed.refusal("x", ipaddress.ip_address("10.1.2.3")) is None
    assert allowed.refusal("receiver.internal", ipaddress.ip_address("192.168.0.9")) is None
    assert allowed.refusal("x", ipaddress.ip_address("192.168.0.9")) is not None


def test_a_host_answering_with_any_internal_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    public, private = ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("10.0.0.7")
    monkeypatch.setattr(egress, "_getaddrinfo", lambda host, port: [public, private])
    with pytest.raises(egress.DestinationRefused):
        egress.check("https://mixed.example/h", egress.EgressPolicy())


def test_the_operator_allowlist_admits_internal_receivers(
    settings: Settings, make_key, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    with client_with(settings, webhook_allowed_hosts=["127.0.0.1", "10.0.0.0/8"]) as api:
        client = sdk(api, make_key("acme"))
        hook = client.webhooks.create(event_types=[EVENT], name="r", url=f"{receiver.url}/in")
        assert client.webhooks.test(hook.id, event_type=EVENT).success is True
        client.webhooks.create(event_types=[EVENT], name="net", url="http://10.20.30.40/x")
        with pytest.raises(openai.BadRequestError):  # [::1] is not on the list
            client.webhooks.create(event_types=[EVENT], name="v6", url="http://[::1]/x")


def test_dns_rebinding_is_caught_at_delivery(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    answers = {"rebind.example": [ipaddress.ip_address("93.184.215.14")]}
    monkeypatch.setattr(egress, "_getaddrinfo", lambda host, p: answers[host])
    with client_with(settings) as api:
        client = sdk(api, make_key("acme"))
        hook = client.webhooks.create(event_types=[EVENT], name="r", url=f"http://rebind.example:{port}/r")
        answers["rebind.example"] = [ipaddress.ip_address("127.0.0.1")]  # the DNS answer changes
        with pytest.raises(openai.BadRequestError) as exc:
            client.webhooks.test(hook.id, event_type=EVENT)
        assert exc.value.code == "webhook_unreachable"
    policy = egress.EgressPolicy()
    result = delivery.post_signed(f"http://rebind.example:{port}/r", "msg_1", "{}", ["whsec_eA=="], 5, policy)
    assert result.status_code is None and (result.error or "").startswith("destination refused")
    assert receiver.received == []


def test_the_connection_goes_to_the_checked_address_with_the_original_host(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(receiver.url.rsplit(":", 1)[1])
    monkeypatch.setattr(egress, "_getaddrinfo", lambda host, p: [ipaddress.ip_address("127.0.0.1")])
    with client_with(settings, webhook_allowed_hosts=["127.0.0.0/8"]) as api:
        client = sdk(api, make_key("acme"))
        hook = client.webhooks.create(event_types=[EVENT], name="p", url=f"http://pinned.example:{port}/p")
        assert client.webhooks.test(hook.id, event_type=EVENT).status_code == 200
    (got,) = receiver.on("/p")
    assert got.headers["host"] == f"pinned.example:{port}"


def test_credentials_in_urls_are_used_but_never_shown(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, receiver: Receiver
) -> None:
    secret_url = receiver.url.replace("http://", "http://alice:s3cret@") + "/auth"
    with client_with(settings, webhook_allowed_hosts=["127.0.0.1"]) as api:
        client = sdk(api, make_key("acme"))
        hook = client.webhooks.create(event_types=[EVENT], name="a", url=secret_url)
        shown = [hook.url, client.webhooks.retrieve(hook.id).url, *(h.url for h in client.webhooks.list())]
        shown.append(client.webhooks.update(hook.id, name="b").url)
        for url in shown:
            assert "s3cret" not in url and "alice" not in url and url.startswith("http://***@127.0.0.1:")
        client.webhooks.test(hook.id, event_type=EVENT)
        with pytest.raises(openai.BadRequestError) as bad:
            client.webhooks.create(event_types=[EVENT], name="c", url="ftp://bob:hunter2@example.com/")
        assert "hunter2" not in str(bad.value.body)
    (got,) = receiver.on("/auth")
    assert got.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_test_is_not_a_port_scanner_and_reports_5xx_as_failure(  # type: ignore[no-untyped-def]
    settings: Settings, make_key, receiver: Receiver, silent_port: int
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with client_with(settings, webhook_allowed_hosts=["127.0.0.1"], webhook_test_timeout_seconds=0.5) as api:
        client = sdk(api, make_key("acme"))
        messages = []
        for port in (closed_port, silent_port):
            hook = client.webhooks.create(event_types=[EVENT], name="s", url=f"http://127.0.0.1:{port}/")
            with pytest.raises(openai.BadRequestError) as exc:
                client.webhooks.test(hook.id, event_type=EVENT)
            assert exc.value.code == "webhook_unreachable"
            messages.append(exc.value.message)
        assert messages[0] == messages[1]  # refused and silent read the same
        assert "Connect" not in messages[0] and "Timeout" not in messages[0]
        receiver.fail_first["/down"] = 1
        down = client.webhooks.create(event_types=[EVENT], name="d", url=f"{receiver.url}/down")
        answer = client.webhooks.test(down.id, event_type=EVENT)
        assert answer.status_code == 503 and answer.success is False
    engine = make_engine(settings)
    with session_scope(make_sessionmaker(engine)) as session:
        recorded = session.execute(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == down.id)
        ).scalar_one()
        assert recorded.status == "failed" and recorded.last_status_code == 503
    engine.dispose()
