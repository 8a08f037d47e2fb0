"""The run failure catalogue (shared/failures.py): every code the code raises is in it, documented,
and the codes Azure's answers map to are each produced by the answer that means them."""

from __future__ import annotations

import ast
import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from shared.backends.base import BackendError
from shared.datasets import CODES as DATASET_CODES
from shared.events import RUN_ID_TAG, RunEvent, run_event
from shared.failures import ALL_CODES, FAILURES, JOB_STATUS_CODES
from tests.azureml_transport import error
from tests.azureml_world import ARM, MODEL, WSID, cancel_job, endpoint, job, recorded, registry_model, stored_run

ROOT = Path(__file__).resolve().parent.parent


def raised_codes() -> set[str]:
    """Every string literal the code gives as a failure code: `code=`, `error_code=`, `"code":` and
    `_fail(run, message, code)` (f-strings are the documented families, not literals)."""
    found = set()

    def literals(node):
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and not any(isinstance(p, ast.JoinedStr) for p in ast.walk(node) if n in ast.walk(p) and p is not n)}

    for path in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "functions").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg in ("code", "error_code"):
                found |= literals(node.value)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "code":
                        found |= literals(value)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "_fail" and len(node.args) > 2:
                found |= literals(node.args[2])
    return found


def test_every_code_the_code_raises_is_in_one_catalogue():
    raised = raised_codes()
    assert {"superseded", "missing_test_file", "job_timeout", "datastore_missing", "bad_override"} <= raised
    unknown = raised - set(ALL_CODES) - set(DATASET_CODES)
    assert not unknown, f"add these to shared/failures.py: {sorted(unknown)}"
    assert not set(ALL_CODES) & set(DATASET_CODES)  # one meaning per code
    assert set(JOB_STATUS_CODES) <= set(FAILURES)  # job_<status> of every status a job can end badly with


def test_the_catalogue_is_documented():
    from tunedrop.readme import FAILURES_DOC, failures_markdown

    assert FAILURES_DOC.read_text() == failures_markdown(), "docs/run-failures.md is out of date: python -m tunedrop.readme"
    for code in ALL_CODES:
        assert f"`{code}`" in FAILURES_DOC.read_text()


# ---- Azure's answers, each mapped to its code --------------------------------------------------------

@pytest.mark.parametrize("answer, code, retryable", [
    (error(401, "InvalidAuthenticationToken", "expired"), "auth_failed", False),
    (error(403, "AuthorizationFailed", "no role"), "forbidden", False),
    ((429, {"error": {"code": "TooManyRequests", "message": "slow"}}, {"Retry-After": "0"}), "throttled", True),
    (error(503, "ServiceUnavailable", "busy"), "azure_unavailable", True),
])
def test_azures_refusals_become_codes_that_say_what_to_do(backend, transport, answer, code, retryable):
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", answer)
    with pytest.raises(BackendError) as caught:
        backend.check_compute(backend.foundation_model())
    assert (caught.value.code, caught.value.retryable) == (code, retryable)


def test_no_answer_from_azure_is_unreachable_and_retried(backend, transport):
    from azure.core.exceptions import ServiceRequestError

    def no_answer(request, body):
        raise ServiceRequestError("connection refused")
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", no_answer)
    with pytest.raises(BackendError) as caught:
        backend.check_compute(backend.foundation_model())
    assert (caught.value.code, caught.value.retryable) == ("unreachable", True)


def test_an_unreadable_model_tag_is_named(backend, transport):
    transport.on("GET", rf"/models/{MODEL}/versions/15\?", registry_model({"finetune_compute_allow_list": "[oops"}))
    with pytest.raises(BackendError) as caught:
        backend.check_compute(backend.foundation_model())
    assert caught.value.code == "bad_model_tag" and "finetune_compute_allow_list" in str(caught.value)


@pytest.mark.parametrize("state, tags, code", [
    ("Failed", {"tunedrop_run_id": "r", "model_name": "m", "model_version": "1"}, "endpoint_failed"),
    ("Succeeded", {}, "foreign_endpoint"),
])
def test_an_endpoint_that_cannot_serve_the_run_is_named(backend, transport, state, tags, code):
    ep = "td-chat-0123456789"
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, state, tags))
    info = backend.get_deployment(ep)
    assert info.error_code == code and ep in info.error


