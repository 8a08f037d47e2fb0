"""Scoring: check the request, route it to the run's endpoint, map what can go wrong to clear answers.

Accepts the seed's Azure ML request (`input_data.input_string` + `parameters`; `input_string` as a
flat list of messages or as the seed's list holding one conversation, see shared/chat.py) and the
OpenAI chat-completions request, so every OpenAI client works. Nothing heavy is imported here: this
is on the hot path of the `score` function.

What reaches an Azure ML endpoint: a seed request is forwarded as it came; an OpenAI request is
translated into the seed's own request, `{"input_data": {"input_string": [[messages]],
"parameters": {...}}, "params": {}}` (:func:`openai_to_seed`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from shared import runs
from shared.backends.base import BackendError
from shared.chat import ChatRequestError, check_openai_request, check_sampling, conversation, messages
from shared.request_json import RequestJSONError, loads

log = logging.getLogger("tunedrop.scoring")

#: Defaults of TUNEDROP_MAX_REQUEST_BYTES and TUNEDROP_MAX_JSON_DEPTH (shared/settings.py).
MAX_BODY_BYTES = 1_048_576
MAX_JSON_DEPTH = 32
#: What a run id looks like: tunedrop makes `<name>-<12 hex digits>` (shared.runs.run_id_for); anything
#: else names no run and is answered 404 before any storage call (a '/' or '%2F' in a table key made
#: Azurite answer 500, which the SDK retried for ~5 s).
RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
#: How often a scored endpoint's last-use time is written (the idle timer needs minutes, not ms).
LAST_USE_WRITE_EVERY = timedelta(seconds=30)
SEED_FORMAT = "azureml"
OPENAI_FORMAT = "openai"


@dataclass
class ScoreResponse:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


class ScoreRequestError(ValueError):
    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field

    def body(self) -> dict:
        return {"error": str(self), **({"field": self.field} if self.field else {})}


def check_run_id(run_id) -> None:
    """Raises ScoreRequestError (404) for a run id of a shape no run has, before any storage call."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        shown = repr(run_id if not isinstance(run_id, str) or len(run_id) <= 80 else run_id[:80] + "...")
        raise ScoreRequestError(f"No run {shown}: a run id is lowercase letters, digits and hyphens, "
                                "e.g. chat-sample-b2806c36574b (`tunedrop status` lists them).", 404, "run_id")


