"""The run store on a real Azurite table: state machine, ETags, idempotent creation."""

from datetime import timedelta

import pytest

from shared import runs
from shared.runs import ConcurrentUpdate, InvalidTransition, Run, RunNotFound, RunStore, run_id_for
from shared.settings import Settings


@pytest.fixture
def store(storage_env):
    return RunStore.from_settings(Settings.from_env())


def new_run(store, run_id="data-abc"):
    run, created = store.create(Run(run_id, dataset_container="training-data", dataset_blob="data.jsonl",
                                    dataset_etag='"0x1"'))
    assert created
    return run


def test_same_blob_version_maps_to_same_run_id_and_a_new_version_to_a_new_one():
    first = run_id_for("training-data", "team/My Data.v2.jsonl", '"0x8DC1"')
    assert first == run_id_for("training-data", "team/My Data.v2.jsonl", "0x8DC1")  # quotes or not
    assert first.startswith("my-data-")
    assert first != run_id_for("training-data", "team/My Data.v2.jsonl", '"0x8DC2"')
    assert first != run_id_for("other", "team/My Data.v2.jsonl", '"0x8DC1"')


def test_create_is_idempotent(store):
    run = new_run(store)
    again, created = store.create(Run(run.run_id, dataset_blob="something-else.jsonl"))
    assert not created
    assert again.dataset_blob == "data.jsonl"


def test_happy_path_records_history_and_fields(store):
    run = new_run(store)
    for state in (runs.VALIDATING, runs.SUBMITTED, runs.RUNNING, runs.SUCCEEDED, runs.REGISTERED,
                  runs.DEPLOYING, runs.DEPLOYED, runs.TORN_DOWN):
        changes = {"metrics": {"eval_loss": 1.5}} if state == runs.SUCCEEDED else {}
        moved = store.transition(run.run_id, state, **changes)
        assert moved is not None and moved.state == state
    final = store.get(run.run_id)
    assert [h["state"] for h in final.history] == list(runs.ORDER)
    assert final.metrics == {"eval_loss": 1.5}


def test_late_or_duplicate_transition_changes_nothing(store):
    run = new_run(store)
    for state in (runs.VALIDATING, runs.SUBMITTED, runs.SUCCEEDED):
        store.transition(run.run_id, state)
    before = store.get(run.run_id)
    assert store.transition(run.run_id, runs.RUNNING) is None  # "running" arriving after "completed"
    assert store.transition(run.run_id, runs.SUCCEEDED) is None  # the same event twice
    after = store.get(run.run_id)
    assert after.state == runs.SUCCEEDED and after.etag == before.etag


def test_forbidden_transition_is_refused(store):
    run = new_run(store)
    store.transition(run.run_id, runs.VALIDATING)
    store.transition(run.run_id, runs.REJECTED)
    assert store.transition(run.run_id, runs.SUBMITTED) is None  # rejected is final
    run2 = new_run(store, "other-run")
    with pytest.raises(InvalidTransition):
        store.transition(run2.run_id, runs.DEPLOYED)  # received -> deployed skips the whole pipeline


def test_stale_etag_loses(store):
    run = new_run(store)
    first = store.get(run.run_id)
    second = store.get(run.run_id)
    first.job_name = "job-a"
    store.save(first)
    second.job_name = "job-b"
    with pytest.raises(ConcurrentUpdate):
        store.save(second)
    assert store.get(run.run_id).job_name == "job-a"


def test_failed_remembers_where(store):
    run = new_run(store)
    store.transition(run.run_id, runs.VALIDATING)
    store.transition(run.run_id, runs.SUBMITTED)
    failed = store.transition(run.run_id, runs.FAILED, error="GPU on fire")
    assert failed.failed_in == runs.SUBMITTED and failed.error == "GPU on fire"
    assert store.transition(run.run_id, runs.RUNNING) is None


def test_claim_is_exclusive_until_the_lease_expires(store):
    run = new_run(store)
    claimed = store.claim(store.get(run.run_id), lease=timedelta(minutes=10))
    assert claimed is not None and claimed.state == runs.VALIDATING
    assert store.claim(store.get(run.run_id), lease=timedelta(minutes=10)) is None
    taken_over = store.claim(store.get(run.run_id), lease=timedelta(seconds=0))
    assert taken_over is not None and taken_over.claims == 1


def test_release_lets_a_retry_claim_again(store):
    run = new_run(store)
    claimed = store.claim(store.get(run.run_id), lease=timedelta(minutes=10))
    store.release(claimed, "ConnectionError: storage blinked")
    released = store.get(run.run_id)
    assert released.state == runs.RECEIVED and "storage blinked" in released.error
    assert store.claim(released, lease=timedelta(minutes=10)).state == runs.VALIDATING


def test_get_unknown_run(store):
    with pytest.raises(RunNotFound, match="tunedrop status"):
        store.get("nope")
    assert store.find("nope") is None


def test_list_filters_by_state(store):
    a = new_run(store, "run-a")
    new_run(store, "run-b")
    store.transition(a.run_id, runs.VALIDATING)
    assert [r.run_id for r in store.list((runs.VALIDATING,))] == ["run-a"]
    assert {r.run_id for r in store.list()} == {"run-a", "run-b"}


def test_reopen_only_a_failed_run_and_count_the_retry(store):
    run = new_run(store)
    for state in (runs.VALIDATING, runs.SUBMITTED, runs.FAILED):
        store.transition(run.run_id, state, **({"error": "boom"} if state == runs.FAILED else {}))
    failed = store.get(run.run_id)
    stale = store.get(run.run_id)
    reopened = store.reopen(failed, runs.SUBMITTED, job_name="job-r1")
    assert (reopened.state, reopened.retries, reopened.error, reopened.job_name) == (runs.SUBMITTED, 1, "", "job-r1")
    assert store.reopen(stale, runs.SUBMITTED) is None  # a second, concurrent retry loses
    assert store.reopen(store.get(run.run_id), runs.SUBMITTED) is None  # not failed any more
