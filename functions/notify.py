"""Outbox queue -> deliver one signed webhook. A failure raises, so the queue redelivers it;
after the host's maxDequeueCount the message stays in `<queue>-poison`, never dropped."""

import logging

import azure.functions as func

from shared.settings import STORAGE_CONNECTION, Settings
from shared.webhooks import OutboxMessage, deliver

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.notify")


@bp.queue_trigger(arg_name="msg", queue_name="%TUNEDROP_WEBHOOK_QUEUE%", connection=STORAGE_CONNECTION)
def notify(msg: func.QueueMessage) -> None:
    settings = Settings.from_env()
    message = OutboxMessage.from_json(msg.get_body())
    status = deliver(message, settings.webhook_secret, settings.webhook_timeout_s)
    log.info("webhook %s (%s) delivered: HTTP %d, attempt %d",
             message.id, message.payload.get("type"), status, msg.dequeue_count or 1)
