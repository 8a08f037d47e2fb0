"""The whole loop through the local Functions host, with real processes and real HTTP:
drop -> validate -> LoRA fine-tune (tiny random Llama, SmolLM2's tokenizer) -> MLflow registry ->
model server -> score through the HTTP function -> webhooks verified -> sweeper tears down."""

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import function_app
from shared import runs
from shared.backends.local import LocalBackend, _alive, _read_json
from shared.events import deployment_ready_event
from shared.settings import Settings
from shared.storage import default_storage, reset_default_storage
from shared.webhooks import new_secret
from tests.receiver import Receiver
from tests.waiting import wait_for
from tunedrop.azurite import ACCOUNT_KEY as AZURITE_KEY
from tunedrop.azurite import free_port
from tunedrop.host import LocalHost
from tunedrop.local import PROJECT_ROOT, embedded_environment

QUICK_TRAINING = {"num_train_epochs": 1, "max_steps": 3, "max_seq_length": 64, "learning_rate": 1e-3}


@contextlib.contextmanager
def running_app(storage_env, model_cache, monkeypatch, tmp_path, **settings):
    """The app in the local host, on Azurite, with a webhook receiver; ``settings`` over the tests' own."""
    secret = new_secret()
    port = free_port()
    state_dir = tmp_path / "state"
    with Receiver(secret) as receiver:
        env = embedded_environment(storage_env["TUNEDROP_STORAGE"], state_dir=state_dir, port=port)
        env.update({
            "TUNEDROP_BASE_MODEL": "tiny-random",
            "TUNEDROP_MODEL_CACHE": str(model_cache),
            "TUNEDROP_WEBHOOK_URLS": receiver.url,
            "TUNEDROP_WEBHOOK_SECRET": secret,
            "TUNEDROP_TRAINING_OVERRIDES": json.dumps(QUICK_TRAINING),
            "TUNEDROP_IDLE_MINUTES": "0.2",
            "TUNEDROP_SWEEP_SCHEDULE": "*/1 * * * * *",
            **settings,
        })
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reset_default_storage()
        host = LocalHost(function_app.app, environ=env, port=port, root=PROJECT_ROOT, state_dir=state_dir,
                         poll_interval_s=0.3, visibility_timeout_s=1)
        with host:
            yield SimpleNamespace(host=host, receiver=receiver, settings=Settings.from_env(), port=port,
                                  state_dir=state_dir)
        LocalBackend(Settings.from_env()).stop_all()


@pytest.fixture
def app(storage_env, model_cache, monkeypatch, tmp_path):
    with running_app(storage_env, model_cache, monkeypatch, tmp_path) as running:
        yield running


#: A sweeper that never runs during a test (NCRONTAB: midnight on the first of January).
NEVER = "0 0 0 1 1 *"


@pytest.fixture
def app_without_sweeps(storage_env, model_cache, monkeypatch, tmp_path):
    with running_app(storage_env, model_cache, monkeypatch, tmp_path, TUNEDROP_SWEEP_SCHEDULE=NEVER) as running:
        yield running


def drop(settings, name: str, data: bytes) -> str:
    container = default_storage().ensure_container(settings.training_container)
    result = container.get_blob_client(name).upload_blob(data, overwrite=True)
    return runs.run_id_for(settings.training_container, name, result["etag"])


