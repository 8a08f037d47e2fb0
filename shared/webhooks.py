"""Outbound webhooks: signed per Standard Webhooks, written to an outbox queue, delivered by `notify`.

Each state change publishes one message per receiver URL. The webhook id is derived from the run
and the event type, so a repeated publish carries the same id and receivers can dedupe on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("tunedrop.webhooks")

#: The events a receiver can get, in the order a successful run emits them.
EVENT_TYPES = (
    "run.accepted",
    "run.rejected",
    "run.submitted",
    "run.running",
    "run.succeeded",
    "run.failed",
    "model.registered",
    "endpoint.deploying",
    "endpoint.ready",
    "endpoint.torn_down",
)


class WebhookError(Exception):
    """Base class of webhook errors."""


class WebhookDeliveryError(WebhookError):
    """The receiver did not answer 2xx; `notify` redelivers later, then parks the message in the poison queue."""


class WebhookTargetRefused(WebhookError):
    """The receiver's address is not one tunedrop may call (loopback, private, link-local...): SSRF guard."""


def _secret_bytes(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise WebhookError("Webhook secret must start with 'whsec_' (generate one with `tunedrop secret`).")
    return base64.b64decode(secret[len("whsec_"):])


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,` + base64(HMAC-SHA256(id.timestamp.body))."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def new_secret() -> str:
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_id(run_id: str, event_type: str, retry: int = 0) -> str:
    """Stable per run, event and retry: a repeat carries the same id, a retry's events are new."""
    key = f"{run_id}:{event_type}" + (f":{retry}" if retry else "")
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class OutboxMessage:
    """One webhook for one receiver, as it sits in the outbox queue (no secret in it)."""

    id: str
    url: str
    payload: dict[str, Any]
    attempt: int = 1
    last_error: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "url": self.url, "payload": self.payload, "attempt": self.attempt,
                           "last_error": self.last_error}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "OutboxMessage":
        data = json.loads(raw)
        return cls(id=data["id"], url=data["url"], payload=data["payload"], attempt=int(data.get("attempt", 1)),
                   last_error=str(data.get("last_error", "")))


def backoff_s(attempt: int, base_s: float) -> int:
    """Seconds before delivery ``attempt + 1``: base, 2 x base, 4 x base ... capped at an hour."""
    return int(min(base_s * 2 ** (attempt - 1), 3600))


def check_target(url: str, allow_private: bool) -> None:
    """Refuse receivers that are not public HTTP(S) addresses, unless private ones are allowed.

    Every address the name resolves to is checked, at each delivery (DNS can change).
    """
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetRefused(f"{_host(url)}: only http(s) URLs with a host can receive webhooks.")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror:
        raise WebhookDeliveryError(f"{_host(url)}: name does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise WebhookTargetRefused(
                f"{_host(url)} resolves to {address}, a non-public address: webhooks go to public receivers only "
                "(set TUNEDROP_WEBHOOK_ALLOW_PRIVATE=true for receivers on your own network)."
            )


class Outbox:
    def __init__(self, settings, storage=None):
        from shared.storage import default_storage

        self._settings = settings
        self._storage = storage or default_storage()
        self._queue = None

    def _queue_client(self):
        if self._queue is None:
            self._queue = self._storage.ensure_queue(self._settings.webhook_queue)
        return self._queue

    def publish(self, run_id: str, event_type: str, data: dict[str, Any], retry: int = 0) -> list[OutboxMessage]:
        """Queue ``event_type`` for every receiver; returns what was queued (nothing without URLs)."""
        if event_type not in EVENT_TYPES:
            raise WebhookError(f"Unknown webhook event type {event_type!r}.")
        if not self._settings.webhook_urls:
            return []
        payload = {
            "type": event_type,
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "data": {"run_id": run_id, **data},
        }
        message_id = webhook_id(run_id, event_type, retry)
        messages = [OutboxMessage(message_id, url, payload) for url in self._settings.webhook_urls]
        queue = self._queue_client()
        for message in messages:
            queue.send_message(message.to_json())
        log.info("run %s: queued %s for %d receiver(s)", run_id, event_type, len(messages))
        return messages

    def redeliver_later(self, message: OutboxMessage, error: str) -> int:
        """Queue the next attempt of a failed delivery, hidden for the back-off; returns the delay."""
        delay = backoff_s(message.attempt, self._settings.webhook_backoff_s)
        retry = OutboxMessage(message.id, message.url, message.payload, message.attempt + 1, error)
        self._queue_client().send_message(retry.to_json(), visibility_timeout=delay)
        return delay

    def park(self, message: OutboxMessage, error: str) -> None:
        """Keep an undeliverable webhook in `<queue>-poison`, visible to operators, never dropped."""
        poison = self._storage.ensure_queue(f"{self._settings.webhook_queue}-poison")
        parked = OutboxMessage(message.id, message.url, message.payload, message.attempt, error)
        poison.send_message(parked.to_json())


def deliver(message: OutboxMessage, secret: str, timeout_s: float = 10.0, client=None,
            allow_private: bool = False) -> int:
    """POST one webhook, signed; returns the status code, raises WebhookDeliveryError unless 2xx
    and WebhookTargetRefused for a receiver address tunedrop may not call."""
    import httpx

    check_target(message.url, allow_private)
    body = json.dumps(message.payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": message.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message.id, timestamp, body),
        "user-agent": "tunedrop-webhooks/1",
    }
    try:
        if client is None:
            with httpx.Client(timeout=timeout_s, follow_redirects=False) as own:
                response = own.post(message.url, content=body, headers=headers)
        else:
            response = client.post(message.url, content=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise WebhookDeliveryError(f"{message.payload['type']} to {_host(message.url)}: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise WebhookDeliveryError(f"{message.payload['type']} to {_host(message.url)}: HTTP {response.status_code}")
    return response.status_code


def _host(url: str) -> str:
    """Only scheme and host of a receiver URL: its path or query may carry a token."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}"
