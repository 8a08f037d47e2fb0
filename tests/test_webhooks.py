"""Webhook signing (verified by the standardwebhooks package), the outbox queue, delivery."""

import time
from datetime import datetime, timezone

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.settings import Settings
from shared.storage import default_storage
from shared.webhooks import (
    Outbox,
    OutboxMessage,
    WebhookDeliveryError,
    WebhookError,
    WebhookTargetRefused,
    backoff_s,
    check_target,
    deliver,
    new_secret,
    sign,
    webhook_id,
)
from tests.receiver import Receiver


def test_signature_verifies_with_the_reference_implementation():
    secret = new_secret()
    body = b'{"type":"run.accepted","data":{"run_id":"r1"}}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000",
               "webhook-signature": sign(secret, "msg_1", 1700000000, body)}
    reference = Webhook(secret)
    sent_at = datetime.fromtimestamp(1700000000, tz=timezone.utc)
    assert reference.sign("msg_1", sent_at, body.decode()) == headers["webhook-signature"]


def test_tampered_body_fails_verification():
    secret = new_secret()
    ts = int(time.time())
    signature = sign(secret, "msg_1", ts, b'{"a":1}')
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(b'{"a":2}', {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
                                            "webhook-signature": signature})


def test_secret_without_prefix_is_refused():
    with pytest.raises(WebhookError, match="whsec_"):
        sign("not-a-secret", "msg_1", 1, b"{}")


def test_webhook_ids_are_stable_per_run_and_event():
    assert webhook_id("run-1", "run.accepted") == webhook_id("run-1", "run.accepted")
    assert webhook_id("run-1", "run.accepted") != webhook_id("run-1", "run.submitted")
    assert webhook_id("run-1", "run.accepted") != webhook_id("run-2", "run.accepted")


def test_outbox_queues_one_message_per_receiver_without_the_secret(storage_env, monkeypatch):
    secret = new_secret()
    monkeypatch.setenv("TUNEDROP_WEBHOOK_URLS", "http://127.0.0.1:1/a, http://127.0.0.1:2/b")
    monkeypatch.setenv("TUNEDROP_WEBHOOK_SECRET", secret)
    settings = Settings.from_env()
    Outbox(settings).publish("run-1", "run.accepted", {"examples": 48}, sequence=2)
    queue = default_storage().queue(settings.webhook_queue)
    messages = [OutboxMessage.from_json(m.content) for m in queue.receive_messages(max_messages=10)]
    assert sorted(m.url for m in messages) == ["http://127.0.0.1:1/a", "http://127.0.0.1:2/b"]
    assert all(m.payload["type"] == "run.accepted" and m.payload["data"]["examples"] == 48 for m in messages)
    assert all(secret not in m.to_json().decode() for m in messages)


def test_unknown_event_type_is_refused(storage_env):
    with pytest.raises(WebhookError, match="Unknown webhook event type"):
        Outbox(Settings.from_env()).publish("run-1", "run.exploded", {}, sequence=1)


def test_deliver_posts_a_verifiable_webhook():
    secret = new_secret()
    with Receiver(secret) as receiver:
        message = OutboxMessage(webhook_id("run-1", "run.succeeded"), receiver.url,
                                {"type": "run.succeeded", "timestamp": "t", "data": {"run_id": "run-1"}})
        assert deliver(message, secret, allow_private=True) == 204
        assert receiver.received[0]["id"] == message.id
        assert receiver.received[0]["data"] == {"run_id": "run-1"}


def test_deliver_raises_on_non_2xx_and_unreachable_without_leaking_the_url_query():
    secret = new_secret()
    with Receiver(secret, status=500) as receiver:
        message = OutboxMessage("msg_x", receiver.url, {"type": "run.failed", "data": {}})
        with pytest.raises(WebhookDeliveryError, match="HTTP 500") as info:
            deliver(message, secret, allow_private=True)
        assert "token" not in str(info.value)
    with pytest.raises(WebhookDeliveryError, match="ConnectError"):
        deliver(OutboxMessage("msg_y", "http://127.0.0.1:9/x", {"type": "run.failed", "data": {}}), secret,
                timeout_s=2, allow_private=True)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://192.168.0.10/hook",
    "http://172.16.5.5/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/hook", "http://0.0.0.0/hook",
    "http://[fd00::1]/hook",
])
def test_private_and_metadata_addresses_are_refused(url):
    with pytest.raises(WebhookTargetRefused, match="non-public address"):
        check_target(url, allow_private=False)
    check_target(url, allow_private=True)  # allowed only when asked for


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost"])
def test_non_http_targets_are_refused_even_when_private_is_allowed(url):
    with pytest.raises(WebhookTargetRefused, match="only http"):
        check_target(url, allow_private=True)


def test_public_literal_address_passes_the_guard():
    check_target("https://8.8.8.8/hook", allow_private=False)  # resolved, not contacted


def test_backoff_doubles_and_is_capped():
    assert [backoff_s(a, 10) for a in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_s(30, 10) == 3600
