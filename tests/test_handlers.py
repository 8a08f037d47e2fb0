"""Each function called as the host calls it: real func.* objects, real Azurite, the local backend."""

import gzip
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import azure.functions as func
import pytest
from azure.functions.timer import TimerRequest

from shared import runs
from shared.backends.base import job_name_for
from shared.events import RUN_ID_TAG, deployment_ready_event, run_event
from shared.pipeline import get_pipeline
from shared.runs import Run
from shared.settings import Settings
from shared.storage import default_storage
from shared.webhooks import OutboxMessage, new_secret, webhook_id
from tests.handlers import deliver_run_event, handler, http_request, queued_run_events
from tests.receiver import Receiver

WORKSPACE = Settings().workspace_id
EVENTS = Path(__file__).parent / "data" / "eventgrid"


@pytest.fixture
def app_env(storage_env, monkeypatch, tmp_path):
    secret = new_secret()
    with Receiver(secret) as receiver:
        monkeypatch.setenv("TUNEDROP_WEBHOOK_URLS", receiver.url)
        monkeypatch.setenv("TUNEDROP_WEBHOOK_SECRET", secret)
        monkeypatch.setenv("TUNEDROP_BASE_MODEL", "tiny-random")
        monkeypatch.setenv("TUNEDROP_EVENTS_URL", "")
        monkeypatch.setenv("TUNEDROP_WEBHOOK_ALLOW_PRIVATE", "true")
        yield {"receiver": receiver, "secret": secret, **storage_env}


def queued_webhooks(settings):
    queue = default_storage().queue(settings.webhook_queue)
    return [OutboxMessage.from_json(m.content).payload for m in queue.peek_messages(max_messages=32)]


def upload(settings, name, data: bytes, metadata=None):
    container = default_storage().ensure_container(settings.training_container)
    container.upload_blob(name, data, overwrite=True, metadata=metadata)
    return container.get_blob_client(name)


def bad_dataset() -> bytes:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good)] * 3 + [json.dumps({"messages": [{"role": "bot", "content": "x"}]})]
    return ("\n".join(lines) + "\n").encode()


def good_dataset(n=12) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_ingest_rejects_quarantines_with_report_and_queues_run_rejected(app_env):
    settings = Settings.from_env()
    blob = upload(settings, "bad.jsonl", bad_dataset())
    handler("ingest")(blob)

    run = get_pipeline().store.list()[0]
    assert run.state == runs.REJECTED
    assert any(e["line"] == 4 and e["code"] for e in run.report["errors"])
    quarantine = default_storage().blob_service.get_container_client(settings.quarantine_container)
    names = sorted(b.name for b in quarantine.list_blobs())
    assert names == [f"{run.run_id}/bad.jsonl", f"{run.run_id}/bad.jsonl.report.json"]
    assert quarantine.download_blob(f"{run.run_id}/bad.jsonl").readall() == bad_dataset()
    report = json.loads(quarantine.download_blob(f"{run.run_id}/bad.jsonl.report.json").readall())
    assert report["accepted"] is False and any(e["line"] == 4 for e in report["errors"])
    assert not blob.exists()  # moved, not copied: the drop zone holds only what is pending
    (webhook,) = queued_webhooks(settings)
    assert webhook["type"] == "run.rejected" and any(e["line"] == 4 for e in webhook["data"]["report"]["errors"])
    assert "line 4" in webhook["data"]["summary"]


def test_ingest_rejects_an_unknown_override_in_blob_metadata(app_env):
    settings = Settings.from_env()
    upload(settings, "good.jsonl", good_dataset(), metadata={"tunedrop_num_epochs": "2"})
    handler("ingest")(default_storage().blob_service.get_blob_client(settings.training_container, "good.jsonl"))
    run = get_pipeline().store.list()[0]
    assert run.state == runs.REJECTED
    assert "num_epochs" in run.report["errors"][0]["message"]


def test_a_sidecar_is_no_run_and_a_bad_one_rejects_its_dataset(app_env):
    settings = Settings.from_env()
    sidecar = upload(settings, "good.jsonl.tunedrop.json", b'{"num_train_epochs": 1, "lora_rank": 8}')
    assert handler("ingest")(sidecar) is None and get_pipeline().store.list() == []
    handler("ingest")(upload(settings, "good.jsonl", good_dataset()))
    (run,) = get_pipeline().store.list()
    assert run.state == runs.REJECTED
    error = run.report["errors"][0]
    assert (error["code"], error["field"]) == ("bad_override", "sidecar") and "lora_rank" in error["message"]
    assert error["message"].startswith("good.jsonl.tunedrop.json")


