"""Duplicate storms: Event Grid delivers at least once, and retries overlap. The same blob event
ten times at once, then the same job-completed event ten times at once, must leave exactly one
run, one job, one model version, one endpoint and one webhook per state change."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow

from shared import runs
from tests.handlers import handler, queued_run_events
from tests.reliability.conftest import completed_event, dataset, outbox, summary, upload, wait_for_job

#: Copies of each event delivered at once; `make soak` raises it.
STORM = int(os.environ.get("TUNEDROP_STORM", "10"))


def storm(call, args_list):
    with ThreadPoolExecutor(max_workers=STORM) as pool:
        return [f.result() for f in [pool.submit(call, *args) for args in args_list]]


def test_concurrent_copies_of_each_event_make_one_of_everything(app_env):
    settings, pipeline, store = app_env.settings, app_env.pipeline, app_env.pipeline.store
    blob = upload(settings, "storm.jsonl", dataset())
    storm(handler("ingest"), [(blob,)] * STORM)
    (run,) = store.list()
    assert run.state == runs.SUBMITTED
    assert [d.name for d in (settings.state_dir / "jobs").iterdir()] == [run.job_name]
    wait_for_job(pipeline, run.job_name)

    event = completed_event(run)
    storm(handler("job_events"), [(event,)] * STORM)
    queued = queued_run_events()
    assert len(queued) == STORM  # acknowledged at once, every copy queued for the worker
    storm(handler("job_event_worker"), [(message,) for message in queued])
    run = store.get(run.run_id)
    assert run.state == runs.DEPLOYING
    client = mlflow.MlflowClient(settings.effective_tracking_uri, settings.effective_tracking_uri)
    versions = client.search_model_versions(f"name = '{run.model_name}'")
    assert len(versions) == 1
    assert [d.name for d in (settings.state_dir / "endpoints").iterdir()] == [run.endpoint_name]

    # The sweeper, also delivered twice at once (a timer never overlaps itself, a sweep may meet a retry).
    deadline = time.monotonic() + 120
    while store.get(run.run_id).state != runs.DEPLOYED and time.monotonic() < deadline:
        storm(lambda: pipeline.sweep(), [()] * 2)
        time.sleep(0.2)
    assert store.get(run.run_id).state == runs.DEPLOYED

    messages = outbox(settings)
    types = sorted(m.payload["type"] for m in messages)
    assert types == sorted(["run.accepted", "run.submitted", "run.succeeded", "model.registered",
                            "endpoint.deploying", "endpoint.ready"])
    assert len({m.id for m in messages}) == len(messages)
    summary("storms", {"events_sent": 2 * STORM, "runs": len(store.list()), "jobs": 1,
                       "model_versions": len(versions), "endpoints": 1, "webhooks": len(messages),
                       "duplicates": len(messages) - len(set(types)), "lost": 0})
