"""Outbound webhooks: signed per Standard Webhooks, written to an outbox queue, delivered by `notify`.

Each state change publishes one message per receiver URL. The webhook id is derived from the run
and the event type, so a repeated publish carries the same id and receivers can dedupe on it.

Order: every webhook carries ``data.sequence``, the run's history length when it was published (it
grows with each state change, a retry included), so receivers can order a run's webhooks and drop
stale ones. Queues do not keep order, so `notify` also holds a webhook back while an earlier one of
the same run, for the same receiver, is still being delivered (:class:`DeliveryLedger`), up to
TUNEDROP_WEBHOOK_ORDER_WAIT_S.
"""

from __future__ import annotations

import base64
import dataclasses
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
    "run.canceled",
    "model.registered",
    "run.gated",
    "endpoint.deploying",
    "endpoint.waking",
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


def webhook_id(run_id: str, event_type: str, retry: int = 0, cycle: int = 0) -> str:
    """Stable per run, event, retry and deployment cycle: a repeat carries the same id, a retry's events and a
    woken run's are new."""
    key = f"{run_id}:{event_type}" + (f":{retry}" if retry else "") + (f":c{cycle}" if cycle else "")
    return "msg_" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class OutboxMessage:
    """One webhook for one receiver, as it sits in the outbox queue (no secret in it)."""

    id: str
    url: str
    payload: dict[str, Any]
    attempt: int = 1
    last_error: str = ""
    queued_at: float = 0.0  # when it was first queued (epoch s): how long it has waited for earlier ones

    def to_json(self) -> bytes:
        return json.dumps({"id": self.id, "url": self.url, "payload": self.payload, "attempt": self.attempt,
                           "last_error": self.last_error, "queued_at": self.queued_at}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "OutboxMessage":
        data = json.loads(raw)
        return cls(id=data["id"], url=data["url"], payload=data["payload"], attempt=int(data.get("attempt", 1)),
                   last_error=str(data.get("last_error", "")), queued_at=float(data.get("queued_at") or 0))

    @property
    def run_id(self) -> str:
        return str(self.payload.get("data", {}).get("run_id", ""))

    @property
    def sequence(self) -> int:
        return int(self.payload.get("data", {}).get("sequence") or 0)

    def again(self, **changes: Any) -> "OutboxMessage":
        return dataclasses.replace(self, **changes)


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

    def publish(self, run_id: str, event_type: str, data: dict[str, Any], *, sequence: int,
                retry: int = 0, cycle: int = 0) -> list[OutboxMessage]:
        """Queue ``event_type`` for every receiver; returns what was queued (nothing without URLs).

        ``sequence`` is the run's history length at this change (see the module's note on order)."""
        if event_type not in EVENT_TYPES:
            raise WebhookError(f"Unknown webhook event type {event_type!r}.")
        if not self._settings.webhook_urls:
            return []
        payload = {
            "type": event_type,
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "data": {"run_id": run_id, "sequence": sequence, **data},
        }
        message_id = webhook_id(run_id, event_type, retry, cycle)
        queued_at = time.time()
        messages = [OutboxMessage(message_id, url, payload, queued_at=queued_at) for url in self._settings.webhook_urls]
        queue = self._queue_client()
        ledger = DeliveryLedger(self._settings, self._storage)
        for message in messages:
            ledger.pending(message)  # before it can be delivered, so a later one waits for it
            queue.send_message(message.to_json())
        log.info("run %s: queued %s for %d receiver(s)", run_id, event_type, len(messages))
        return messages

    def redeliver_later(self, message: OutboxMessage, error: str) -> int:
        """Queue the next attempt of a failed delivery, hidden for the back-off; returns the delay."""
        delay = backoff_s(message.attempt, self._settings.webhook_backoff_s)
        retry = message.again(attempt=message.attempt + 1, last_error=error)
        self._queue_client().send_message(retry.to_json(), visibility_timeout=delay)
        DeliveryLedger(self._settings, self._storage).pending(message, error)
        return delay

    def hold(self, message: OutboxMessage) -> int:
        """Queue the webhook again, unchanged, for a moment: an earlier one of its run is still on its way."""
        self._queue_client().send_message(message.to_json(), visibility_timeout=HOLD_S)
        return HOLD_S

    def park(self, message: OutboxMessage, error: str) -> None:
        """Keep an undeliverable webhook in `<queue>-poison`, visible to operators, never dropped."""
        poison = self._storage.ensure_queue(f"{self._settings.webhook_queue}-poison")
        poison.send_message(message.again(last_error=error).to_json())
        DeliveryLedger(self._settings, self._storage).parked(message, error)


#: Seconds a webhook held back for an earlier one waits before it is looked at again.
HOLD_S = 2


class DeliveryLedger:
    """Each run's webhooks, per receiver, and where their delivery is: ``pending`` (queued, or failed and to be
    tried again, with the last error), ``delivered`` or ``parked`` (in the poison queue). `notify` holds a
    later webhook back while an earlier one is pending; the status page shows them all. Rows in the runs table
    under partition ``webhooks-<run_id>`` (run records live in another partition):
    ``<receiver key>-<sequence>-<webhook id>``; of the receiver only its scheme and host are stored, never its
    URL (its path or query may carry a token)."""

    PENDING, DELIVERED, PARKED = "pending", "delivered", "parked"

    def __init__(self, settings, storage=None):
        from shared.storage import default_storage

        self._settings = settings
        self._storage = storage or default_storage()

    @property
    def _table(self):
        return self._storage.table_service.get_table_client(self._settings.runs_table)

    @staticmethod
    def _partition(message_or_run_id) -> str:
        run_id = message_or_run_id if isinstance(message_or_run_id, str) else message_or_run_id.run_id
        return f"webhooks-{run_id}"

    @staticmethod
    def _receiver(message: OutboxMessage) -> str:
        return hashlib.sha256(message.url.encode()).hexdigest()[:16]

    def _row(self, message: OutboxMessage) -> str:
        return f"{self._receiver(message)}-{message.sequence:08d}-{message.id}"

    def _record(self, message: OutboxMessage, status: str, **fields) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        entity = {"PartitionKey": self._partition(message), "RowKey": self._row(message), "type": message.payload["type"],
                  "sequence": message.sequence, "receiver": _host(message.url), "status": status,
                  "attempt": message.attempt, "at": datetime.now(timezone.utc).isoformat(), **fields}
        try:
            self._table.upsert_entity(entity)
        except ResourceNotFoundError:  # the table is made with the first run; made here if it is not there yet
            self._storage.table_service.create_table_if_not_exists(self._settings.runs_table)
            self._table.upsert_entity(entity)

    def pending(self, message: OutboxMessage, error: str = "") -> None:
        self._record(message, self.PENDING, error=error[:500])

    def delivered(self, message: OutboxMessage, http_status: int) -> None:
        self._record(message, self.DELIVERED, http_status=http_status, error="")

    def parked(self, message: OutboxMessage, error: str) -> None:
        self._record(message, self.PARKED, error=error[:500])

    def earlier_pending(self, message: OutboxMessage) -> list[str]:
        """The types of this run's webhooks for the same receiver, earlier in sequence, not yet delivered."""
        receiver = self._receiver(message)
        query = "PartitionKey eq @partition and RowKey ge @first and RowKey lt @mine"
        parameters = {"partition": self._partition(message), "first": f"{receiver}-",
                      "mine": f"{receiver}-{message.sequence:08d}-"}
        from azure.core.exceptions import ResourceNotFoundError

        try:
            rows = self._table.query_entities(query, parameters=parameters, select=["type", "status"])
            # a row without a status was written before statuses were kept: pending, as it was then
            return [e["type"] for e in rows if e.get("status", self.PENDING) == self.PENDING]
        except ResourceNotFoundError:  # no table yet: nothing was ever queued through the ledger
            return []

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        """Every webhook of the run and where its delivery is, in sequence order."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            rows = list(self._table.query_entities("PartitionKey eq @p", parameters={"p": self._partition(run_id)}))
        except ResourceNotFoundError:
            return []
        shown = [{k: row.get(k) for k in ("type", "sequence", "receiver", "status", "attempt", "at", "http_status",
                                          "error") if row.get(k) not in (None, "")} for row in rows]
        return sorted(shown, key=lambda r: (r.get("sequence") or 0, r.get("at") or ""))


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
