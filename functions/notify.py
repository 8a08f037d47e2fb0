"""Outbox queue -> deliver one signed webhook.

A webhook whose run has an earlier one still on its way to the same receiver is held back (queued
again for a moment) so that one run's webhooks arrive in order, for up to
TUNEDROP_WEBHOOK_ORDER_WAIT_S; then it goes anyway (receivers can order by `data.sequence`).
A failed delivery is queued again with a growing delay (back-off); after the last attempt, or
for a receiver address tunedrop may not call, the webhook is parked in `<queue>-poison`: kept,
visible, never silently dropped. An unexpected error raises, and the host's own retries and
poison queue take over.
"""

import logging
import time

import azure.functions as func

from shared.settings import STORAGE_CONNECTION, Settings
from shared.webhooks import (
    DeliveryLedger,
    Outbox,
    OutboxMessage,
    WebhookDeliveryError,
    WebhookTargetRefused,
    deliver,
)

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.notify")


@bp.queue_trigger(arg_name="msg", queue_name="%TUNEDROP_WEBHOOK_QUEUE%", connection=STORAGE_CONNECTION)
def notify(msg: func.QueueMessage) -> None:
    settings = Settings.from_env()
    message = OutboxMessage.from_json(msg.get_body())
    kind = message.payload.get("type")
    ledger = DeliveryLedger(settings)
    earlier = ledger.earlier_pending(message) if message.run_id else []
    if earlier:
        waited = time.time() - (message.queued_at or time.time())
        if waited < settings.webhook_order_wait_s:
            Outbox(settings).hold(message)
            log.info("webhook %s (%s) held: run %s still has %s on its way", message.id, kind, message.run_id,
                     ", ".join(earlier))
            return
        log.warning("webhook %s (%s) sent out of order after %.0f s: run %s still has %s on its way", message.id, kind,
                    waited, message.run_id, ", ".join(earlier))
    try:
        status = deliver(message, settings.webhook_secret, settings.webhook_timeout_s,
                         allow_private=settings.webhook_allow_private)
    except WebhookTargetRefused as exc:
        Outbox(settings).park(message, str(exc))
        log.error("webhook %s (%s) refused and parked: %s", message.id, kind, exc)
        return
    except WebhookDeliveryError as exc:
        if message.attempt >= settings.webhook_attempts:
            Outbox(settings).park(message, str(exc))
            log.error("webhook %s (%s) parked in the poison queue after %d attempts: %s",
                      message.id, kind, message.attempt, exc)
            return
        delay = Outbox(settings).redeliver_later(message, str(exc))
        log.warning("webhook %s (%s) attempt %d failed (%s); next in %d s", message.id, kind, message.attempt, exc, delay)
        return
    ledger.delivered(message, status)
    log.info("webhook %s (%s) delivered: HTTP %d, attempt %d", message.id, kind, status, message.attempt)
