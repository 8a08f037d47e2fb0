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
from shared.backends.local import LocalBackend, _alive, _read_json, _started
from shared.events import RUN_ID_TAG, RunEvent, deployment_ready_event, run_event
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


def training(backend, run) -> subprocess.Popen:
    """The job as the trainer leaves it while it trains: the spec, its pid (a process of its own session, as
    the backend spawns it), status Running and no MLflow model yet."""
    job_dir = backend.jobs_dir / run.job_name
    job_dir.mkdir(parents=True)
    trainer = subprocess.Popen(["sleep", "120"], start_new_session=True)
    (job_dir / "job.json").write_text(json.dumps({"job_name": run.job_name, "run_id": run.run_id}))
    (job_dir / "pid.json").write_text(json.dumps({"pid": trainer.pid, "started": _started(trainer.pid)}))
    (job_dir / "status.json").write_text(json.dumps({"state": "Running", "pid": trainer.pid, "metrics": {}}))
    assert backend.get_job(run.job_name).status == "Running"
    return trainer


def stand_in_server(backend, run, endpoint: str, **state) -> subprocess.Popen:
    """An endpoint as the backend leaves it while its model server runs: a process of its own session
    (``sleep``, standing in for the server), its endpoint.json and, if given, its state.json."""
    ep_dir = backend.endpoints_dir / endpoint
    ep_dir.mkdir(parents=True)
    server = subprocess.Popen(["sleep", "120"], start_new_session=True)
    (ep_dir / "endpoint.json").write_text(json.dumps({"pid": server.pid, "started": _started(server.pid), "port": 9,
                                                      "run_id": run.run_id}))
    if state:
        (ep_dir / "state.json").write_text(json.dumps(state))
    return server


def job_event(settings, run, status: str) -> RunEvent:
    raw = run_event(status=status, topic=settings.workspace_id, job_name=run.job_name,
                    experiment_name="tunedrop", run_tags={RUN_ID_TAG: run.run_id})
    return RunEvent(raw["id"], raw["eventType"], raw["topic"], raw["subject"], raw["data"])


def webhook_types(settings) -> list[str]:
    queue = default_storage().queue(settings.webhook_queue)
    return [OutboxMessage.from_json(m.content).payload["type"] for m in queue.peek_messages(max_messages=32)]


def test_an_event_saying_the_job_ended_is_checked_against_the_job_first(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.SUBMITTED)
    trainer = training(backend, run)
    for status in ("Completed", "Failed", "Canceled"):  # each a lie: the trainer is still training
        pipeline.on_run_event(job_event(settings, run, status))
        now = pipeline.store.get(run.run_id)
        assert now.state == runs.RUNNING and not now.metrics and not now.error
    assert webhook_types(settings) == ["run.running"]  # no run.succeeded with empty metrics, no run.failed
    assert trainer.poll() is None  # and the job trains on


def test_a_run_that_fails_while_its_job_trains_stops_the_job(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.SUBMITTED)
    trainer = training(backend, run)
    pipeline.settings = dataclasses.replace(settings, job_timeout_minutes=0)
    assert pipeline.sweep().failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and "TUNEDROP_JOB_TIMEOUT_MINUTES" in failed.error
    assert failed_webhook(settings)["code"] == "job_timeout"
    # Ended by the backend's cancel (SIGTERM) within seconds, not by itself (it sleeps two minutes); its exit
    # status is not asserted: the backend's liveness check may reap it first, as it reaps its own children.
    trainer.wait(timeout=15)


def test_registration_of_a_job_that_did_not_complete_fails_as_job_not_completed(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.SUCCEEDED)  # e.g. a retry from `succeeded` while its model is not there
    training(backend, run)
    failed = pipeline.advance(run)
    assert failed.state == runs.FAILED and failed.failed_in == runs.SUCCEEDED and not failed.model_version
    assert failed.error == f"Job {run.job_name} has no completed model to register."
    assert failed_webhook(settings)["code"] == "job_not_completed"
    with pytest.raises(BackendError) as again:  # not a passing hiccup: asking again gives the same answer
        backend.register_model(failed)
    assert (again.value.code, again.value.retryable) == ("job_not_completed", False)