def test_sidecar_overrides_apply_and_blob_metadata_wins(app_env):
    settings = Settings.from_env()
    upload(settings, "side.jsonl.gz.tunedrop.json", b'{"num_train_epochs": 1, "max_steps": 1, "lora_r": 4}')
    import gzip

    blob = upload(settings, "side.jsonl.gz", gzip.compress(good_dataset()), metadata={"tunedrop_lora_r": "8"})
    handler("ingest")(blob)
    (run,) = get_pipeline().store.list()
    try:
        assert run.state == runs.SUBMITTED, run.error
        assert (run.config["num_train_epochs"], run.config["max_steps"], run.config["lora_r"]) == (1, 1, 8)
        assert run.report["stats"]["format"] == "jsonl.gz"
        assert run.report["stats"]["tokens"]["examples"] == 12
        assert run.report["stats"]["training"]["epochs"] <= 1
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()


def test_ingest_twice_makes_one_run_and_one_job(app_env):
    settings = Settings.from_env()
    blob = upload(settings, "good.jsonl", good_dataset(), metadata={"tunedrop_max_steps": "1"})
    ingest = handler("ingest")
    ingest(blob)
    ingest(blob)
    pipeline = get_pipeline()
    (run,) = pipeline.store.list()
    try:
        assert run.state == runs.SUBMITTED
        assert run.config["max_steps"] == 1
        assert [p["type"] for p in queued_webhooks(settings)] == ["run.accepted", "run.submitted"]
        jobs = list((settings.state_dir / "jobs").iterdir())
        assert [j.name for j in jobs] == [run.job_name]
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()


def make_run(state: str, **fields) -> Run:
    store = get_pipeline().store
    run_id = f"data-{state.replace('_', '-')}-0123456789ab"
    run, _ = store.create(Run(run_id, dataset_container="training-data", dataset_blob="d.jsonl",
                              dataset_etag='"0x1"', job_name=job_name_for(run_id), **fields))
    path = {
        runs.SUBMITTED: [runs.VALIDATING, runs.SUBMITTED],
        runs.DEPLOYING: [runs.VALIDATING, runs.SUBMITTED, runs.SUCCEEDED, runs.REGISTERED, runs.DEPLOYING],
        runs.TORN_DOWN: [runs.VALIDATING, runs.SUBMITTED, runs.SUCCEEDED, runs.REGISTERED, runs.DEPLOYING,
                         runs.TORN_DOWN],
    }[state]
    for step in path:
        run = store.transition(run.run_id, step)
    return run


def grid_event(status: str, job_name: str, topic: str = WORKSPACE, run_tags: dict | None = None) -> func.EventGridEvent:
    """Microsoft's published sample event (tests/data/eventgrid/) as Event Grid hands it to the function,
    about ``job_name`` in this workspace: `runTags` as published ({}) unless given, `runStatus` as asked."""
    sample = "run-completed" if status == "Completed" else "run-status-changed"
    (raw,) = json.loads((EVENTS / f"{sample}.eventgrid.json").read_text())
    data = {**raw["data"], "runId": job_name, "runTags": run_tags or {}}
    if "runStatus" in data:
        data["runStatus"] = status
    return func.EventGridEvent(id=raw["id"], data=data, topic=topic,
                               subject=raw["subject"].replace(raw["data"]["runId"], job_name),
                               event_type=raw["eventType"], event_time=datetime.now(timezone.utc),
                               data_version=raw["dataVersion"])


def test_job_events_moves_the_run_and_ignores_other_jobs_steps_and_workspaces(app_env):
    run = make_run(runs.SUBMITTED)
    job_events = deliver_run_event
    job_events(grid_event("Running", "some-child-step", run_tags={RUN_ID_TAG: run.run_id}))  # a step's own event
    job_events(grid_event("Running", run.job_name, topic=WORKSPACE.replace("local", "other")))
    job_events(grid_event("Running", f"{run.job_name}-r3"))  # a job whose name merely looks like the run's
    assert get_pipeline().store.get(run.run_id).state == runs.SUBMITTED
    job_events(grid_event("Running", run.job_name))
    job_events(grid_event("Running", run.job_name))  # duplicate delivery
    assert get_pipeline().store.get(run.run_id).state == runs.RUNNING
    assert [p["type"] for p in queued_webhooks(Settings.from_env())] == ["run.running"]


def test_job_events_only_queues_the_event_and_job_event_worker_acts_on_it(app_env):
    """Event Grid gives up on answers slower than 30 s: job_events hands the event on, nothing more."""
    run = make_run(runs.SUBMITTED)
    handler("job_events")(grid_event("failed", run.job_name))
    assert get_pipeline().store.get(run.run_id).state == runs.SUBMITTED  # acknowledged, not yet acted on
    (message,) = queued_run_events()
    handler("job_event_worker")(message)
    assert get_pipeline().store.get(run.run_id).state == runs.FAILED
    handler("job_event_worker")(message)  # the host delivers a message at least once: a repeat changes nothing
    assert [p["type"] for p in queued_webhooks(Settings.from_env())] == ["run.failed"]
    other = func.EventGridEvent(id="2", data={}, topic=WORKSPACE, subject="x", event_type="Microsoft.Storage.BlobCreated",
                                event_time=None, data_version="1")
    handler("job_events")(other)
    foreign = grid_event("Failed", run.job_name, topic=WORKSPACE.replace("local", "other"))
    handler("job_events")(foreign)
    assert queued_run_events() == []  # not a run event of this workspace: nothing to queue


