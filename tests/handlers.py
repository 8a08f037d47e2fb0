"""The app's functions by name, as the Functions host indexes them from `function_app.app`."""

from functools import lru_cache

import azure.functions as func
from azure.functions.queue import QueueMessage  # the worker's subclass, as the host binds it

import function_app


@lru_cache(maxsize=1)
def _index() -> dict:
    # The app validates name uniqueness on every get_functions() call, so index it once.
    return {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}


def handler(name: str):
    return _index()[name]


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