def test_a_deployed_endpoint_whose_server_died_fails_visibly_and_can_be_retried(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    endpoint = "td-chat-0123456789"
    ep_dir = backend.endpoints_dir / endpoint
    server = stand_in_server(backend, run, endpoint, state="ready")  # stands in for a serving model server
    (ep_dir / "server.log").write_text("serving\nKilled\n")
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=endpoint, model_name="m", model_version="1")
    pipeline.store.transition(run.run_id, runs.DEPLOYED, deployed_at=runs.utcnow().isoformat())
    assert pipeline.sweep().failed == []  # healthy: nothing to do
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    assert pipeline.sweep().failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and failed.failed_in == runs.DEPLOYED
    assert f"tunedrop retry {run.run_id}" in failed.error and ".. " not in failed.error
    assert failed_webhook(settings)["code"] == "ServerExited"
    kept = backend.kept_log(endpoint)
    assert str(kept) in failed.error and kept.read_text() == "serving\nKilled\n"  # the log the error names is there
    retried = pipeline.retry(run.run_id)
    assert retried.state == runs.DEPLOYING and retried.retries == 1


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
    assert failed.error == f"Model server exited; see {backend.kept_log(run.endpoint_name)}."
    assert failed_webhook(settings)["code"] == "ServerExited"
    assert backend.kept_log(run.endpoint_name).is_file()  # the endpoint is gone, its log is not


def test_a_deployment_never_ready_fails_as_deploy_timeout_and_its_endpoint_is_deleted(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    endpoint = "td-chat-0123456789"
    ep_dir = backend.endpoints_dir / endpoint
    server = stand_in_server(backend, run, endpoint)  # a model server that never gets ready
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=endpoint, model_name="m", model_version="1",
                              deploy_started_at=runs.utcnow().isoformat())
    assert pipeline.sweep().failed == []  # still starting, within the limit
    pipeline.settings = dataclasses.replace(settings, deploy_timeout_minutes=0)
    assert pipeline.sweep().failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and "TUNEDROP_DEPLOY_TIMEOUT_MINUTES" in failed.error
    assert failed_webhook(settings)["code"] == "deploy_timeout"
    server.wait(timeout=15)  # nothing is left running
    assert not ep_dir.exists()


def ready_event(endpoint: str, run_id: str) -> RunEvent:
    """A model server's DEPLOYMENT_READY event as job_events reads it."""
    return RunEvent.from_json(json.dumps(deployment_ready_event(endpoint_name=endpoint, run_id=run_id)))


def test_a_ready_event_finishes_its_deployment_once_and_only_when_the_backend_says_it_is_ready(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    endpoint = "td-chat-0123456789"
    stand_in_server(backend, run, endpoint)  # still loading: no state file yet
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=endpoint, model_name="m", model_version="1",
                              deploy_started_at=runs.utcnow().isoformat())
    event = ready_event(endpoint, run.run_id)
    assert event.is_deployment_ready and not event.is_run_event
    assert pipeline.on_deployment_ready(event) is None  # the event's word alone moves nothing
    assert pipeline.on_deployment_ready(ready_event("td-chat-earlier0000", run.run_id)) is None  # another endpoint
    assert pipeline.on_deployment_ready(ready_event(endpoint, "no-such-run-0123")) is None
    assert pipeline.store.get(run.run_id).state == runs.DEPLOYING

    (backend.endpoints_dir / endpoint / "state.json").write_text(json.dumps({"state": "ready"}))  # it serves
    deployed = pipeline.on_deployment_ready(event)
    assert deployed.state == runs.DEPLOYED and deployed.deployed_at
    assert pipeline.on_deployment_ready(event) is None  # a duplicate delivery
    assert pipeline.on_deployment_ready(ready_event(endpoint, run.run_id)) is None  # a second event, late
    assert pipeline.sweep().ready == []  # nothing left for the sweeper
    assert pipeline.store.get(run.run_id).history == deployed.history
    assert webhook_types(settings) == ["endpoint.ready"]  # exactly once


def test_a_ready_event_for_a_failed_deployment_leaves_it_to_the_sweeper(local):
    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    endpoint = "td-chat-0123456789"
    stand_in_server(backend, run, endpoint, state="failed", error="OSError: no model")
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=endpoint, model_name="m", model_version="1",
                              deploy_started_at=runs.utcnow().isoformat())
    assert pipeline.on_deployment_ready(ready_event(endpoint, run.run_id)) is None
    assert pipeline.store.get(run.run_id).state == runs.DEPLOYING
    assert pipeline.sweep().failed == [run.run_id]  # the sweep's rule: a failed deployment fails the run
    assert webhook_types(settings) == ["run.failed"]  # and no endpoint.ready ever


