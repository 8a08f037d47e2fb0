"""Queue trigger: poll a storage queue like the Functions host's queue listener.

Mirrors: batches of ``batchSize`` messages processed in parallel; messages hidden while they run;
``messageEncoding`` (base64 by default); success deletes the message; failure makes it visible
again after ``visibilityTimeout``; a message that fails on its ``maxDequeueCount``-th delivery (or
arrives already past it, or cannot be decoded) is copied unchanged to ``<queue>-poison`` and deleted.
Differences: a fixed poll interval instead of the host's exponential back-off, and no renewal of a
message's invisibility (it is hidden for functionTimeout + 30 s, 10 min when unbounded).
"""

from __future__ import annotations

import base64
import binascii
import logging
from concurrent.futures import wait

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage  # the worker's subclass of func.QueueMessage
from azure.storage.queue import QueueServiceClient

from tunedrop.host.config import HOST_CLIENT_OPTIONS, resolve_settings, storage_connection_string
from tunedrop.host.invoke import FunctionSpec
from tunedrop.host.listener import HostContext, PollingListener

log = logging.getLogger("tunedrop.host")


def decode_message(content: str, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64decode(content, validate=True)
    return content.encode("utf-8")


def encode_message(body: bytes, encoding: str) -> str:
    return base64.b64encode(body).decode("ascii") if encoding == "base64" else body.decode("utf-8")


def ensure_queue(service: QueueServiceClient, name: str):
    client = service.get_queue_client(name)
    try:
        client.create_queue()
    except ResourceExistsError:
        pass
    return client


def bind_queue_message(spec: FunctionSpec, *, id: str | None, body: bytes, dequeue_count: int | None = None,
                       expiration_time=None, insertion_time=None, time_next_visible=None, pop_receipt=None):
    """The value the worker passes for the parameter's annotation: str, bytes or a func.QueueMessage."""
    if spec.param_type is str:
        return body.decode("utf-8")
    if spec.param_type is bytes:
        return body
    return QueueMessage(id=id, body=body, dequeue_count=dequeue_count, expiration_time=expiration_time,
                             insertion_time=insertion_time, time_next_visible=time_next_visible,
                             pop_receipt=pop_receipt)


class QueueListener(PollingListener):
    def __init__(self, spec: FunctionSpec, ctx: HostContext):
        super().__init__(spec, ctx, workers=max(1, ctx.batch_size))
        where = f"Function {spec.name}"
        self.queue_name = resolve_settings(spec.trigger["queueName"], ctx.environ, where).lower()
        connection = storage_connection_string(ctx.environ, spec.trigger.get("connection"), where)
        self.service = QueueServiceClient.from_connection_string(connection, **HOST_CLIENT_OPTIONS)
        self.queue = self.service.get_queue_client(self.queue_name)  # raw text: encoding is ours
        self.poison_name = f"{self.queue_name}-poison"
        timeout = ctx.function_timeout_s
        self.hide_s = int(timeout + 30) if timeout else 600

    def describe(self) -> str:
        return f"queueTrigger ({self.queue_name})"

    def setup(self) -> None:
        ensure_queue(self.service, self.queue_name)

    def poll(self) -> bool:
        batch = list(self.queue.receive_messages(messages_per_page=self.ctx.batch_size,
                                                 max_messages=self.ctx.batch_size,
                                                 visibility_timeout=self.hide_s))
        wait([self._workers.submit(self._process, message) for message in batch])
        return bool(batch)

    def _process(self, message) -> None:
        max_count = self.ctx.max_dequeue_count
        if message.dequeue_count > max_count:
            self._poison(message)
            return
        try:
            body = decode_message(message.content, self.ctx.message_encoding)
        except (binascii.Error, ValueError):
            log.error("Message %s on queue '%s' is not valid %s (host.json messageEncoding).",
                      message.id, self.queue_name, self.ctx.message_encoding)
            self._poison(message)
            return
        outcome = self.ctx.invoker.invoke(
            self.spec, f"New queue message detected on '{self.queue_name}'.",
            lambda: bind_queue_message(
                self.spec, id=message.id, body=body, dequeue_count=message.dequeue_count,
                expiration_time=message.expires_on, insertion_time=message.inserted_on,
                time_next_visible=message.next_visible_on, pop_receipt=message.pop_receipt))
        try:
            if outcome.succeeded:
                self.queue.delete_message(message.id, message.pop_receipt)
            elif message.dequeue_count >= max_count:
                self._poison(message)
            else:
                self.queue.update_message(message.id, message.pop_receipt,
                                          visibility_timeout=int(self.ctx.visibility_timeout_s))
        except ResourceNotFoundError:
            pass  # the message was deleted or its pop receipt expired: the host ignores that too

    def _poison(self, message) -> None:
        log.warning("Message has reached MaxDequeueCount of %d. Moving message to queue '%s'.",
                    self.ctx.max_dequeue_count, self.poison_name)
        ensure_queue(self.service, self.poison_name).send_message(message.content)
        try:
            self.queue.delete_message(message.id, message.pop_receipt)
        except ResourceNotFoundError:
            pass
