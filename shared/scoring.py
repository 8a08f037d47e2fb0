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

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from shared import runs
from shared.backends.base import BackendError
from shared.chat import ChatRequestError, conversation, messages

log = logging.getLogger("tunedrop.scoring")

MAX_BODY_BYTES = 1_048_576
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
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, fmt: str) -> dict:
    """The request as JSON, checked; raises ScoreRequestError naming the field at fault."""
    if len(body) > MAX_BODY_BYTES:
        raise ScoreRequestError(f"Request body over {MAX_BODY_BYTES} bytes.", status=413)
    try:
        data = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScoreRequestError(f"Body is not valid JSON: {getattr(exc, 'msg', 'bad encoding')}.") from None
    if not isinstance(data, dict):
        raise ScoreRequestError("Body must be a JSON object.")
    try:
        if fmt == OPENAI_FORMAT:
            messages(data.get("messages"), "messages")
            return data
        input_data = data.get("input_data")
        if not isinstance(input_data, dict):
            raise ScoreRequestError("input_data must be an object with input_string and parameters.")
        conversation(input_data.get("input_string"))
    except ChatRequestError as exc:
        raise ScoreRequestError(f"{exc}.") from None
    parameters = input_data.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ScoreRequestError("input_data.parameters must be an object.")
    return data


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
        try:
            request = parse_request(body, fmt)
        except ScoreRequestError as exc:
            return ScoreResponse(exc.status, {"error": str(exc)})
        run = self.pipeline.store.find(run_id)
        if run is None:
            return ScoreResponse(404, {"error": f"No run {run_id}."})
        if run.state == runs.DEPLOYING:
            return ScoreResponse(503, {"error": f"Run {run_id}: endpoint is still deploying."}, {"Retry-After": "30"})
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
            return ScoreResponse(200, reply.json())
        if reply.status_code == 429:
            return ScoreResponse(429, {"error": "The endpoint is busy."}, {"Retry-After": reply.headers.get("Retry-After", "5")})
        if reply.status_code == 400:
            return ScoreResponse(400, {"error": _error_text(reply)})
        if reply.status_code in (401, 403):
            return ScoreResponse(401, {"error": "The endpoint refused the key."})
        log.warning("endpoint answered HTTP %d", reply.status_code)
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


def _error_text(reply) -> str:
    try:
        return str(reply.json().get("error", "Bad request."))
    except ValueError:
        return "Bad request."


_scorers: dict[int, Scorer] = {}


def get_scorer(pipeline) -> Scorer:
    """One Scorer (and HTTP connection pool) per pipeline, per process."""
    scorer = _scorers.get(id(pipeline))
    if scorer is None:
        scorer = _scorers[id(pipeline)] = Scorer(pipeline)
    return scorer
