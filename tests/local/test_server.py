"""The local online endpoint, started as a subprocess on a model registered from a real run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from shared.events import DEPLOYMENT_READY, RunEvent
from tests.local.conftest import ROOT, EventRecorder
from tests.waiting import wait_for
from tunedrop.azurite import free_port

KEY = "test-key-0123456789abcdef"
ENDPOINT, RUN_ID = "td-sums-0123456789", "sums-0123456789ab"


def start_server(tmp_path, model_uri, tracking_uri, model_cache, name="server", extra_args=()):
    key_file = tmp_path / f"{name}.key"
    key_file.write_text(KEY + "\n")
    state_file = tmp_path / f"{name}.state.json"
    port = free_port()
    log = open(tmp_path / f"{name}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.backends.local.server", "--model-uri", model_uri, "--tracking-uri",
         tracking_uri, "--port", str(port), "--key-file", str(key_file), "--state-file", str(state_file),
         "--model-cache-dir", str(model_cache), *extra_args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None and not state_file.exists():
        time.sleep(0.1)
    return process, port, state_file


def request(port, path, body=None, key=None, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(trained_run, model_cache, tmp_path_factory):
    import mlflow

    tracking_uri = trained_run["job"]["tracking_uri"]
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)  # also sets MLFLOW_TRACKING_URI: put it back for the other tests
    version = mlflow.register_model(f"runs:/{trained_run['status']['mlflow_run_id']}/model", "sums-chat")
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    tmp_path = tmp_path_factory.mktemp("server")
    app = EventRecorder()  # stands in for the Functions host's Event Grid route
    process, port, state_file = start_server(tmp_path, f"models:/sums-chat/{version.version}", tracking_uri,
                                             model_cache, extra_args=["--events-url", app.url, "--endpoint-name",
                                                                      ENDPOINT, "--run-id", RUN_ID])
    log = tmp_path / "server.log"
    assert state_file.exists(), log.read_text()
    state = json.loads(state_file.read_text())
    assert state["state"] == "ready", log.read_text()
    yield {"process": process, "port": port, "state": state, "state_file": state_file, "log": log, "app": app}
    app.close()
    if process.poll() is None:
        process.kill()
        process.wait()


SCORE = {
    "input_data": {
        "input_string": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}],
        "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 12},
    },
    "params": {},
}


def test_ready_state_and_health(server):
    assert server["state"]["pid"] == server["process"].pid and server["state"]["port"] == server["port"]
    assert server["state"]["model_uri"].startswith("models:/sums-chat/")
    assert request(server["port"], "/health") == (200, {"status": "ready"})


def test_once_ready_it_tells_the_app_once_naming_its_endpoint_and_run(server):
    """The app finishes the run's deployment on this event instead of at its next sweep."""
    (post,) = wait_for(lambda: server["app"].posts, 30, "the ready event")
    assert post["headers"]["aeg-event-type"] == "Notification"
    (raw,) = post["body"]  # an Event Grid delivery: an array of events
    event = RunEvent.from_json(json.dumps(raw))
    assert event.event_type == DEPLOYMENT_READY and event.is_deployment_ready and not event.is_run_event
    assert (event.endpoint_name, event.tunedrop_run_id) == (ENDPOINT, RUN_ID)
    wait_for(lambda: "ready event delivered" in server["log"].read_text(), 10, "the log line")
    log = server["log"].read_text()
    assert "EventGrid" not in log and "functionName" not in log  # the URL (it could hold a key) is never logged
    time.sleep(0.5)
    assert len(server["app"].posts) == 1


def test_an_app_that_is_down_costs_the_ready_server_nothing(capfd):
    """A host that is down: two quick tries, logged, never raised; the app's sweep then finds the state file."""
    from shared.backends.local.server import say_ready

    started = time.monotonic()
    assert say_ready(f"http://127.0.0.1:{free_port()}/runtime/webhooks/EventGrid?code=s3cret", ENDPOINT, RUN_ID) is False
    assert time.monotonic() - started < 5
    logged = capfd.readouterr().err
    assert "ready event not delivered" in logged and "s3cret" not in logged


def test_score_answers_with_a_string(server):
    status, body = request(server["port"], "/score", SCORE, key=KEY)
    assert status == 200 and set(body) == {"output"} and isinstance(body["output"], str)
    greedy = {"input_data": {**SCORE["input_data"], "parameters": {"temperature": 0, "max_new_tokens": 8}}}
    first, second = (request(server["port"], "/score", greedy, key=KEY) for _ in range(2))
    assert first == second  # temperature 0: greedy, deterministic
    # The seed notebook's own request: input_string holds one conversation, `[test_df["messages"][0]]`.
    as_seed = {"input_data": {**greedy["input_data"], "input_string": [greedy["input_data"]["input_string"]]}}
    assert request(server["port"], "/score", as_seed, key=KEY) == first


UNAUTHORIZED = (401, {"error": "unauthorized", "code": "unauthorized"})


def test_score_needs_the_key(server):
    assert request(server["port"], "/score", SCORE) == UNAUTHORIZED
    assert request(server["port"], "/score", SCORE, key="wrong") == UNAUTHORIZED
    assert request(server["port"], "/v1/chat/completions", {"messages": []}, key=KEY[:-1]) == UNAUTHORIZED
    assert KEY not in server["log"].read_text()