def test_scoring_a_missing_or_keyless_endpoint_is_named(backend, transport):
    ep = "td-chat-0123456789"
    with pytest.raises(BackendError) as missing:
        backend.scoring_target(ep)  # no route: Azure ML's recorded 404
    assert missing.value.code == "endpoint_missing"
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep))
    transport.on("POST", rf"{ARM}/onlineEndpoints/{ep}/listKeys\?", recorded(
        "online_endpoint", "POST", 200, r"/listKeys$", edit=lambda b: b.update(primaryKey=None)))
    with pytest.raises(BackendError) as keyless:
        backend.scoring_target(ep)
    assert keyless.value.code == "endpoint_auth"


def test_a_model_version_of_another_run_is_a_conflict(backend, transport, settings):
    run = stored_run(settings, job_name="tunedrop-chat-0123456789ab")
    version = backend.model_version_for(run)
    name = f"{MODEL}-ultrachat-200k"
    transport.on("GET", rf"{ARM}/models/{name}/versions/{version}\?", recorded(
        "model_version", "GET", 200, r"/versions/3$", rename={"test_907403507619": name, "/versions/3": f"/versions/{version}"},
        edit=lambda b: b["properties"].update(tags={"tunedrop_run_id": "someone-else"})))
    with pytest.raises(BackendError) as caught:
        backend.register_model(run)
    assert caught.value.code == "model_version_conflict" and "someone-else" in str(caught.value)


def test_an_unknown_backend_is_a_bad_setting():
    from types import SimpleNamespace

    from shared.backends import get_backend

    with pytest.raises(BackendError) as caught:
        get_backend(SimpleNamespace(backend="sagemaker"))
    assert caught.value.code == "bad_setting"


def test_a_job_that_never_ends_times_out(backend, transport, settings):
    from shared import runs
    from shared.pipeline import Pipeline

    pipeline = Pipeline(settings, backend=backend)
    run, _ = pipeline.store.create(stored_run(settings, job_name="tunedrop-chat-0123456789ab"))
    pipeline.store.transition(run.run_id, runs.VALIDATING)
    pipeline.store.transition(run.run_id, runs.SUBMITTED)
    transport.on("GET", rf"{ARM}/jobs/", job(run.job_name, "Running"))
    cancel_job(transport, run.job_name)
    later = runs.utcnow() + timedelta(minutes=settings.job_timeout_minutes + 1)
    assert pipeline.sweep(now=later).failed == [run.run_id]
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and "still Running" in failed.error and "it was canceled" in failed.error
    # nothing is left spending GPU hours: the job was cancelled, as Azure ML's recorded cancel answers
    assert len(transport.calls("POST", rf"{ARM}/jobs/{run.job_name}/cancel")) == 1


def test_a_job_that_ended_is_not_cancelled_when_its_run_fails(backend, transport, settings):
    """The cancel asks the job first: one that has ended (or is gone) gets no cancel call."""
    transport.on("GET", rf"{ARM}/jobs/", job("tunedrop-chat-0123456789ab", "Completed"))
    backend.cancel_job("tunedrop-chat-0123456789ab")
    assert transport.calls("POST", r"/cancel") == []


def test_an_event_saying_a_job_completed_is_checked_against_the_job(backend, transport, settings):
    from shared import runs
    from shared.events import RUN_ID_TAG, RunEvent, run_event
    from shared.pipeline import Pipeline

    pipeline = Pipeline(settings, backend=backend)
    run, _ = pipeline.store.create(stored_run(settings, job_name="tunedrop-chat-0123456789ab"))
    pipeline.store.transition(run.run_id, runs.VALIDATING)
    pipeline.store.transition(run.run_id, runs.SUBMITTED)
    transport.on("GET", rf"{ARM}/jobs/", job(run.job_name, "Running"))  # Azure ML says it still trains
    for status in ("Completed", "Failed"):
        raw = run_event(status=status, topic=settings.workspace_id, job_name=run.job_name, experiment_name="x",
                        run_tags={RUN_ID_TAG: run.run_id})
        pipeline.on_run_event(RunEvent(raw["id"], raw["eventType"], raw["topic"], raw["subject"], raw["data"]))
        assert pipeline.store.get(run.run_id).state == runs.RUNNING
    assert transport.calls("POST", r"/cancel") == [] and transport.calls("GET", r"/models/") == []


# ---- a job ending badly: job_<status> of the status it ended with ---------------------------------------

