"""The local backend's own failure codes, produced by its real classes through the pipeline: a job
asked to register that did not complete (`job_not_completed`), a model server that could not load
its model (`ServerFailed`) and one that died (`ServerExited`). State lives in the test's state dir;
the model servers are real subprocesses of shared/backends/local/server.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest

from shared import runs
from shared.backends.base import BackendError, job_name_for
from shared.backends.local import LocalBackend, _alive, _read_json
from shared.events import RUN_ID_TAG, RunEvent, run_event
from shared.pipeline import Pipeline
from shared.runs import Run
from shared.settings import Settings
from shared.storage import default_storage
from shared.webhooks import OutboxMessage, new_secret


@pytest.fixture
def local(storage_env):
    """(pipeline, backend, settings): the local backend in this test's state dir, with a webhook receiver."""
    settings = dataclasses.replace(Settings.from_env(), webhook_urls=("https://hooks.example.com/tunedrop",),
                                   webhook_secret=new_secret())
    backend = LocalBackend(settings)
    yield Pipeline(settings, backend=backend), backend, settings
    backend.stop_all()


def make_run(pipeline, state: str, **fields) -> Run:
    run_id = "chat-0123456789ab"
    run, _ = pipeline.store.create(Run(run_id, dataset_container="training-data", dataset_blob="chat.jsonl",
                                       dataset_etag='"0x1"', base_model="tiny-random", job_name=job_name_for(run_id),
                                       **fields))
    path = [runs.VALIDATING, runs.SUBMITTED, runs.SUCCEEDED, runs.REGISTERED]
    for step in path[:path.index(state) + 1]:
        run = pipeline.store.transition(run.run_id, step)
    return run


def failed_webhook(settings) -> dict:
    queue = default_storage().queue(settings.webhook_queue)
    payloads = [OutboxMessage.from_json(m.content).payload for m in queue.peek_messages(max_messages=32)]
    (failed,) = [p["data"] for p in payloads if p["type"] == "run.failed"]
    return failed


def test_a_completed_event_for_a_job_still_running_fails_registration_as_job_not_completed(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.SUBMITTED)
    job_dir = backend.jobs_dir / run.job_name
    job_dir.mkdir(parents=True)
    # As the trainer leaves its job while it trains: the spec, its pid (a process of its own session, as
    # the backend spawns it; stop_all ends it), status Running and no MLflow model yet.
    trainer = subprocess.Popen(["sleep", "120"], start_new_session=True)
    (job_dir / "job.json").write_text(json.dumps({"job_name": run.job_name, "run_id": run.run_id}))
    (job_dir / "pid.json").write_text(json.dumps({"pid": trainer.pid}))
    (job_dir / "status.json").write_text(json.dumps({"state": "Running", "pid": trainer.pid, "metrics": {}}))
    assert backend.get_job(run.job_name).status == "Running"
    raw = run_event(status="Completed", topic=settings.workspace_id, job_name=run.job_name,
                    experiment_name="tunedrop", run_tags={RUN_ID_TAG: run.run_id})
    failed = pipeline.on_run_event(RunEvent(raw["id"], raw["eventType"], raw["topic"], raw["subject"], raw["data"]))
    assert failed.state == runs.FAILED and failed.failed_in == runs.SUCCEEDED and not failed.model_version
    assert failed.error == f"Job {run.job_name} has no completed model to register."
    assert failed_webhook(settings)["code"] == "job_not_completed"
    with pytest.raises(BackendError) as again:  # not a passing hiccup: asking again gives the same answer
        backend.register_model(failed)
    assert (again.value.code, again.value.retryable) == ("job_not_completed", False)


def deploying(pipeline, model_name: str) -> Run:
    """A registered run driven by the pipeline into deploying: the backend starts a real model server."""
    run = make_run(pipeline, runs.REGISTERED)
    run = pipeline.store.update(run.run_id, model_name=model_name, model_version="1")
    started = pipeline.advance(run)
    assert started.state == runs.DEPLOYING and started.endpoint_name
    return started


def test_a_model_server_that_cannot_load_its_model_fails_the_run_as_server_failed(local):
    pipeline, backend, settings = local
    run = deploying(pipeline, "no-such-model")
    ep_dir = backend.endpoints_dir / run.endpoint_name
    deadline = time.monotonic() + 180
    while not (ep_dir / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    state = _read_json(ep_dir / "state.json")  # what the server left: failed, with its one-line error
    assert state["state"] == "failed", (ep_dir / "server.log").read_text(errors="replace")
    assert pipeline.sweep().failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and failed.failed_in == runs.DEPLOYING
    assert failed.error == state["error"] and "no-such-model" in failed.error
    assert failed_webhook(settings)["code"] == "ServerFailed"
    assert not ep_dir.exists()  # the failed endpoint is torn down


def test_a_model_server_that_dies_fails_the_run_as_server_exited(local):
    pipeline, backend, settings = local
    run = deploying(pipeline, "tunedrop-chat")
    ep_dir = backend.endpoints_dir / run.endpoint_name
    pid = _read_json(ep_dir / "endpoint.json")["pid"]
    os.killpg(pid, signal.SIGKILL)  # as the OOM killer would, before the model is loaded
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pipeline.sweep().failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and failed.failed_in == runs.DEPLOYING
    assert failed.error == f"Model server exited; see {ep_dir / 'server.log'}."
    assert failed_webhook(settings)["code"] == "ServerExited"