def parse_request(body: bytes, fmt: str, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The request as strict JSON (shared/request_json.py), checked; raises ScoreRequestError naming the
    field at fault."""
    try:
        data = loads(body or b"", max_bytes=max_bytes, max_depth=max_depth)
    except RequestJSONError as exc:
        raise ScoreRequestError(str(exc), exc.status, exc.field) from None
    if not isinstance(data, dict):
        raise ScoreRequestError(f"Request body must be a JSON object, not {_kind(data)}.")
    try:
        if fmt == OPENAI_FORMAT:
            check_openai_request(data)
            return data
        input_data = data.get("input_data")
        if not isinstance(input_data, dict):
            raise ScoreRequestError("input_data must be an object with input_string and parameters.", field="input_data")
        conversation(input_data.get("input_string"))
        parameters = input_data.get("parameters", {})
        if parameters is not None:
            check_sampling(parameters, "input_data.parameters", ("max_new_tokens",))
    except ChatRequestError as exc:
        raise ScoreRequestError(f"{exc}.", field=exc.field) from None
    return data


def _kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


class Scorer:
    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._client = None
        self._client_lock = threading.Lock()
        self._last_write: dict[str, float] = {}

    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(timeout=self.pipeline.settings.score_timeout_s)
            return self._client

    def score(self, run_id: str, body: bytes, fmt: str = SEED_FORMAT) -> ScoreResponse:
        settings = self.pipeline.settings
        try:
            check_run_id(run_id)
            request = parse_request(body, fmt, settings.max_request_bytes, settings.max_json_depth)
        except ScoreRequestError as exc:
            return ScoreResponse(exc.status, exc.body())
        run = self.pipeline.store.find(run_id)
        if run is None:
            return ScoreResponse(404, {"error": f"No run {run_id}."})
        if run.state == runs.TORN_DOWN:  # asleep: this request wakes it (of many at once, one wakes it)
            try:
                woken = self.pipeline.wake(run_id, "score")
            except BackendError as exc:
                return ScoreResponse(503, {"error": f"Run {run_id}: could not wake its endpoint ({exc.code}); "
                                           "try again.", "state": runs.TORN_DOWN}, {"Retry-After": "30"})
            if woken.state == runs.DEPLOYING:
                return ScoreResponse(503, {"error": f"Run {run_id} was asleep (its idle endpoint was torn down); it is "
                                           "waking: a new endpoint is deploying. Try again shortly.",
                                           "state": "waking", "cycle": woken.cycle}, {"Retry-After": "30"})
            run = woken
        if run.state == runs.DEPLOYING:
            return ScoreResponse(503, {"error": f"Run {run_id}: endpoint is still deploying.", "state": run.state},
                                 {"Retry-After": "30"})
        if run.state != runs.DEPLOYED:
            return ScoreResponse(409, {"error": f"Run {run_id} is {run.state}; only a deployed run can score.",
                                       "state": run.state})
        try:
            target = self.pipeline.backend.scoring_target(run.endpoint_name)
        except BackendError as exc:
            return ScoreResponse(503, {"error": f"Run {run_id}: endpoint unavailable ({exc.code})."}, {"Retry-After": "30"})
        translate = fmt == OPENAI_FORMAT and target.format == "azureml"
        if translate:
            url, payload = target.url, openai_to_seed(request)
        else:
            url = target.url if fmt == SEED_FORMAT else target.url.rsplit("/", 1)[0] + "/v1/chat/completions"
            payload = request
        response = self._forward(url, target.key, payload, target.headers)
        if response.status == 401:
            forget = getattr(self.pipeline.backend, "forget_key", None)
            if forget is not None:
                forget(run.endpoint_name)  # keys were regenerated: fetch them again next time
            response = ScoreResponse(503, {"error": f"Run {run_id}: the endpoint refused its key; try again."},
                                     {"Retry-After": "5"})
        if response.status == 200:
            if translate:
                response = ScoreResponse(200, seed_to_openai(response.body, request))
            self._touch(run)
        return response

    def _forward(self, url: str, key: str, request: dict, headers: dict | None = None) -> ScoreResponse:
        import httpx

        for attempt in (1, 2):
            try:
                reply = self.client.post(url, json=request,
                                         headers={**(headers or {}), "Authorization": f"Bearer {key}"})
                break
            except httpx.TimeoutException:
                return ScoreResponse(504, {"error": "The endpoint did not answer in time."}, {"Retry-After": "10"})
            except httpx.TransportError:
                # A pooled keep-alive connection the endpoint had already closed fails before any answer:
                # once more, on a fresh connection; a second failure means the endpoint is not there.
                if attempt == 2:
                    return ScoreResponse(503, {"error": "The endpoint is not reachable."}, {"Retry-After": "30"})
        if reply.status_code == 200:
            try:
                return ScoreResponse(200, reply.json())
            except ValueError:  # not JSON (or not UTF-8): the endpoint's fault, never a crash of ours
                log.warning("endpoint answered HTTP 200 with a body that is not JSON")
                return ScoreResponse(502, {"error": "The endpoint answered with a body that is not JSON."},
                                     {"Retry-After": "10"})
        if reply.status_code == 429:
            return ScoreResponse(429, _error_body(reply, "The endpoint is busy."),
                                 {"Retry-After": reply.headers.get("Retry-After", "5")})
        if reply.status_code == 400:
            return ScoreResponse(400, _error_body(reply, "Bad request."))
        if reply.status_code in (401, 403):
            return ScoreResponse(401, {"error": "The endpoint refused the key."})
        log.warning("endpoint answered HTTP %d", reply.status_code)
        if reply.status_code == 504 and _error_body(reply, "").get("code") == "generation_timeout":
            # the model server stopped a generation at its time limit: say which limit, as it did
            return ScoreResponse(504, _error_body(reply, ""), {"Retry-After": "10"})
        if reply.status_code in (503, 504):
            return ScoreResponse(503, {"error": f"The endpoint is unavailable (HTTP {reply.status_code})."},
                                 {"Retry-After": reply.headers.get("Retry-After", "10")})
        return ScoreResponse(502, {"error": f"The endpoint failed (HTTP {reply.status_code})."}, {"Retry-After": "10"})

    def _touch(self, run) -> None:
        now = time.monotonic()
        if now - self._last_write.get(run.run_id, -1e9) < LAST_USE_WRITE_EVERY.total_seconds():
            return
        self._last_write[run.run_id] = now
        try:
            self.pipeline.store.update(run.run_id, last_scored_at=runs.utcnow().isoformat())
        except runs.RunStoreError as exc:
            log.warning("run %s: could not record last use: %s", run.run_id, exc)


#: The seed's generation parameters (step 10), the defaults of a translated OpenAI request.
SEED_PARAMETERS = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}


def openai_to_seed(request: dict) -> dict:
    """An OpenAI chat-completions request as the seed's Azure ML request."""
    parameters = dict(SEED_PARAMETERS)
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("max_new_tokens", "max_tokens"),
                         ("max_new_tokens", "max_completion_tokens")):
        if isinstance(request.get(theirs), (int, float)) and not isinstance(request.get(theirs), bool):
            parameters[ours] = request[theirs]
    if parameters.get("temperature") == 0:
        parameters["do_sample"] = False
    # The seed's own shape: a list holding the one conversation (shared/chat.py).
    return {"input_data": {"input_string": [messages(request["messages"], "messages")], "parameters": parameters},
            "params": {}}


def seed_to_openai(answer, request: dict) -> dict:
    """The Azure ML endpoint's answer (`{"output": text}`, or `[{"0": text}]`) as an OpenAI chat completion."""
    import uuid

    if isinstance(answer, dict) and "output" in answer:
        text = answer["output"]
    elif isinstance(answer, list) and answer and isinstance(answer[0], dict):
        text = next(iter(answer[0].values()), "")
    else:
        text = answer
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": str(request.get("model") or "tunedrop"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": str(text)}, "finish_reason": "stop"}]}


def _error_body(reply, default: str) -> dict:
    """The endpoint's own error (its message, and its code where it gives one: tunedrop's model servers
    name the limit and the setting), or ``default``; never more than those two fields."""
    try:
        data = reply.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return {"error": default}
    given = data.get("code")
    return {"error": data["error"][:2000], **({"code": given} if isinstance(given, str) else {})}


_scorers: dict[int, Scorer] = {}


def get_scorer(pipeline) -> Scorer:
    """One Scorer (and HTTP connection pool) per pipeline, per process."""
    scorer = _scorers.get(id(pipeline))
    if scorer is None:
        scorer = _scorers[id(pipeline)] = Scorer(pipeline)
    return scorer