def test_cancel_during_training_stops_the_trainer_and_a_canceled_run_can_be_retried(local):
    from shared.pipeline import CancelError

    pipeline, backend, settings = local
    run = make_run(pipeline, runs.SUBMITTED)
    trainer = training(backend, run)
    canceled = pipeline.cancel(run.run_id)
    assert canceled.state == runs.CANCELED and canceled.failed_in == runs.SUBMITTED
    trainer.wait(timeout=15)  # SIGTERM: the trainer records Canceled and ends; nothing is left training
    assert not canceled.model_version
    assert webhook_types(settings) == ["run.canceled"]
    pipeline.on_run_event(job_event(settings, run, "Canceled"))  # the job's own late event changes nothing
    assert pipeline.store.get(run.run_id).state == runs.CANCELED
    with pytest.raises(CancelError, match="is canceled"):
        pipeline.cancel(run.run_id)
    retried = pipeline.retry(run.run_id)
    assert retried.state == runs.SUBMITTED and retried.job_name == job_name_for(run.run_id, 1)


def test_cancel_during_deployment_deletes_the_endpoint_and_a_finished_run_answers_with_its_state(local):
    from shared.pipeline import CancelError

    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    endpoint = "td-chat-0123456789"
    ep_dir = backend.endpoints_dir / endpoint
    server = stand_in_server(backend, run, endpoint)  # a model server still loading
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=endpoint, model_name="m", model_version="1")
    canceled = pipeline.cancel(run.run_id)
    assert canceled.state == runs.CANCELED and canceled.failed_in == runs.DEPLOYING
    server.wait(timeout=15)
    assert not ep_dir.exists()
    failed = pipeline.store.transition(pipeline.store.create(Run("done-0123456789ab"))[0].run_id, runs.FAILED)
    with pytest.raises(CancelError, match="is failed: there is nothing running to stop"):
        pipeline.cancel(failed.run_id)


def test_a_model_no_better_than_its_base_is_gated_and_force_deploys_it_on_record(local):
    from shared.pipeline import LifecycleError

    pipeline, backend, settings = local
    run = make_run(pipeline, runs.REGISTERED)
    run = pipeline.store.update(run.run_id, model_name="tunedrop-chat", model_version="1",
                                metrics={"eval_loss_initial": 2.0, "eval_loss": 2.1})  # worse than the base model
    held = pipeline.advance(run)
    assert held.state == runs.REGISTERED and not held.endpoint_name and not list(backend.endpoints_dir.glob("*"))
    assert held.gate == {"measured": True, "passed": False, "base_eval_loss": 2.0, "fine_tuned_eval_loss": 2.1,
                         "margin": 0.0}
    queue = default_storage().queue(settings.webhook_queue)
    (gated,) = [p for p in (OutboxMessage.from_json(m.content).payload for m in queue.peek_messages(max_messages=32))
                if p["type"] == "run.gated"]
    assert (gated["data"]["base_eval_loss"], gated["data"]["fine_tuned_eval_loss"]) == (2.0, 2.1)
    assert pipeline.sweep().advanced == [] or pipeline.store.get(run.run_id).state == runs.REGISTERED
    with pytest.raises(LifecycleError, match="--force"):
        pipeline.deploy(run.run_id)
    forced = pipeline.deploy(run.run_id, force=True, by="key sha256:0123456789ab")
    assert forced.state == runs.DEPLOYING and forced.gate["forced_by"] == "key sha256:0123456789ab"


def test_a_model_better_than_its_base_by_the_margin_passes_the_gate(local):
    pipeline, backend, settings = local
    pipeline.settings = dataclasses.replace(settings, gate_margin=0.5)
    run = make_run(pipeline, runs.REGISTERED)
    run = pipeline.store.update(run.run_id, model_name="tunedrop-chat", model_version="1",
                                metrics={"eval_loss_initial": 2.85, "eval_loss": 1.62})
    deployed = pipeline.advance(run)
    assert deployed.state == runs.DEPLOYING and deployed.gate["passed"] is True


def test_a_pid_recorded_for_a_process_that_ended_is_never_signalled_when_another_process_gets_it(tmp_path):
    """pids are reused (pid_max is 32768 here): a record's start time tells its process from a later one."""
    import os

    from shared.backends.local import _terminate

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        recorded_elsewhere = str(int(_started(bystander.pid)) - 1)  # the same pid, an earlier process's start
        assert _alive(bystander.pid) and _alive(bystander.pid, _started(bystander.pid))
        assert not _alive(bystander.pid, recorded_elsewhere)
        _terminate(bystander.pid, grace_s=1, started=recorded_elsewhere)
        assert bystander.poll() is None  # still running: not the recorded process, so never signalled
        assert not _alive(os.getpid() + 10**6)
    finally:
        bystander.kill()
        bystander.wait()