@pytest.mark.parametrize("body, field", [
    ({"input_data": {"input_string": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}},
     "input_data.input_string[1].role must be one of system, user, assistant"),
    ({"input_data": {"input_string": [{"role": "user", "content": 5}]}}, "input_data.input_string[0].content"),
    ({"input_data": {"input_string": []}}, "input_data.input_string"),
    ({"input_data": {"input_string": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]}},
     "input_data.input_string holds 2 conversations: send one per request"),
    ({"input_data": {"input_string": [[{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]]}},
     "input_data.input_string[0][1].role"),
    ({"inputs": "hi"}, "input_data"),
    ({"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"top_p": 7}}},
     "input_data.parameters.top_p"),
    ({"input_data": {"input_string": [{"role": "user", "content": "hi"}], "parameters": {"max_new_tokens": "9"}}},
     "input_data.parameters.max_new_tokens"),
])
def test_bad_score_bodies_name_the_field(server, body, field):
    status, answer = request(server["port"], "/score", body, key=KEY)
    assert status == 400 and field in answer["error"] and answer["code"] == "bad_request"
    assert "Traceback" not in answer["error"]


def test_malformed_and_oversized_bodies(server):
    status, answer = request(server["port"], "/score", raw=b"{not json", key=KEY)
    assert (status, answer["code"]) == (400, "bad_request") and "JSON" in answer["error"]
    status, answer = request(server["port"], "/score", raw=b"x" * (1_048_576 + 1), key=KEY)
    assert (status, answer["code"]) == (413, "body_too_large")
    assert request(server["port"], "/nowhere", {}, key=KEY) == (404, {"error": "not found", "code": "unknown_route"})


def test_a_prompt_of_a_megabyte_is_refused_at_once_and_the_server_goes_on(server):
    """The user's report: a ~1 MB seed prompt held the server for minutes and every later request got 504."""
    huge = {"input_data": {"input_string": [{"role": "user", "content": "tell me more " * 80_000}],
                           "parameters": {"max_new_tokens": 50}}}
    raw = json.dumps(huge).encode()
    assert 1_000_000 < len(raw) <= 1_048_576
    started = time.monotonic()
    status, answer = request(server["port"], "/score", raw=raw, key=KEY)
    assert time.monotonic() - started < 2
    assert (status, answer["code"]) == (400, "prompt_too_long")
    assert "at least" in answer["error"] and "limit of 1998 prompt tokens" in answer["error"]
    assert "context window of 2048 tokens less the 50 to generate" in answer["error"]
    started = time.monotonic()
    small = {"input_data": {"input_string": [{"role": "user", "content": "What is 2 plus 3?"}],
                            "parameters": {"max_new_tokens": 5, "do_sample": False}}}
    assert request(server["port"], "/score", small, key=KEY)[0] == 200
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("route, body, field", [
    ("/score", {"input_data": {"input_string": [{"role": "user", "content": "hi"}],
                               "parameters": {"max_new_tokens": 100_000}}}, "input_data.parameters.max_new_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 513}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100_000},
     "max_completion_tokens"),
])
def test_asking_for_too_many_tokens_is_refused_not_clamped(server, route, body, field):
    status, answer = request(server["port"], route, body, key=KEY)
    assert (status, answer["code"]) == (400, "max_tokens_too_large")
    assert answer["error"].startswith(f"{field} is ") and "TUNEDROP_MAX_NEW_TOKENS is 512" in answer["error"]


def test_openai_chat_completions(server):
    status, body = request(server["port"], "/v1/chat/completions", {
        "model": "sums", "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
        "temperature": 0, "max_tokens": 6}, key=KEY)
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "sums"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    status, body = request(server["port"], "/v1/chat/completions", {"messages": [{"role": "user"}]}, key=KEY)
    assert status == 400 and body == {"error": "messages[0].content must be a string", "code": "bad_request",
                                      "field": "messages[0].content"}


def test_sigterm_stops_cleanly(server):
    server["process"].send_signal(signal.SIGTERM)
    assert server["process"].wait(timeout=30) == 0
    assert json.loads(server["state_file"].read_text())["state"] == "stopped"


def test_load_failure_is_reported(trained_run, model_cache, tmp_path):
    process, _, state_file = start_server(tmp_path, "models:/no-such-model/1", trained_run["job"]["tracking_uri"],
                                          model_cache, name="bad")
    assert process.wait(timeout=60) == 1
    state = json.loads(state_file.read_text())
    assert state["state"] == "failed" and state["error"] and "\n" not in state["error"]


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 0.0009])
def test_a_temperature_too_small_to_sample_with_decodes_greedily(temperature):
    """Sampling at 1e-38 overflowed the softmax (inf/nan probabilities): a 500 from the model server."""
    from shared.backends.local.server import parse_openai_request, parse_score_request

    body = {"input_data": {"input_string": [{"role": "user", "content": "hi"}],
                           "parameters": {"temperature": temperature, "do_sample": True}}}
    assert parse_score_request(body)[1]["do_sample"] is False
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": temperature}
    assert parse_openai_request(chat)[1]["do_sample"] is False
    assert parse_openai_request({**chat, "temperature": 0.7})[1]["do_sample"] is True