def conversations(n: int) -> bytes:
    rows = [{"prompt": f"What is {i} plus {i}?", "prompt_id": str(i),
             "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def small_request() -> dict:
    return {"input_string": [{"role": "user", "content": "2+2?"}]}


def test_dataset_to_answer_to_teardown(app, caplog):
    caplog.set_level(logging.DEBUG)
    store = runs.RunStore.from_settings(app.settings)
    run_id = drop(app.settings, "sums.jsonl", conversations(16))

    def state(target):
        run = store.find(run_id)
        assert run is None or run.state not in (runs.FAILED, runs.REJECTED), run.error
        return run if run is not None and run.state == target else None

    run = wait_for(lambda: state(runs.DEPLOYED), 240, "deployed")
    assert run.job_name and run.model_version and run.endpoint_name
    assert run.metrics["train_steps"] == 3 and run.metrics["eval_loss"] > 0

    # Registered in MLflow with its lineage.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=app.settings.effective_tracking_uri,
                                 registry_uri=app.settings.effective_tracking_uri)
    version = client.get_model_version(run.model_name, run.model_version)
    assert version.tags["tunedrop_run_id"] == run_id
    assert version.tags["dataset_blob"] == "sums.jsonl" and version.tags["dataset_etag"] == run.dataset_etag
    history = client.get_metric_history(version.run_id, "train_loss")
    assert len(history) == 3

    # Scored through the HTTP function, with the function key, in both formats.
    url = f"http://127.0.0.1:{app.port}/api/runs/{run_id}"
    body = {"input_data": {"input_string": [{"role": "user", "content": "What is 2 plus 2?"}],
                           "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 8}}}
    assert httpx.post(f"{url}/score", json=body).status_code == 401
    answer = httpx.post(f"{url}/score", json=body, headers={"x-functions-key": app.host.function_key}, timeout=60)
    assert answer.status_code == 200 and isinstance(answer.json()["output"], str)
    # The seed notebook's own request: `"input_string": [test_df["messages"][0]]`, one conversation in a list.
    seed = {"input_data": {**body["input_data"], "input_string": [body["input_data"]["input_string"]]}, "params": {}}
    answer = httpx.post(f"{url}/score", json=seed, headers={"x-functions-key": app.host.function_key}, timeout=60)
    assert answer.status_code == 200 and isinstance(answer.json()["output"], str)
    chat = httpx.post(f"{url}/v1/chat/completions", headers={"x-functions-key": app.host.function_key}, timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"

    # Abuse: wrong key, malformed JSON, oversized body: clear answers, no detail leaked, no trace.
    key = {"x-functions-key": app.host.function_key}
    wrong = httpx.post(f"{url}/score", json=body, headers={"x-functions-key": "guess"})
    assert wrong.status_code == 401 and wrong.content == b""
    malformed = httpx.post(f"{url}/score", content=b'{"input_data": [', headers=key)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]
    bad_field = httpx.post(f"{url}/score", headers=key, json={"input_data": {"input_string": [{"role": "robot"}]}})
    assert bad_field.status_code == 400 and "input_data.input_string[0].role" in bad_field.json()["error"]
    huge = httpx.post(f"{url}/score", content=b"x" * 1_100_000, headers=key)
    assert huge.status_code == 413
    # What the model server refuses reaches the client as it said it, the limit and setting named, at once.
    long_prompt = {"input_data": {"input_string": [{"role": "user", "content": "word " * 200_000}]}}
    too_long = httpx.post(f"{url}/score", json=long_prompt, headers=key, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["code"] == "prompt_too_long"
    greedy = {"input_data": {**small_request(), "parameters": {"max_new_tokens": 100_000}}}
    too_many = httpx.post(f"{url}/score", json=greedy, headers=key, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["code"] == "max_tokens_too_large"
    assert "TUNEDROP_MAX_NEW_TOKENS" in too_many.json()["error"]
    # 200 concurrent requests against the ready endpoint: every one answered, none with a trace.
    small = {"input_data": {"input_string": [{"role": "user", "content": "2+2?"}],
                            "parameters": {"max_new_tokens": 2, "do_sample": False}}}
    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda _: httpx.post(f"{url}/score", json=small, headers=key, timeout=120), range(200)))
    # Every one answered: 200, or 429 + Retry-After once the model server's bounded queue is full
    # (TUNEDROP_SERVER_CONCURRENCY + TUNEDROP_SERVER_QUEUE), never an error or a hang.
    assert {r.status_code for r in replies} <= {200, 429}
    assert all(r.headers["Retry-After"] for r in replies if r.status_code == 429)
    assert sum(r.status_code == 200 for r in replies) >= 68
    before = next(r for r in replies if r.status_code == 200).json()["output"]  # greedy: its one answer
    assert not any("Traceback" in r.text for r in [wrong, malformed, bad_field, huge, too_long, too_many, *replies])
    endpoint_pid = _read_json(app.state_dir / "endpoints" / run.endpoint_name / "endpoint.json")["pid"]
    app.endpoint_key = (app.state_dir / "endpoints" / run.endpoint_name / "key").read_text().strip()
    assert store.get(run_id).last_scored_at

    # Idle: the sweeper tears the endpoint down and the model server is gone.
    wait_for(lambda: state(runs.TORN_DOWN), 60, "torn down")
    assert not _alive(endpoint_pid)

    expected = ["run.accepted", "run.submitted", "run.running", "run.succeeded", "model.registered",
                "endpoint.deploying", "endpoint.ready", "endpoint.torn_down"]
    app.receiver.wait_for("endpoint.torn_down")
    assert sorted(app.receiver.types()) == sorted(expected)  # each exactly once, each signature verified
    assert app.receiver.rejected == 0
    assert len({p["id"] for p in app.receiver.received}) == len(expected)
    assert all(p["data"]["run_id"] == run_id for p in app.receiver.received)
    # Delivered in the run's order, whatever order the queue handed them out in.
    sequences = [p["data"]["sequence"] for p in app.receiver.received]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

    # Asleep, not dead: a burst of 50 requests wakes it, as one new deployment, and it answers as before.
    with ThreadPoolExecutor(max_workers=50) as pool:
        waking = list(pool.map(lambda _: httpx.post(f"{url}/score", json=small, headers=key, timeout=60), range(50)))
    assert {r.status_code for r in waking} == {503} and all(r.headers["Retry-After"] for r in waking)
    assert {r.json()["state"] for r in waking} <= {"waking", "deploying"}
    woken = store.get(run_id)
    assert woken.cycle == 1 and woken.endpoint_name != run.endpoint_name
    assert [p.name for p in (app.state_dir / "endpoints").iterdir()] == [woken.endpoint_name]  # one deployment
    assert app.receiver.wait_for("endpoint.waking")["data"]["cycle"] == 1
    wait_for(lambda: state(runs.DEPLOYED), 120, "deployed again")
    again = httpx.post(f"{url}/score", json=small, headers=key, timeout=60)
    assert again.status_code == 200 and again.json()["output"] == before
    assert [h["cycle"] for h in store.get(run_id).history if "cycle" in h] == [1]  # the cycle is in its history

    # No secret in any log (ours, the host's, the SDKs', the trainer's and server's), response or webhook.
    secrets = {"webhook secret": app.settings.webhook_secret, "function key": app.host.function_key,
               "master key": app.host.master_key, "storage key": AZURITE_KEY, "endpoint key": app.endpoint_key}
    texts = {"logs": caplog.text, "webhooks": json.dumps(app.receiver.received),
             "run record": json.dumps(store.get(run_id).public()), "score answer": answer.text}
    texts |= {str(p): p.read_text(errors="replace") for p in app.state_dir.rglob("*.log")}
    for what, secret in secrets.items():
        for where, text in texts.items():
            assert secret not in text, f"{what} found in {where}"


def test_bad_dataset_is_quarantined_with_its_report(app):
    rows = conversations(12).decode().splitlines()
    rows[6] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]})
    run_id = drop(app.settings, "bad.jsonl", ("\n".join(rows) + "\n").encode())
    rejected = app.receiver.wait_for("run.rejected", 30)
    assert rejected["data"]["run_id"] == run_id
    (error,) = rejected["data"]["report"]["errors"]
    assert error["line"] == 7 and error["code"] == "unknown_role" and error["field"] == "messages[1].role"
    quarantine = default_storage().blob_service.get_container_client(app.settings.quarantine_container)
    report = json.loads(quarantine.download_blob(f"{run_id}/bad.jsonl.report.json").readall())
    assert report["errors"][0]["line"] == 7
    assert runs.RunStore.from_settings(app.settings).get(run_id).state == runs.REJECTED
    assert not list(Path(app.state_dir).glob("jobs/*"))  # nothing was trained


