"""The app's functions by name, as the Functions host indexes them from `function_app.app`."""

import asyncio
import inspect
import json
from dataclasses import dataclass
from functools import lru_cache

import azure.functions as func
from azure.functions.queue import QueueMessage  # the worker's subclass, as the host binds it

import function_app


@lru_cache(maxsize=1)
def _index() -> dict:
    # The app validates name uniqueness on every get_functions() call, so index it once.
    return {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}


def handler(name: str):
    """The function called ``name``; an HTTP one is wrapped to be called as the worker calls it (a request from
    :func:`http_request`, the response run to its end) and to return an :class:`Answer`."""
    function = _index()[name]
    if not inspect.iscoroutinefunction(function):
        return function

    def call(request) -> Answer:
        return answer_of(asyncio.run(function(request)))

    return call


def http_request(method: str, url: str, route_params: dict | None = None, body: bytes = b"",
                 headers: dict | None = None):
    """The FastAPI request the worker gives an HTTP function (HTTP streams are on for the app)."""
    from urllib.parse import urlsplit

    from tunedrop.host.http_streams import build_request

    parts = urlsplit(url)
    return build_request(method, parts.path or "/", parts.query, list((headers or {}).items()), body,
                         route_params or {})


@dataclass
class Answer:
    """A response as a client receives it."""

    status_code: int
    headers: dict
    body: bytes

    def get_body(self) -> bytes:
        return self.body

    def json(self):
        return json.loads(self.body)


def answer_of(value) -> Answer:
    """A function's response run to its end (a stream read whole), as the host sends it."""
    import httpx

    from tunedrop.host.http_streams import as_response, build_request, send

    got: dict = {"body": b""}

    def start(status, headers):
        got.update(status=status, headers=httpx.Headers(headers))  # case-insensitive, as a client reads them

    def write(piece):
        got["body"] += piece

    send(as_response(value), build_request("GET", "/", "", [], b"", {}), start, write)
    return Answer(got["status"], got["headers"], got["body"])


def queued_run_events() -> list[QueueMessage]:
    """The messages `job_events` queued, taken off the queue as the host's queue listener takes them."""
    from shared.settings import Settings
    from shared.storage import default_storage

    queue = default_storage().queue(Settings.from_env().job_events_queue)
    taken = []
    while batch := list(queue.receive_messages(max_messages=32, visibility_timeout=300)):
        for message in batch:
            taken.append(QueueMessage(id=message.id, body=message.content, dequeue_count=message.dequeue_count))
            queue.delete_message(message)
    return taken


def deliver_run_event(event: func.EventGridEvent) -> None:
    """One Event Grid delivery as Azure runs it: `job_events` queues the event, `job_event_worker` acts on it."""
    handler("job_events")(event)
    for message in queued_run_events():
        handler("job_event_worker")(message)