def test_job_events_finishes_a_ready_deployment_at_once_from_its_model_servers_event(app_env):
    """A local model server's ready event is acted on in job_events itself (no queue, no sweep), and checked."""
    import subprocess

    from shared.backends.local import _started

    endpoint = "td-data-0123456789"
    run = make_run(runs.DEPLOYING, endpoint_name=endpoint, deploy_started_at=runs.utcnow().isoformat())
    ep_dir = Settings.from_env().state_dir / "endpoints" / endpoint  # as the backend leaves a server it started
    ep_dir.mkdir(parents=True)
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for the model server
    try:
        (ep_dir / "endpoint.json").write_text(json.dumps({"pid": server.pid, "started": _started(server.pid),
                                                          "port": 9, "run_id": run.run_id}))
        raw = deployment_ready_event(endpoint_name=endpoint, run_id=run.run_id)
        event = func.EventGridEvent(id=raw["id"], data=raw["data"], topic=raw["topic"], subject=raw["subject"],
                                    event_type=raw["eventType"], event_time=None, data_version=raw["dataVersion"])
        handler("job_events")(event)  # the server says ready, its state file does not: nothing moves
        assert get_pipeline().store.get(run.run_id).state == runs.DEPLOYING
        (ep_dir / "state.json").write_text(json.dumps({"state": "ready", "pid": server.pid}))
        handler("job_events")(event)
        assert get_pipeline().store.get(run.run_id).state == runs.DEPLOYED
        handler("job_events")(event)  # Event Grid delivers at least once: a repeat changes nothing
        default_storage().ensure_queue(Settings.from_env().job_events_queue)
        assert queued_run_events() == []  # acted on, never queued
        assert [p["type"] for p in queued_webhooks(Settings.from_env())] == ["endpoint.ready"]
    finally:
        server.kill()
        server.wait()


def test_job_events_failed_job_fails_the_run_with_the_reason(app_env):
    run = make_run(runs.SUBMITTED)
    job_dir = Settings.from_env().state_dir / "jobs" / run.job_name  # as the trainer leaves a job that failed
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({"job_name": run.job_name, "run_id": run.run_id}))
    (job_dir / "status.json").write_text(json.dumps({"state": "Failed", "error": "CUDA out of memory"}))
    deliver_run_event(grid_event("failed", run.job_name))
    failed = get_pipeline().store.get(run.run_id)
    assert failed.state == runs.FAILED and failed.failed_in == runs.SUBMITTED and failed.error == "CUDA out of memory"
    (webhook,) = queued_webhooks(Settings.from_env())
    assert webhook["type"] == "run.failed" and webhook["data"]["code"] == "job_failed"


def test_a_failed_event_for_a_job_that_does_not_exist_fails_the_run_as_job_notfound(app_env):
    run = make_run(runs.SUBMITTED)  # its job was never started on this backend
    deliver_run_event(grid_event("failed", run.job_name))
    failed = get_pipeline().store.get(run.run_id)
    assert failed.state == runs.FAILED and "No such job" in failed.error
    (webhook,) = queued_webhooks(Settings.from_env())
    assert webhook["data"]["code"] == "job_notfound"


def test_job_events_tolerates_pascal_case_keys_and_non_run_events(app_env):
    run = make_run(runs.SUBMITTED)
    raw = run_event(status="Running", topic=WORKSPACE, job_name=run.job_name, experiment_name="x",
                    run_tags={RUN_ID_TAG: run.run_id})
    data = {key[0].upper() + key[1:]: value for key, value in raw["data"].items()}
    data["RunType"] = None
    event = func.EventGridEvent(id="1", data=data, topic=WORKSPACE, subject=raw["subject"], event_type=raw["eventType"],
                                event_time=None, data_version="2")
    deliver_run_event(event)
    assert get_pipeline().store.get(run.run_id).state == runs.RUNNING
    other = func.EventGridEvent(id="2", data={}, topic=WORKSPACE, subject="x",
                                event_type="Microsoft.Storage.BlobCreated", event_time=None, data_version="1")
    deliver_run_event(other)  # acknowledged, not raised


def http(method: str, url: str, route_params: dict, body: bytes = b""):
    return http_request(method, url, route_params, body, {"content-type": "application/json"})