def with_webhooks(settings):
    """``settings`` with a webhook receiver, so that each move's webhook (its `code`) is queued."""
    from shared.webhooks import new_secret

    return dataclasses.replace(settings, webhook_urls=("https://hooks.example.com/tunedrop",),
                               webhook_secret=new_secret())


def webhooks(settings) -> list[dict]:
    from shared.storage import default_storage
    from shared.webhooks import OutboxMessage

    queue = default_storage().queue(settings.webhook_queue)
    return [OutboxMessage.from_json(m.content).payload for m in queue.peek_messages(max_messages=32)]


def submitted_run(pipeline, settings):
    from shared import runs

    run, _ = pipeline.store.create(stored_run(settings, job_name="tunedrop-chat-0123456789ab"))
    pipeline.store.transition(run.run_id, runs.VALIDATING)
    return pipeline.store.transition(run.run_id, runs.SUBMITTED)


def test_a_canceled_job_fails_the_run_as_job_canceled_and_retry_submits_a_new_job(backend, transport, settings):
    from shared import runs
    from shared.pipeline import Pipeline

    settings = with_webhooks(settings)
    pipeline = Pipeline(settings, backend=backend)
    run = submitted_run(pipeline, settings)
    transport.on("GET", rf"{ARM}/jobs/{run.job_name}\?", job(run.job_name, "Canceled"))
    raw = run_event(status="Canceled", topic=WSID, job_name=run.job_name, experiment_name=f"chat_completion_{MODEL}",
                    run_tags={RUN_ID_TAG: run.run_id})
    failed = pipeline.on_run_event(RunEvent(raw["id"], raw["eventType"], raw["topic"], raw["subject"], raw["data"]))
    assert failed.state == runs.FAILED and failed.failed_in == runs.SUBMITTED
    assert f"Job {run.job_name} ended Canceled." in failed.error  # no run-history error: the studio is named
    (webhook,) = [w for w in webhooks(settings) if w["type"] == "run.failed"]
    assert webhook["data"]["code"] == "job_canceled" and webhook["data"]["error"] == failed.error
    # Not Azure refusing the run: `tunedrop retry` submits the job again, under a new name.
    retried = pipeline.retry(run.run_id)
    assert (retried.state, retried.job_name) == (runs.SUBMITTED, f"{run.job_name}-r1")
    assert [url.split("?")[0].rsplit("/", 1)[-1] for _, url, _ in transport.calls("PUT", r"/jobs/")] == [retried.job_name]


def test_a_job_gone_from_the_workspace_fails_the_run_as_job_notfound_at_the_next_sweep(backend, transport, settings):
    from shared import runs
    from shared.pipeline import Pipeline

    settings = with_webhooks(settings)
    pipeline = Pipeline(settings, backend=backend)
    run = submitted_run(pipeline, settings)
    # No route answers the job's GET: Azure ML's recorded 404. Long before the job timeout.
    assert pipeline.sweep().failed == [run.run_id]
    assert transport.calls("GET", rf"{ARM}/jobs/{run.job_name}\?")
    failed = pipeline.store.get(run.run_id)
    assert failed.state == runs.FAILED and failed.failed_in == runs.SUBMITTED
    assert failed.error == f"Job {run.job_name} does not exist in workspace {backend.workspace_name}."
    (webhook,) = [w for w in webhooks(settings) if w["type"] == "run.failed"]
    assert webhook["data"]["code"] == "job_notfound"
    assert pipeline.sweep().failed == []  # a failed run is not swept again


def test_cancel_of_a_training_run_cancels_its_azure_ml_job(backend, transport, settings):
    from shared import runs
    from shared.pipeline import Pipeline

    pipeline = Pipeline(settings, backend=backend)
    run, _ = pipeline.store.create(stored_run(settings, job_name="tunedrop-chat-0123456789ab"))
    for step in (runs.VALIDATING, runs.SUBMITTED, runs.RUNNING):
        pipeline.store.transition(run.run_id, step)
    transport.on("GET", rf"{ARM}/jobs/", job(run.job_name, "Running"))
    cancel_job(transport, run.job_name)
    canceled = pipeline.cancel(run.run_id)
    assert (canceled.state, canceled.failed_in) == (runs.CANCELED, runs.RUNNING)
    assert len(transport.calls("POST", rf"{ARM}/jobs/{run.job_name}/cancel")) == 1  # Azure ML's recorded 202
