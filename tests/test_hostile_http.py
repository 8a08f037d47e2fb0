"""Nothing a client sends gets a 5xx, an empty 500 or a hang (issue 15, item 4 and the route fuzzing).

Every HTTP route of the app, read from its blueprints, is driven through the real local host over HTTP
(on a real Azurite) and through the handlers as Azure calls them, with hostile bodies (deep nesting,
NaN, numbers that overflow, lone surrogates, invalid UTF-8, wrong types at every field, empty, huge)
and hostile path and query parts. The numbered cases of the issue come first, each as the user sent it.
"""

from __future__ import annotations

import copy
import http.client
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import function_app
from shared import api_keys, runs
from shared.runs import Run
from shared.storage import reset_default_storage
from tests.handlers import handler, http_request
from tunedrop.azurite import free_port
from tunedrop.host import LocalHost
from tunedrop.host.invoke import HTTP, index_functions
from tunedrop.local import PROJECT_ROOT

DEPLOYING = "chat-deploying-0123456789ab"
FAILED = "chat-failed-0123456789ab"
SEED = {"input_data": {"input_string": [{"role": "user", "content": "Hi?"}],
                       "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 20}}}
OPENAI = {"model": "x", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
          "temperature": 0.5, "top_p": 1, "max_tokens": 20, "stream": False, "n": 1}
PER_REQUEST_S = 5.0
API_KEY = "td_fuzz-key"


def http_routes() -> list[tuple[str, str, str]]:
    """(function name, method, route template) of every HTTP function the app registers."""
    return [(spec.name, method.upper(), spec.trigger["route"]) for spec in SPECS.values() if spec.kind == HTTP
            for method in spec.trigger.get("methods") or ["GET", "POST"]]


SPECS = {spec.name: spec for spec in index_functions(function_app.app)}  # as the host indexes them
ROUTES = http_routes()


@pytest.fixture(scope="module")
def app(azurite, tmp_path_factory):
    """The app's HTTP functions and job_events on the local host, with one deploying and one failed run."""
    state = tmp_path_factory.mktemp("hostile")
    env = {"TUNEDROP_STORAGE": azurite.connection_string, "TUNEDROP_TRAINING_CONTAINER": "hostile-training",
           "TUNEDROP_QUARANTINE_CONTAINER": "hostile-quarantine", "TUNEDROP_RUNS_TABLE": "hostileruns",
           "TUNEDROP_WEBHOOK_QUEUE": "hostile-webhooks", "TUNEDROP_JOB_EVENTS_QUEUE": "hostile-job-events",
           "TUNEDROP_STATE_DIR": str(state), "TUNEDROP_WEBHOOK_URLS": "", "TUNEDROP_BASE_MODEL": "tiny-random",
           "TUNEDROP_API_KEYS": api_keys.entry("fuzz", API_KEY)}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        reset_default_storage()
        from shared.pipeline import get_pipeline

        store = get_pipeline().store
        store.create(Run(DEPLOYING, state=runs.DEPLOYING, dataset_blob="d.jsonl", endpoint_name="td-x"))
        failed, _ = store.create(Run(FAILED, dataset_blob="f.jsonl"))
        store.transition(FAILED, runs.FAILED, error="It broke while validating.")
        names = sorted({name for name, _, _ in ROUTES} | {"job_events"})
        host = LocalHost(function_app.app, environ={**env}, port=free_port(), root=PROJECT_ROOT, state_dir=state,
                         poll_interval_s=5, functions=names)
        try:
            with host:
                yield host
        finally:  # a fuzzed cancel, undeploy or deploy may have started or stopped a (local) model server
            from shared.backends.local import LocalBackend
            from shared.settings import Settings

            LocalBackend(Settings.from_env()).stop_all()
        reset_default_storage()


def _deploying_again() -> None:
    """The deploying run as the fixture made it (a fuzzed cancel or undeploy moves it on)."""
    from shared.pipeline import get_pipeline

    table = get_pipeline().store._table
    table.delete_entity(runs.PARTITION, DEPLOYING)
    get_pipeline().store.create(Run(DEPLOYING, state=runs.DEPLOYING, dataset_blob="d.jsonl", endpoint_name="td-x"))


def send(host, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    """One raw request (the target is sent exactly as given); (status, headers, body, seconds)."""
    connection = http.client.HTTPConnection("127.0.0.1", host.port, timeout=30)
    started = time.monotonic()
    try:
        connection.request(method, target, body=body,
                           headers={"x-functions-key": host.function_key, "Authorization": f"Bearer {API_KEY}",
                                    "Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read(), time.monotonic() - started
    finally:
        connection.close()


def check_answer(status: int, headers: dict, body: bytes, seconds: float, what: str, json_errors: bool = False) -> None:
    """Bounded time, no 5xx (a 503 only with Retry-After), and an error body, when there is one, JSON naming it."""
    assert seconds < PER_REQUEST_S, f"{what}: took {seconds:.1f} s"
    assert status < 500 or (status == 503 and headers.get("Retry-After")), f"{what}: HTTP {status} {body[:300]!r}"
    if status >= 400 and (body or json_errors):
        doc = json.loads(body)
        error = doc.get("error")
        if isinstance(error, dict):  # the OpenAI-compatible routes: OpenAI's error shape
            assert isinstance(error.get("message"), str) and error["message"] and {"type", "param", "code"} <= set(error), \
                f"{what}: {body[:300]!r}"
        else:
            assert isinstance(error, str) and error, f"{what}: {body[:300]!r}"


def score_target(run_id: str) -> str:
    return f"/api/runs/{run_id}/score"


# -- the issue's cases, as the user sent them ----------------------------------------------------------

NUMBERED = [
    (b"[" * 100_000 + b"]" * 100_000, "nests arrays/objects more than 32 levels", None),
    (b'{"input_data": {"input_string": [{"role": "user", "content": "x"}], "parameters": {"temperature": NaN}}}',
     "NaN is not JSON", "input_data.parameters.temperature"),
    (b'{"input_data": {"input_string": [{"role": "user", "content": "x"}], "parameters": {"top_p": 1e999}}}',
     "overflows a double", "input_data.parameters.top_p"),
    (b'{"input_data": {"input_string": [{"role": "user", "content": "\\ud800"}]}}',
     "lone surrogate", "input_data.input_string[0].content"),
]


@pytest.mark.parametrize("body, says, field", NUMBERED, ids=["deep-nesting", "nan", "1e999", "lone-surrogate"])
def test_the_issues_bad_json_is_a_400_naming_what_and_where(app, body, says, field):
    status, headers, answer, seconds = send(app, "POST", score_target(DEPLOYING), body)
    assert status == 400 and seconds < 2, (status, answer)
    doc = json.loads(answer)
    assert says in doc["error"] and doc.get("field") == field, doc
    if field:
        assert field in doc["error"]


@pytest.mark.parametrize("method, template", [("POST", "/api/runs/{}/score"), ("POST", "/api/runs/{}/v1/chat/completions"),
                                              ("GET", "/api/runs/{}"), ("POST", "/api/runs/{}/retry")])
def test_a_run_id_with_an_encoded_slash_is_a_fast_404_on_every_run_route(app, method, template):
    for run_id in ("a%2Fb", "chat-0123456789ab%2f..%2F", "%2E%2E%2F%2E%2E%2Fruns"):
        status, _, answer, seconds = send(app, method, template.format(run_id), json.dumps(SEED).encode())
        assert status == 404 and seconds < 1, (run_id, status, seconds, answer)
        doc = json.loads(answer)
        if "/v1/" in template:  # the per-run alias of /v1/chat/completions answers in OpenAI's error shape
            doc = {"field": doc["error"]["param"], "error": doc["error"]["message"]}
        assert doc["field"] == "run_id" and "a run id is lowercase letters, digits and hyphens" in doc["error"]


def test_the_host_keeps_an_encoded_slash_in_a_route_value_as_aspnet_does():
    from tunedrop.host.http import unquote_route_value

    assert unquote_route_value("a%2Fb%20c%2fd%41") == "a%2Fb c%2fdA"


# -- fuzzing every route -------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


@st.composite
def wrong_types(draw) -> bytes:
    """A valid request of either format with one field, at any depth, replaced by any JSON value."""
    doc = copy.deepcopy(draw(st.sampled_from([SEED, OPENAI])))
    path = draw(st.sampled_from(list(_paths(doc))[1:]))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = draw(json_values)
    return json.dumps(doc).encode()


HOSTILE_BODIES = [
    b"", b"  \n", b"null", b"[]", b'"text"', b"1", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b'{"a": "\xc3\x28"}',
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 40 + b"1" + b"}" * 40, b'{"messages": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]',
    b'{"input_data": NaN}', b'{"messages": Infinity}', b"-Infinity", b'{"temperature": 1e999, "messages": []}',
    b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"n": 123456789012345678901234567890}', b'{"\\udfff": 1}',
    b'{"messages": [{"role": "user", "content": "\\ud800\\u0000"}]}', b'{"a": 1, "a": 2}', b'{"a": "x\\', b"{" * 5,
    b'{"messages": [{"role": "user", "content": "' + b"a" * 1_040_000 + b'"}]}',  # huge, under the limit
    b"x" * 1_048_577,  # one byte over
]
bodies = st.one_of(st.sampled_from(HOSTILE_BODIES), wrong_types(), json_values.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=64), st.sampled_from([json.dumps(SEED).encode(), json.dumps(OPENAI).encode()]))
HOSTILE_SEGMENTS = ["a%2Fb", "a%2fb", "..%2F..%2Fx", "%2e%2e", "..", ".", "%00", "a%00b", "%ZZ", "%C0%AF", "%FF%FE",
                    "a%5Cb", "a%23b", "a%3Fb", "A" * 3000, "x'y", "x%27%20or%20%271%27%3D%271", "%20", "%E2%80%AE",
                    "chat-0123456789ab%2F", "CHAT-0123456789AB", "-", "a" * 65, "%F0%9F%98%80"]
segments = st.one_of(st.sampled_from([DEPLOYING, FAILED]), st.sampled_from(HOSTILE_SEGMENTS),
                     st.text(max_size=40).map(lambda t: quote(t, safe="")),
                     st.from_regex(r"[a-z0-9-]{1,70}", fullmatch=True))
queries = st.sampled_from(["", "?", "?code=", "?code=wrong", "?x=%ZZ", "?a=1&a=2", "?q=" + "x" * 4000, "?%00=%00"])
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


def _target(template: str, segment: str) -> str:
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + segment + path[end + 1:]
    return f"/api/{path}"


def test_the_fuzz_covers_every_http_route_of_the_app():
    assert {name for name, _, _ in ROUTES} == {"score", "chat_completions", "run_status", "retry_run", "list_runs",
                                               "cancel_run", "deploy_run", "undeploy_run", "list_models", "get_model",
                                               "v1_chat_completions", "run_progress", "status_page"}


@FUZZ
@given(route=st.sampled_from(ROUTES), segment=segments, query=queries, body=bodies,
       method=st.sampled_from([None, None, None, "PUT", "DELETE", "GET", "POST"]))
def test_no_route_answers_5xx_or_hangs_whatever_it_is_sent(app, route, segment, query, body, method):
    name, route_method, template = route
    target = _target(template, segment) + query
    answer = send(app, method or route_method, target, body)
    check_answer(*answer, what=f"{name} {method or route_method} {target[:80]} body={body[:60]!r}")


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(route=st.sampled_from(ROUTES), run_id=st.one_of(st.text(max_size=80), st.sampled_from(
    ["a/b", "a%2Fb", "../x", "", " ", "\x00", DEPLOYING, FAILED, "a" * 2000, "x\ud800"])), body=bodies)
def test_the_handlers_as_azure_calls_them_answer_json_never_5xx(app, route, run_id, body):
    name, method, template = route
    params = {key: run_id for key in ("run_id", "model") if f"{{{key}}}" in template}
    request = http_request(method, f"http://localhost/api/{template}", params, body,
                           {"Authorization": f"Bearer {API_KEY}"})
    started = time.monotonic()
    response = handler(name)(request)
    check_answer(response.status_code, dict(response.headers), response.get_body(), time.monotonic() - started,
                 what=f"{name} run_id={run_id[:40]!r} body={body[:60]!r}", json_errors=True)


WRONG = [None, True, False, 0, -1, 2**64, 1.5, -0.0, "", "x", [], {}, [[]], [{}], {"a": None}]


@pytest.mark.parametrize("name, doc", [("score", SEED), ("chat_completions", OPENAI)])
def test_every_field_of_a_request_with_every_wrong_type_is_a_400_naming_it_or_taken(app, name, doc):
    _deploying_again()  # the fuzz before may have cancelled it
    for path in list(_paths(doc))[1:]:
        for value in WRONG:
            changed = copy.deepcopy(doc)
            target = changed
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value
            request = http_request("POST", "http://localhost/x", {"run_id": DEPLOYING}, json.dumps(changed).encode())
            response = handler(name)(request)
            where = ".".join(map(str, path))
            assert response.status_code in (400, 503), (where, value, response.get_body())
            if response.status_code == 400:  # 503: taken, and the run is still deploying
                error = json.loads(response.get_body())
                named = error["error"]["param"] if name == "chat_completions" else error.get("field")
                assert named, (where, value, error)


# -- the host's own routes: Event Grid webhook and admin API --------------------------------------------

_event = st.fixed_dictionaries({"id": st.text(max_size=10), "eventType": st.text(max_size=30), "subject": st.text(max_size=30),
                                "topic": st.sampled_from(["", "/subscriptions/x", "other"]), "data": json_values,
                                "eventTime": st.sampled_from(["", "2024-05-01T10:00:00Z", "not a time", "9999-99-99"]),
                                "dataVersion": st.text(max_size=3)})
grid_bodies = st.one_of(st.sampled_from(HOSTILE_BODIES[:-2]), st.lists(_event, max_size=3).map(lambda e: json.dumps(e).encode()),
                        json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(body=grid_bodies, kind=st.sampled_from(["Notification", "SubscriptionValidation", "Unsubscribe", "bogus"]),
       admin=st.booleans())
def test_the_event_grid_and_admin_routes_refuse_bad_bodies_with_4xx(app, body, kind, admin):
    if admin:
        answer = send(app, "POST", "/admin/functions/job_events", body, {"x-functions-key": app.master_key})
    else:
        answer = send(app, "POST", "/runtime/webhooks/EventGrid?functionName=job_events", body, {"aeg-event-type": kind})
    check_answer(*answer, what=f"{'admin' if admin else kind} body={body[:60]!r}")


@pytest.mark.parametrize("headers, body, status", [
    ({"Content-Length": "abc"}, None, 400),
    ({"Content-Length": "-5"}, None, 400),
    ({"Content-Length": str(200 * 1024 * 1024)}, None, 413),
    ({"Transfer-Encoding": "chunked"}, b"zz\r\nhello\r\n0\r\n\r\n", 400),
])
def test_the_host_refuses_bad_framing_with_4xx_at_once(app, headers, body, status):
    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        connection.putrequest("POST", score_target(DEPLOYING))
        connection.putheader("x-functions-key", app.function_key)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.status == status and "error" in json.loads(response.read())
    finally:
        connection.close()


def test_the_routes_fuzzed_exist_in_the_host(app):
    assert {route.spec.name for route in app.routes} == {name for name, _, _ in ROUTES}
    assert Path(PROJECT_ROOT, "function_app.py").exists()


@pytest.mark.parametrize("name", ["zero\u200bwidth.jsonl", "soft\xadhyphen.jsonl", "bom\ufeff.jsonl",
                                  "joiner\u2060.jsonl", "rtl\u202eldoc.jsonl", "tab\tname.jsonl"])
def test_names_that_read_as_another_are_refused(name):
    from shared.pipeline.ingest import blob_name_problem

    assert blob_name_problem(name, 512)  # a zero-width space slipped through and was read as a duplicate
    assert blob_name_problem("données-日本語-😀.jsonl", 512) is None  # non-ASCII is fine