def test_score_answers_clearly_when_it_cannot_score(app_env):
    score = handler("score")
    seed_body = json.dumps({"input_data": {"input_string": [{"role": "user", "content": "hi"}],
                                           "parameters": {"max_new_tokens": 5}}}).encode()
    missing = score(http("POST", "/api/runs/nope/score", {"run_id": "nope"}, seed_body))
    assert missing.status_code == 404
    deploying = make_run(runs.DEPLOYING)
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, seed_body))
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    asleep = make_run(runs.TORN_DOWN, endpoint_name="td-data-0000000000")
    try:
        answer = score(http("POST", "/x", {"run_id": asleep.run_id}, seed_body))  # wakes it
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(Settings.from_env()).stop_all()
    body = json.loads(answer.get_body())
    assert answer.status_code == 503 and answer.headers["Retry-After"] and body["state"] == "waking"
    woken = get_pipeline().store.get(asleep.run_id)
    assert (woken.state, woken.cycle) == (runs.DEPLOYING, 1) and woken.endpoint_name != asleep.endpoint_name
    assert [p["type"] for p in queued_webhooks(Settings.from_env())] == ["endpoint.waking"]
    failed = make_run(runs.SUBMITTED)
    get_pipeline().store.transition(failed.run_id, runs.FAILED)
    answer = score(http("POST", "/x", {"run_id": failed.run_id}, seed_body))
    assert answer.status_code == 409 and json.loads(answer.get_body())["state"] == "failed"
    bad = json.dumps({"input_data": {"input_string": [{"role": "bot", "content": "hi"}]}}).encode()
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, bad))
    assert answer.status_code == 400
    assert "input_data.input_string[0].role" in json.loads(answer.get_body())["error"]
    # The seed notebook's request (input_string holding one conversation) is checked the same way.
    seed_shape = json.dumps({"input_data": {"input_string": [[{"role": "user", "content": "hi"}]]}}).encode()
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, seed_shape))
    assert answer.status_code == 503  # accepted as a request; the endpoint is what is not ready
    two = json.dumps({"input_data": {"input_string": [[{"role": "user", "content": "a"}]] * 2}}).encode()
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, two))
    assert answer.status_code == 400 and "holds 2 conversations" in json.loads(answer.get_body())["error"]
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, b"{not json"))
    assert answer.status_code == 400 and "not valid JSON" in json.loads(answer.get_body())["error"]
    answer = score(http("POST", "/x", {"run_id": deploying.run_id}, b" " * (1_048_577)))
    assert answer.status_code == 413


def test_status_routes_show_runs_without_etags(app_env):
    run = make_run(runs.SUBMITTED)
    answer = handler("run_status")(http("GET", f"/api/runs/{run.run_id}", {"run_id": run.run_id}))
    body = json.loads(answer.get_body())
    assert answer.status_code == 200 and body["state"] == "submitted" and "etag" not in body
    assert [h["state"] for h in body["history"]] == ["received", "validating", "submitted"]
    assert handler("run_status")(http("GET", "/api/runs/x", {"run_id": "x"})).status_code == 404
    listing = json.loads(handler("list_runs")(http("GET", "/api/runs", {})).get_body())
    assert [r["run_id"] for r in listing["runs"]] == [run.run_id]


def test_notify_delivers_a_signed_webhook(app_env):
    receiver = app_env["receiver"]
    message = OutboxMessage(webhook_id("r1", "run.accepted"), receiver.url,
                            {"type": "run.accepted", "timestamp": "t", "data": {"run_id": "r1"}})
    handler("notify")(func.QueueMessage(id="1", body=message.to_json()))
    assert receiver.received == [{"id": message.id, "type": "run.accepted", "timestamp": "t", "data": {"run_id": "r1"}}]


def test_one_runs_webhooks_reach_a_receiver_in_order_whatever_order_the_queue_hands_them_out(app_env, monkeypatch):
    from shared.webhooks import Outbox

    receiver = app_env["receiver"]
    settings = Settings.from_env()
    outbox = Outbox(settings)
    for sequence, kind in ((2, "run.accepted"), (3, "run.submitted"), (4, "run.running")):
        outbox.publish("r1", kind, {"state": kind}, sequence=sequence)
    queue = default_storage().queue(settings.webhook_queue)
    queued = {m.payload["type"]: m for m in (OutboxMessage.from_json(q.content) for q in queue.receive_messages(
        max_messages=10, visibility_timeout=300))}
    notify = handler("notify")
    notify(func.QueueMessage(id="3", body=queued["run.running"].to_json()))  # the queue hands out the last first
    assert receiver.received == []  # held: accepted and submitted are still on their way
    notify(func.QueueMessage(id="1", body=queued["run.accepted"].to_json()))
    notify(func.QueueMessage(id="3", body=queued["run.running"].to_json()))  # submitted is still on its way
    notify(func.QueueMessage(id="2", body=queued["run.submitted"].to_json()))
    notify(func.QueueMessage(id="3", body=queued["run.running"].to_json()))
    assert [(w["type"], w["data"]["sequence"]) for w in receiver.received] == [
        ("run.accepted", 2), ("run.submitted", 3), ("run.running", 4)]
    # A webhook waits for an earlier one only so long: past TUNEDROP_WEBHOOK_ORDER_WAIT_S it goes anyway.
    monkeypatch.setenv("TUNEDROP_WEBHOOK_ORDER_WAIT_S", "0")
    outbox.publish("r2", "run.accepted", {}, sequence=2)
    outbox.publish("r2", "run.submitted", {}, sequence=3)
    late = [OutboxMessage.from_json(q.content) for q in queue.receive_messages(max_messages=10, visibility_timeout=300)]
    notify(func.QueueMessage(id="5", body=next(m for m in late if m.payload["type"] == "run.submitted").to_json()))
    assert receiver.received[-1]["type"] == "run.submitted" and receiver.received[-1]["data"]["run_id"] == "r2"


