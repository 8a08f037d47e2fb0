"""The local host's parsing: host.json, route templates, blob paths, and indexing real apps."""

from __future__ import annotations

import json

import azure.functions as func
import pytest

from tunedrop.azurite import PROJECT_ROOT
from tunedrop.host import HostConfig, HostConfigError, LocalHost, load_app
from tunedrop.host.blob import compile_blob_path
from tunedrop.host.config import parse_timespan, resolve_settings
from tunedrop.host.http import Route
from tunedrop.host.invoke import FunctionSpec


def test_host_json_defaults_and_values(tmp_path):
    assert HostConfig.load(tmp_path) == HostConfig()
    assert HostConfig().max_dequeue_count == 5 and HostConfig().visibility_timeout_s == 0
    assert HostConfig().message_encoding == "base64" and HostConfig().route_prefix == "api"
    (tmp_path / "host.json").write_text(json.dumps({
        "version": "2.0", "functionTimeout": "00:10:00",
        "extensions": {"http": {"routePrefix": "/v1/"}, "queues": {"maxDequeueCount": 2, "visibilityTimeout": "00:00:30",
                                                                     "batchSize": 4, "messageEncoding": "none"}}}))
    assert HostConfig.load(tmp_path) == HostConfig(max_dequeue_count=2, visibility_timeout_s=30, batch_size=4,
                                                   message_encoding="none", route_prefix="v1", function_timeout_s=600)
    assert parse_timespan("1.00:00:01") == 86401 and parse_timespan("-1") is None
    with pytest.raises(HostConfigError):
        parse_timespan("5 minutes")


def test_setting_references():
    assert resolve_settings("%C%/{name}", {"C": "box"}, "f") == "box/{name}"
    with pytest.raises(HostConfigError, match="MISSING"):
        resolve_settings("%MISSING%", {}, "f")


def _route(template: str) -> Route:
    spec = FunctionSpec(name="f", trigger={"type": "httpTrigger", "name": "req", "route": template}, func=print, param="req")
    return Route(spec, "api")


def test_route_templates():
    assert _route("runs/{run_id}/score").match("/api/runs/r%201/score") == {"run_id": "r 1"}
    assert _route("runs/{run_id}/score").match("/api/runs/a/b/score") is None
    assert _route("files/{*path}").match("/api/files/a/b.txt") == {"path": "a/b.txt"}
    assert _route("page/{n:int=1}").match("/api/page") == {"n": "1"}
    assert _route("page/{n:int=1}").match("/api/page/x") is None
    assert _route("Runs").match("/api/runs/") == {}


def test_blob_path_patterns():
    regex, prefix = compile_blob_path("{name}")
    assert prefix == "" and regex.fullmatch("a/b.txt")
    regex, prefix = compile_blob_path("in/{name}.csv")
    assert prefix == "in/" and regex.fullmatch("in/x.csv") and not regex.fullmatch("in/x.txt")


def test_unsupported_bindings_are_refused(tmp_path):
    app = func.FunctionApp()

    @app.queue_trigger(arg_name="msg", queue_name="q", connection="C")
    @app.queue_output(arg_name="out", queue_name="other", connection="C")
    def relay(msg: func.QueueMessage, out: func.Out[str]) -> None:
        pass

    with pytest.raises(HostConfigError, match="queue"):
        LocalHost(app, root=tmp_path, state_dir=tmp_path, environ={})


def test_the_project_function_app_is_indexed(tmp_path):
    app = load_app("function_app", PROJECT_ROOT)
    environ = {"TUNEDROP_STORAGE": "UseDevelopmentStorage=true", "TUNEDROP_TRAINING_CONTAINER": "training-data",
               "TUNEDROP_WEBHOOK_QUEUE": "webhooks", "TUNEDROP_JOB_EVENTS_QUEUE": "job-events",
               "TUNEDROP_SWEEP_SCHEDULE": "0 */1 * * * *"}
    host = LocalHost(app, root=PROJECT_ROOT, state_dir=tmp_path, environ=environ, port=0)
    kinds = {spec.kind for spec in host.functions.values()}
    assert {"httpTrigger", "blobTrigger", "queueTrigger", "timerTrigger", "eventGridTrigger"} <= kinds
    host.stop()  # never started: nothing to join
