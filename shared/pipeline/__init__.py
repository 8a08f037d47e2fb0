"""The workflow of the seed notebook, split across events instead of blocking on each step.

    ingest(blob)          validate -> quarantine, or submit the fine-tune          (blob trigger)
    on_run_event(event)   job running / succeeded -> register -> begin deploy     (Event Grid)
    sweep()               deployments ready -> traffic; idle -> delete; reconcile (timer)
    on_deployment_ready(event)   one deployment ready -> traffic, at once (a local model server's event)

Every step is idempotent: the run store refuses stale transitions, the backend finds what an
earlier attempt made, and a webhook goes out only from the call that made the state change.

One module a step: ``steps`` (what they share), ``ingest``, ``jobs`` (events, registration,
deployment, retry, cancel), ``sweep``, ``lifecycle`` (sleep and wake); :class:`Pipeline` is all of
them over one run store.
"""

from __future__ import annotations

import threading

from shared.pipeline.ingest import CLAIM_LEASE, PAIR_WAIT
from shared.pipeline.jobs import CancelError, RetryError
from shared.pipeline.lifecycle import Lifecycle, LifecycleError
from shared.pipeline.sweep import Sweeper, SweepResult
from shared.settings import Settings

__all__ = ["CLAIM_LEASE", "PAIR_WAIT", "CancelError", "LifecycleError", "Pipeline", "RetryError", "SweepResult",
           "get_pipeline"]


class Pipeline(Sweeper, Lifecycle):
    """Every step of a run's workflow, over one settings, storage, run store, outbox and backend."""


_lock = threading.Lock()
_pipelines: dict[tuple, Pipeline] = {}


def get_pipeline() -> Pipeline:
    """The pipeline for the current settings, created once per process (clients are reused)."""
    from shared.storage import default_storage

    settings = Settings.from_env()
    storage = default_storage()
    key = (settings, id(storage))
    with _lock:
        if key not in _pipelines:
            _pipelines[key] = Pipeline(settings, storage)
        return _pipelines[key]
