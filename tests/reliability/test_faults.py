"""Crash between steps: the process dies right after the external call, before the run record
says so. The retry must find what was made (by its deterministic name or tag) and carry on,
leaving exactly one job, one model version, one endpoint."""

import pickle
import time
from datetime import timedelta

import mlflow

from shared import faults, runs
from shared.runs import utcnow
from shared.webhooks import EVENT_TYPES
from tests.handlers import deliver_run_event, handler
from tests.reliability.conftest import completed_event, dataset, in_child, outbox, summary, upload, wait_for_job


def test_a_crash_after_every_external_call_still_ends_with_one_of_each(app_env, tmp_path):
    settings, pipeline, store = app_env.settings, app_env.pipeline, app_env.pipeline.store
    upload(settings, "sums.jsonl", dataset())
    blob_code = (f"from shared.storage import default_storage\n"
                 f"handler('ingest')(default_storage().blob_service.get_blob_client("
                 f"'{settings.training_container}', 'sums.jsonl'))\n")
    injected = 0

    # 1. ingest dies after submitting the job.
    assert in_child(blob_code, "after_submit") == faults.EXIT_CODE
    injected += 1
    (run,) = store.list()
    assert run.state == runs.VALIDATING
    handler("ingest")(pipeline.storage.blob_service.get_blob_client(settings.training_container, "sums.jsonl"))
    assert store.get(run.run_id).state == runs.VALIDATING  # the claim still holds: a redelivery waits
    pipeline.sweep(now=utcnow() + timedelta(minutes=11))  # the claim lapsed: the sweeper finishes it
    run = store.get(run.run_id)
    assert run.state == runs.SUBMITTED
    assert [d.name for d in (settings.state_dir / "jobs").iterdir()] == [run.job_name]  # one job
    wait_for_job(pipeline, run.job_name)

    # 2. job_events dies after registering, then again after beginning the deployment.
    event = pickle.dumps(completed_event(run))
    event_code = f"import pickle\nfrom tests.handlers import deliver_run_event\ndeliver_run_event(pickle.loads({event!r}))\n"
    assert in_child(event_code, "after_register") == faults.EXIT_CODE
    assert store.get(run.run_id).state == runs.SUCCEEDED
    assert in_child(event_code, "after_begin_deploy") == faults.EXIT_CODE
    assert store.get(run.run_id).state == runs.REGISTERED
    injected += 2
    deliver_run_event(pickle.loads(event))  # Event Grid's redelivery
    run = store.get(run.run_id)
    assert run.state == runs.DEPLOYING
    client = mlflow.MlflowClient(settings.effective_tracking_uri, settings.effective_tracking_uri)
    versions = client.search_model_versions(f"name = '{run.model_name}' and tags.tunedrop_run_id = '{run.run_id}'")
    assert [str(v.version) for v in versions] == [run.model_version]  # one model version
    assert [d.name for d in (settings.state_dir / "endpoints").iterdir()] == [run.endpoint_name]  # one endpoint

    # 3. The sweeper finishes the deployment; a teardown dies after deleting the endpoint.
    for _ in range(300):
        if pipeline.sweep().ready:
            break
        time.sleep(0.2)
    assert store.get(run.run_id).state == runs.DEPLOYED
    later = (utcnow() + timedelta(minutes=settings.idle_minutes + 1)).isoformat()
    sweep_code = f"from datetime import datetime\nget_pipeline().sweep(now=datetime.fromisoformat({later!r}))\n"
    assert in_child(sweep_code, "after_delete") == faults.EXIT_CODE
    injected += 1
    assert store.get(run.run_id).state == runs.DEPLOYED
    pipeline.sweep(now=utcnow() + timedelta(minutes=settings.idle_minutes + 1))
    assert store.get(run.run_id).state == runs.TORN_DOWN
    assert not (settings.state_dir / "endpoints" / run.endpoint_name).exists()

    # One webhook per state change; a repeat carries the same id, so receivers can dedupe it.
    messages = outbox(settings)
    ids_by_type = {}
    for message in messages:
        ids_by_type.setdefault(message.payload["type"], set()).add(message.id)
    expected = {"run.accepted", "run.submitted", "run.succeeded", "model.registered", "endpoint.deploying",
                "endpoint.ready", "endpoint.torn_down"}
    assert set(ids_by_type) == expected and set(ids_by_type) <= set(EVENT_TYPES)
    assert all(len(ids) == 1 for ids in ids_by_type.values())
    duplicates = len(messages) - len(ids_by_type)
    summary("faults", {"faults_injected": injected, "jobs": 1, "model_versions": len(versions), "endpoints": 1,
                       "webhook_types": len(ids_by_type), "same_id_repeats": duplicates, "lost": 0})
