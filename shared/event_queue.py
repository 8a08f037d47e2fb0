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

from shared.events import RunEvent

log = logging.getLogger("tunedrop.event_queue")


class RunEventQueue:
    def __init__(self, settings, storage=None):
        from shared.storage import default_storage

        self._settings = settings
        self._storage = storage or default_storage()
        self._queue = None

    def _client(self):
        if self._queue is None:
            from azure.core.exceptions import ResourceExistsError

            self._queue = self._storage.queue(self._settings.job_events_queue)
            try:
                self._queue.create_queue()
            except ResourceExistsError:
                pass
        return self._queue

    def put(self, event: RunEvent) -> bool:
        """Queue ``event`` for the worker when it is a run event of this app's workspace; False when
        it is not (acknowledged: nothing will ever make it one)."""
        if not event.is_run_event:
            log.info("event %s: type %s is not a run event, ignored", event.id, event.event_type)
            return False
        if event.topic.lower() != self._settings.workspace_id.lower():
            log.info("event %s: from another workspace (%s), ignored", event.id, event.topic)
            return False
        self._client().send_message(event.to_json())
        return True
