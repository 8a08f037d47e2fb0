"""The queue between Event Grid and the work a run event starts.

Event Grid waits 30 s for an answer, then delivers the event again; registering a model and starting
a deployment (a cold import of azure.ai.ml, a job read, MLflow metrics, two ARM calls) can take longer.
So `job_events` only checks that an event is a run event of this workspace and puts it here, which
takes milliseconds, and `job_event_worker` (a queue trigger: at least once, `<queue>-poison` after
host.json's maxDequeueCount) does the work, as idempotently as before: a duplicate or late event
changes nothing.
"""

from __future__ import annotations

import logging
import threading

from shared.events import RunEvent

log = logging.getLogger("tunedrop.event_queue")


class RunEventQueue:
    def __init__(self, settings, storage=None):
        from shared.storage import default_storage

        self._settings = settings
        self._storage = storage or default_storage()
        self._queue = None

    def put(self, event: RunEvent) -> bool:
        """Queue ``event`` for the worker when it is a run event of this app's workspace; False when
        it is not (acknowledged: nothing will ever make it one)."""
        foreign = event.foreign_to(self._settings.workspace_id)
        if foreign:
            log.info("event %s: %s, ignored", event.id, foreign)
            return False
        if self._queue is None:
            self._queue = self._storage.ensure_queue(self._settings.job_events_queue)
        self._queue.send_message(event.to_json())
        return True


_lock = threading.Lock()
_queues: dict[tuple, RunEventQueue] = {}


def get_event_queue(settings) -> RunEventQueue:
    """The queue for ``settings``, made once per process: its client (and the queue's creation) is reused."""
    from shared.storage import default_storage

    key = (settings, id(default_storage()))
    with _lock:
        if key not in _queues:
            _queues[key] = RunEventQueue(settings)
        return _queues[key]