def test_a_ready_deployment_is_finished_by_its_servers_event_not_by_the_sweep(app_without_sweeps, caplog):
    """No idle waits: the model server says it is ready and the run is deployed at once, the sweeper never having
    run; a duplicate event changes nothing; a wake is finished the same way."""
    app = app_without_sweeps
    caplog.set_level(logging.INFO)
    store = runs.RunStore.from_settings(app.settings)
    run_id = drop(app.settings, "sums.jsonl", conversations(16))

    def deployed(cycle: int = 0):
        run = store.find(run_id)
        assert run is None or run.state not in (runs.FAILED, runs.REJECTED), run.error
        return run if run is not None and run.state == runs.DEPLOYED and run.cycle == cycle else None

    def ready_to_deployed(run) -> float:
        """Seconds from the model server writing "ready" to the run being deployed."""
        ready_at = (app.state_dir / "endpoints" / run.endpoint_name / "state.json").stat().st_mtime
        return datetime.fromisoformat(run.deployed_at).timestamp() - ready_at

    run = wait_for(deployed, 240, "deployed")
    took = ready_to_deployed(run)
    print(f"ready -> deployed: {took:.3f} s")
    assert took < 5  # the next sweep is a year away
    key = {"x-functions-key": app.host.function_key}
    score = httpx.post(f"http://127.0.0.1:{app.port}/api/runs/{run_id}/score", json={"input_data": small_request()},
                       headers=key, timeout=60)
    assert score.status_code == 200

    # The event again, as Event Grid may deliver it: acknowledged, nothing changes, no second webhook.
    again = httpx.post(f"http://127.0.0.1:{app.port}/runtime/webhooks/EventGrid?functionName=job_events",
                       json=[deployment_ready_event(endpoint_name=run.endpoint_name, run_id=run_id)],
                       headers={"aeg-event-type": "Notification"}, timeout=30)
    assert again.status_code == 202
    assert store.get(run_id).history == run.history
    app.receiver.wait_for("endpoint.ready")

    # Put to sleep and woken: the new cycle's server says it is ready too.
    url = f"http://127.0.0.1:{app.port}/api/runs/{run_id}"
    assert httpx.post(f"{url}/undeploy", headers=key, timeout=60).status_code == 200
    assert httpx.post(f"{url}/deploy", headers=key, timeout=60).status_code in (200, 202)
    woken = wait_for(lambda: deployed(cycle=1), 120, "deployed again")
    print(f"wake: ready -> deployed: {ready_to_deployed(woken):.3f} s")
    assert ready_to_deployed(woken) < 5
    time.sleep(0.5)  # any webhook a duplicate might have queued
    assert [p["type"] for p in app.receiver.received].count("endpoint.ready") == 2  # one a cycle
    assert "Functions.job_events" in caplog.text  # (the host logs each invocation)
    assert "Functions.sweeper" not in caplog.text  # the sweeper never ran: the events did it all
