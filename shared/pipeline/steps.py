"""What every step of the workflow shares: the settings, the storage, the run store, the webhook
outbox and the backend (made on first use), and the one way a run moves (:meth:`Steps._move`)."""

from __future__ import annotations

import logging
from typing import Any

from shared import runs
from shared.backends import get_backend
from shared.backends.base import BackendError
from shared.runs import Run, RunStore
from shared.settings import Settings
from shared.webhooks import Outbox

log = logging.getLogger("tunedrop.pipeline")


class Steps:
    def __init__(self, settings: Settings, storage=None, backend=None, store: RunStore | None = None,
                 outbox: Outbox | None = None):
        from shared.storage import default_storage

        self.settings = settings
        self.storage = storage or default_storage()
        self._backend = backend
        self.store = store or RunStore.from_settings(settings, self.storage)
        self.outbox = outbox or Outbox(settings, self.storage)

    @property
    def backend(self):
        if self._backend is None:
            self._backend = get_backend(self.settings, self.storage)
        return self._backend

    def _move(self, run_id: str, target: str, event_type: str | None, data: dict[str, Any] | None = None,
              **changes: Any) -> Run | None:
        """Transition and, only if this call made the change, publish its webhook."""
        moved = self.store.transition(run_id, target, **changes)
        if moved is not None and event_type:
            self.outbox.publish(run_id, event_type, {"state": moved.state, **(data or {})},
                                sequence=len(moved.history), retry=moved.retries, cycle=moved.cycle)
        return moved

    def _fail(self, run: Run, error: str, code: str = "") -> Run | None:
        """Fail the run; a job it may still have running is cancelled first, so nothing is left spending."""
        if run.state in (runs.SUBMITTED, runs.RUNNING) and run.job_name:
            try:
                self.backend.cancel_job(run.job_name)
            except BackendError as exc:
                if exc.retryable:
                    raise  # fail it on the next try, when the cancel can be made
                log.warning("run %s: could not cancel job %s: %s", run.run_id, run.job_name, exc)
        log.warning("run %s failed in %s: %s", run.run_id, run.state, error)
        return self._move(run.run_id, runs.FAILED, "run.failed", {"error": error, "code": code, "failed_in": run.state},
                          error=error)
