"""Outbox queue -> deliver one signed webhook.

A failed delivery is queued again with a growing delay (back-off); after the last attempt, or
for a receiver address tunedrop may not call, the webhook is parked in `<queue>-poison`: kept,
visible, never silently dropped. An unexpected error raises, and the host's own retries and
poison queue take over.
"""

import logging

import azure.functions as func

from shared.settings import STORAGE_CONNECTION, Settings
from shared.webhooks import Outbox, OutboxMessage, WebhookDeliveryError, WebhookTargetRefused, deliver

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.notify")


@bp.queue_trigger(arg_name="msg", queue_name="%TUNEDROP_WEBHOOK_QUEUE%", connection=STORAGE_CONNECTION)
def notify(msg: func.QueueMessage) -> None:
    settings = Settings.from_env()
    message = OutboxMessage.from_json(msg.get_body())
    kind = message.payload.get("type")
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
    log.info("webhook %s (%s) delivered: HTTP %d, attempt %d", message.id, kind, status, message.attempt)