def poison(settings):
    from azure.core.exceptions import ResourceNotFoundError

    queue = default_storage().queue(f"{settings.webhook_queue}-poison")
    try:
        return [OutboxMessage.from_json(m.content) for m in queue.peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []


def test_notify_redelivers_a_failed_webhook_later_with_backoff(app_env, monkeypatch):
    import time

    monkeypatch.setenv("TUNEDROP_WEBHOOK_BACKOFF_S", "2")
    settings = Settings.from_env()
    message = OutboxMessage("msg_1", "http://127.0.0.1:9/down", {"type": "run.accepted", "data": {}})
    handler("notify")(func.QueueMessage(id="1", body=message.to_json()))
    queue = default_storage().queue(settings.webhook_queue)
    assert queue.peek_messages() == []  # hidden for the back-off
    deadline = time.monotonic() + 10
    while not (visible := queue.peek_messages()) and time.monotonic() < deadline:
        time.sleep(0.2)
    retry = OutboxMessage.from_json(visible[0].content)
    assert (retry.id, retry.attempt) == ("msg_1", 2) and "ConnectError" in retry.last_error
    assert poison(settings) == []


def test_notify_parks_the_webhook_after_the_last_attempt(app_env, monkeypatch):
    monkeypatch.setenv("TUNEDROP_WEBHOOK_ATTEMPTS", "3")
    settings = Settings.from_env()
    message = OutboxMessage("msg_1", "http://127.0.0.1:9/down", {"type": "run.accepted", "data": {}}, attempt=3)
    handler("notify")(func.QueueMessage(id="1", body=message.to_json()))
    (parked,) = poison(settings)
    assert parked.id == "msg_1" and parked.attempt == 3 and "ConnectError" in parked.last_error


def test_notify_refuses_private_receivers_in_azure_and_parks_them(app_env, monkeypatch):
    monkeypatch.setenv("TUNEDROP_WEBHOOK_ALLOW_PRIVATE", "false")
    settings = Settings.from_env()
    message = OutboxMessage("msg_2", "http://169.254.169.254/metadata", {"type": "run.accepted", "data": {}})
    handler("notify")(func.QueueMessage(id="2", body=message.to_json()))
    (parked,) = poison(settings)
    assert parked.id == "msg_2" and "non-public" in parked.last_error


def test_sweeper_fails_runs_whose_job_or_endpoint_vanished(app_env):
    submitted = make_run(runs.SUBMITTED)  # its job was never started on this backend
    deploying = make_run(runs.DEPLOYING, endpoint_name="td-gone-0000000000", deploy_started_at="2024-05-01T10:00:00+00:00")
    handler("sweeper")(TimerRequest(past_due=False))
    store = get_pipeline().store
    assert store.get(submitted.run_id).state == runs.FAILED
    gone = store.get(deploying.run_id)
    assert gone.state == runs.FAILED and gone.failed_in == runs.DEPLOYING
    assert sorted(p["type"] for p in queued_webhooks(Settings.from_env())) == ["run.failed", "run.failed"]
    handler("sweeper")(TimerRequest(past_due=True))  # a second sweep changes nothing more
    assert len(queued_webhooks(Settings.from_env())) == 2


def test_function_app_import_stays_light():
    import subprocess

    code = ("import sys, function_app; heavy = [m for m in ('torch', 'transformers', 'peft', 'mlflow', 'azure.ai.ml') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_retry_resubmits_a_failed_job_under_a_new_name_and_refuses_what_it_cannot_redo(app_env):
    run = make_run(runs.SUBMITTED)
    deliver_run_event(grid_event("failed", run.job_name))
    retry = handler("retry_run")
    pipeline = get_pipeline()
    try:
        answer = retry(http("POST", "/x", {"run_id": run.run_id}))
        body = json.loads(answer.get_body())
        assert answer.status_code == 202 and body["state"] == "submitted" and body["retries"] == 1
        assert body["job_name"] == f"tunedrop-{run.run_id}-r1"
        assert (Settings.from_env().state_dir / "jobs" / body["job_name"] / "job.json").exists()
        # A late event of the first, failed job no longer moves the run.
        deliver_run_event(grid_event("failed", run.job_name))
        assert pipeline.store.get(run.run_id).state == runs.SUBMITTED
        again = retry(http("POST", "/x", {"run_id": run.run_id}))
        assert again.status_code == 409 and "only a failed or canceled run" in json.loads(again.get_body())["error"]
        types = [p["type"] for p in queued_webhooks(Settings.from_env())]
        assert types == ["run.failed", "run.submitted"]
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(Settings.from_env()).stop_all()
    assert retry(http("POST", "/x", {"run_id": "nope"})).status_code == 404


def test_cancel_stops_a_run_wherever_it_is_and_retry_carries_a_canceled_one_on(app_env):
    settings = Settings.from_env()
    pipeline = get_pipeline()
    blob = upload(settings, "c.jsonl", good_dataset())
    etag = blob.get_blob_properties().etag
    run, _ = pipeline.store.create(Run(runs.run_id_for(settings.training_container, "c.jsonl", etag),
                                       dataset_container=settings.training_container, dataset_blob="c.jsonl",
                                       dataset_etag=etag))
    pipeline.store.transition(run.run_id, runs.VALIDATING)  # an ingest is validating it
    cancel, retry = handler("cancel_run"), handler("retry_run")
    try:
        answer = cancel(http("POST", "/x", {"run_id": run.run_id}))
        body = json.loads(answer.get_body())
        assert answer.status_code == 200 and (body["state"], body["failed_in"]) == ("canceled", "validating")
        handler("ingest")(blob)  # the blob event again: the canceled run stays canceled, nothing is submitted
        assert pipeline.store.get(run.run_id).state == runs.CANCELED
        assert not (settings.state_dir / "jobs").exists()
        answer = retry(http("POST", "/x", {"run_id": run.run_id}))  # validated again, then submitted
        assert answer.status_code == 202 and json.loads(answer.get_body())["state"] == "submitted"
        answer = cancel(http("POST", "/x", {"run_id": run.run_id}))  # now its job is stopped
        assert answer.status_code == 200 and json.loads(answer.get_body())["failed_in"] == "submitted"
        again = cancel(http("POST", "/x", {"run_id": run.run_id}))
        assert again.status_code == 409 and "is canceled" in json.loads(again.get_body())["error"]
        types = [p["type"] for p in queued_webhooks(settings)]
        assert types.count("run.canceled") == 2 and "run.submitted" in types
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()
    assert cancel(http("POST", "/x", {"run_id": "nope"})).status_code == 404


def test_retry_of_a_validation_failure_says_to_upload_again(app_env):
    store = get_pipeline().store
    run, _ = store.create(Run("data-x", dataset_blob="d.jsonl"))
    store.transition(run.run_id, runs.VALIDATING)
    store.transition(run.run_id, runs.FAILED, error="superseded")
    answer = handler("retry_run")(http("POST", "/x", {"run_id": run.run_id}))
    assert answer.status_code == 409 and "upload the dataset again" in json.loads(answer.get_body())["error"]


def test_the_same_content_again_is_recognised_and_trained_again_only_when_asked(app_env):
    settings = Settings.from_env()
    ingest = handler("ingest")
    store = get_pipeline().store
    try:
        ingest(upload(settings, "first.jsonl", good_dataset()))
        ingest(upload(settings, "copy.jsonl", good_dataset()))  # another name, the same bytes
        first, copy = sorted(store.list(), key=lambda r: r.dataset_blob != "first.jsonl")
        assert first.state == runs.SUBMITTED and first.content_sha256
        assert copy.state == runs.REJECTED and copy.content_sha256 == first.content_sha256
        assert copy.report["errors"][0]["code"] == "duplicate_dataset" and first.run_id in copy.error
        ingest(upload(settings, "again.jsonl", good_dataset(), metadata={"tunedrop_force": "true"}))
        forced = next(r for r in store.list() if r.dataset_blob == "again.jsonl")
        assert forced.state == runs.SUBMITTED
        ingest(upload(settings, "other-params.jsonl", good_dataset(), metadata={"tunedrop_num_train_epochs": "2"}))
        other = next(r for r in store.list() if r.dataset_blob == "other-params.jsonl")
        assert other.state == runs.SUBMITTED  # same bytes, different training: a new model
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()
    rejected = [p for p in queued_webhooks(settings) if p["type"] == "run.rejected"]
    assert [p["data"]["duplicate_of"] for p in rejected] == [first.run_id]


def test_an_overwrite_while_the_first_run_is_in_flight_is_a_new_run(app_env):
    settings = Settings.from_env()
    ingest = handler("ingest")
    store = get_pipeline().store
    try:
        ingest(upload(settings, "data.jsonl", good_dataset(12)))
        (first,) = store.list()
        ingest(upload(settings, "data.jsonl", good_dataset(14)))  # new content, same name: a new ETag
        second = next(r for r in store.list() if r.run_id != first.run_id)
        assert second.dataset_etag != first.dataset_etag and second.state == runs.SUBMITTED
        assert second.job_name != first.job_name
        assert store.get(first.run_id).state == runs.SUBMITTED  # the first is unaffected
    finally:
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()


# ---- train/test pairs ---------------------------------------------------------------------------


def test_a_pair_is_one_run_whichever_half_arrives_first(app_env):
    from shared.backends.local import LocalBackend

    settings = Settings.from_env()
    ingest = handler("ingest")
    pipeline = get_pipeline()
    try:
        # test half first: nothing to run yet; then the train half completes the pair
        assert ingest(upload(settings, "a/chat.test.jsonl", good_dataset(3))) is None
        assert pipeline.store.list() == []
        ingest(upload(settings, "a/chat.train.jsonl", good_dataset(12), metadata={"tunedrop_max_steps": "1"}))
        (run,) = pipeline.store.list()
        assert run.state == runs.SUBMITTED, run.error
        assert (run.dataset_blob, run.test_blob) == ("a/chat.train.jsonl", "a/chat.test.jsonl")
        test = run.report["stats"]["test"]
        assert (test["file"], test["examples"], test["in_train"]) == ("a/chat.test.jsonl", 3, 3)
        assert run.report["warnings"][0]["code"] == "test_in_train" and run.report["warnings"][0]["file"] == \
            "a/chat.test.jsonl"
        spec = json.loads((settings.state_dir / "jobs" / run.job_name / "job.json").read_text())
        assert spec["dataset"]["test"] == {"blob": "a/chat.test.jsonl", "etag": run.test_etag}

        # train half first (folder form): it waits, visibly; the test half's arrival starts it
        ingest(upload(settings, "b/train.jsonl", good_dataset(12), metadata={"tunedrop_max_steps": "1"}))
        (waiting,) = [r for r in pipeline.store.list() if r.dataset_blob == "b/train.jsonl"]
        assert waiting.state == runs.RECEIVED and "b/test.jsonl" in waiting.error
        assert [p["type"] for p in queued_webhooks(settings)].count("run.accepted") == 1  # only the first pair's
        test_half = upload(settings, "b/test.jsonl.gz", gzip.compress(good_dataset(2)))
        ingest(test_half)
        started = pipeline.store.get(waiting.run_id)
        assert started.state == runs.SUBMITTED, started.error
        assert (started.test_blob, started.error) == ("b/test.jsonl.gz", "")
        ingest(test_half)  # delivered again: nothing changes
        assert pipeline.store.get(waiting.run_id).history == started.history
        assert len(pipeline.store.list()) == 2
    finally:
        LocalBackend(settings).stop_all()


def test_a_train_half_whose_test_half_never_comes_fails_after_the_wait(app_env):
    from datetime import timedelta

    from shared.pipeline import PAIR_WAIT

    settings = Settings.from_env()
    handler("ingest")(upload(settings, "lonely.train.jsonl", good_dataset()))
    pipeline = get_pipeline()
    (run,) = pipeline.store.list()
    assert run.state == runs.RECEIVED
    soon = datetime.fromisoformat(run.created_at) + timedelta(minutes=30)
    pipeline.sweep(now=soon)
    assert pipeline.store.get(run.run_id).state == runs.RECEIVED  # still waiting
    pipeline.sweep(now=datetime.fromisoformat(run.created_at) + PAIR_WAIT + timedelta(minutes=1))
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and "lonely.test.jsonl" in failed.error
    (webhook,) = [p for p in queued_webhooks(settings) if p["type"] == "run.failed"]
    assert webhook["data"]["code"] == "missing_test_file"


def test_a_replaced_or_late_test_half_makes_a_new_run_of_the_pair(app_env):
    from datetime import timedelta

    from shared.backends.local import LocalBackend
    from shared.pipeline import PAIR_WAIT

    settings = Settings.from_env()
    ingest = handler("ingest")
    pipeline = get_pipeline()
    steps = {"tunedrop_max_steps": "1"}
    try:
        upload(settings, "r.test.jsonl", good_dataset(3))
        ingest(upload(settings, "r.train.jsonl", good_dataset(12), metadata=steps))
        (first,) = pipeline.store.list()
        assert first.state == runs.SUBMITTED, first.error
        replaced = upload(settings, "r.test.jsonl", good_dataset(4))  # a new version of the test half
        ingest(replaced)
        (second,) = [r for r in pipeline.store.list() if r.run_id != first.run_id]
        assert second.state == runs.SUBMITTED, second.error
        assert (second.dataset_etag, second.test_blob) == (first.dataset_etag, "r.test.jsonl")
        assert second.test_etag == replaced.get_blob_properties().etag != first.test_etag
        assert second.report["stats"]["test"]["examples"] == 4
        ingest(replaced)  # delivered again: nothing new
        assert len(pipeline.store.list()) == 2
        assert pipeline.store.get(first.run_id).history == first.history  # the first run is untouched

        # a train half that failed waiting: its test half arriving late starts the pair after all
        ingest(upload(settings, "late.train.jsonl", good_dataset(12), metadata=steps))
        (waiting,) = [r for r in pipeline.store.list() if r.dataset_blob == "late.train.jsonl"]
        pipeline.sweep(now=datetime.fromisoformat(waiting.created_at) + PAIR_WAIT + timedelta(minutes=1))
        assert pipeline.store.get(waiting.run_id).state == runs.FAILED
        ingest(upload(settings, "late.test.jsonl", good_dataset(2)))
        (late,) = [r for r in pipeline.store.list() if r.dataset_blob == "late.train.jsonl" and r.run_id != waiting.run_id]
        assert late.state == runs.SUBMITTED and late.test_blob == "late.test.jsonl", late.error
    finally:
        LocalBackend(settings).stop_all()


def test_a_pair_with_a_bad_test_half_is_rejected_whole_naming_the_file(app_env):
    settings = Settings.from_env()
    upload(settings, "p.test.jsonl", bad_dataset())
    handler("ingest")(upload(settings, "p.train.jsonl", good_dataset()))
    (run,) = get_pipeline().store.list()
    assert run.state == runs.REJECTED
    (error,) = run.report["errors"]
    assert (error["file"], error["line"], error["code"]) == ("p.test.jsonl", 4, "unknown_role")
    quarantine = default_storage().blob_service.get_container_client(settings.quarantine_container)
    assert sorted(b.name for b in quarantine.list_blobs()) == [
        f"{run.run_id}/p.test.jsonl", f"{run.run_id}/p.train.jsonl", f"{run.run_id}/p.train.jsonl.report.json"]
    (webhook,) = queued_webhooks(settings)
    assert "p.test.jsonl: line 4" in webhook["data"]["summary"]


def test_a_dataset_can_name_its_own_base_model_and_an_unknown_one_is_rejected(app_env):
    from shared.backends.local import LocalBackend

    settings = Settings.from_env()
    assert settings.effective_base_model == "tiny-random"
    ingest = handler("ingest")
    ingest(upload(settings, "other.jsonl", good_dataset(), metadata={"tunedrop_base_model": "smollm2-135m-instruct",
                                                                     "tunedrop_max_steps": "1"}))
    ingest(upload(settings, "nope.jsonl", good_dataset(), metadata={"tunedrop_base_model": "gpt-17"}))
    ingest(upload(settings, "path.jsonl", good_dataset(), metadata={"tunedrop_base_model": "/etc/passwd"}))
    try:
        by_blob = {r.dataset_blob: r for r in get_pipeline().store.list()}
        other = by_blob["other.jsonl"]
        assert other.state == runs.SUBMITTED and other.base_model == "smollm2-135m-instruct"
        assert other.display_name.startswith("smollm2-135m-instruct-")
        spec = json.loads((settings.state_dir / "jobs" / other.job_name / "job.json").read_text())
        assert spec["base_model"] == "smollm2-135m-instruct"
        for blob, field in (("nope.jsonl", "base_model"), ("path.jsonl", "metadata")):
            run = by_blob[blob]
            assert run.state == runs.REJECTED
            (error,) = run.report["errors"]
            assert (error["code"], error["field"]) == ("bad_override", field) and "base_model" in error["message"]
    finally:
        LocalBackend(settings).stop_all()


def test_an_endpoint_in_use_is_recorded_as_used_often_enough_for_a_short_idle_window(app_env, monkeypatch):
    """Last use is written at most every 30 s, but four times within TUNEDROP_IDLE_MINUTES when that is shorter:
    a 12 s idle window with 30 s between writes let the sweeper tear down an endpoint in the middle of a burst."""
    import shared.scoring as scoring

    monkeypatch.setenv("TUNEDROP_IDLE_MINUTES", "0.2")
    pipeline = get_pipeline()
    run = make_run(runs.DEPLOYING)  # the last-use record is the run's, whatever its state
    scorer = scoring.Scorer(pipeline)
    clock = [1000.0]
    monkeypatch.setattr(scoring.time, "monotonic", lambda: clock[0])
    seen = []
    for _ in range(4):  # 0, 2, 4, 6 s into a burst
        scorer._touch(run)
        seen.append(pipeline.store.get(run.run_id).last_scored_at)
        clock[0] += 2.0
    assert seen[0] and seen[0] == seen[1] and seen[2] > seen[1] and seen[3] == seen[2]  # every 3 s, not every 30 s
