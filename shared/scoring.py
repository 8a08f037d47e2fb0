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
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterator

from shared import runs
from shared.backends.base import BackendError
from shared.chat import ChatRequestError, check_sampling, conversation
from shared.openai_api import (
    ChatRequest,
    OpenAIError,
    as_openai_error,
    cut_at_stop,
    parse_chat_request,
    resolve_model,
)
from shared.request_json import RequestJSONError, loads

log = logging.getLogger("tunedrop.scoring")

#: Defaults of TUNEDROP_MAX_REQUEST_BYTES and TUNEDROP_MAX_JSON_DEPTH (shared/settings.py).
MAX_BODY_BYTES = 1_048_576
MAX_JSON_DEPTH = 32
#: What a run id looks like: tunedrop makes `<name>-<12 hex digits>` (shared.runs.run_id_for); anything
#: else names no run and is answered 404 before any storage call (a '/' or '%2F' in a table key made
#: Azurite answer 500, which the SDK retried for ~5 s).
RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
#: How often a scored endpoint's last-use time is written at most (the idle timer needs minutes, not ms; a
#: shorter TUNEDROP_IDLE_MINUTES writes it more often, see Scorer._touch).
LAST_USE_WRITE_EVERY = timedelta(seconds=30)


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


def parse_request(body: bytes, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The request as strict JSON (shared/request_json.py), checked; raises ScoreRequestError naming the
    field at fault."""
    try:
        data = loads(body or b"", max_bytes=max_bytes, max_depth=max_depth)
    except RequestJSONError as exc:
        raise ScoreRequestError(str(exc), exc.status, exc.field) from None
    if not isinstance(data, dict):
        raise ScoreRequestError(f"Request body must be a JSON object, not {_kind(data)}.")
    try:
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

    def score(self, run_id: str, body: bytes) -> ScoreResponse:
        """The seed's Azure ML request against ``run_id``'s endpoint, forwarded as it came."""
        settings = self.pipeline.settings
        try:
            check_run_id(run_id)
            request = parse_request(body, settings.max_request_bytes, settings.max_json_depth)
        except ScoreRequestError as exc:
            return ScoreResponse(exc.status, exc.body())
        found = self._serving(self.pipeline.store.find(run_id), run_id)
        if isinstance(found, ScoreResponse):
            return found
        run, target = found
        response = self._checked_key(run, self._forward(target.url, target.key, request, target.headers))
        if response.status == 200:
            self._touch(run)
        return response

    def chat(self, body: bytes, run_id: str | None = None) -> "ScoreResponse | ChatStream":
        """An OpenAI chat-completions request, for the run ``run_id`` (the per-run route) or for the run its
        ``model`` names (``/v1``); every error in OpenAI's shape; a ``ChatStream`` when it asks to stream."""
        settings = self.pipeline.settings
        try:
            try:
                data = loads(body or b"", max_bytes=settings.max_request_bytes, max_depth=settings.max_json_depth)
                request = parse_chat_request(data, model_required=run_id is None)
            except RequestJSONError as exc:
                raise OpenAIError(exc.status, str(exc), param=exc.field, code="invalid_body") from None
            except ChatRequestError as exc:
                raise OpenAIError(400, f"{exc}.", param=exc.field, code="invalid_request") from None
            run = self._run_named(run_id or request.model)
            found = self._serving(run, run.run_id)
            if isinstance(found, ScoreResponse):
                raise as_openai_error(found.status, found.body, found.headers)
            run, target = found
            if target.format == "azureml":
                answer = self._chat_azureml(target, request)
            else:
                url = target.url.rsplit("/", 1)[0] + "/v1/chat/completions"
                forward = self._open_stream if request.stream else self._forward
                answer = forward(url, target.key, data, target.headers)
            if isinstance(answer, ScoreResponse):
                answer = self._checked_key(run, answer)
                if answer.status != 200:
                    raise as_openai_error(answer.status, answer.body, answer.headers)
            self._touch(run)
            return answer
        except OpenAIError as exc:
            return ScoreResponse(exc.status, exc.body(), exc.headers)

    def _run_named(self, name: str):
        """The run a request names (a run id, or a model id of GET /v1/models); OpenAIError 404 if none."""
        run = self.pipeline.store.find(name) if RUN_ID.fullmatch(name or "") else None
        if run is None and name:  # a model id or a bare model name (which looks like a run id too)
            run = resolve_model(self.pipeline.store.list(), name)
        if run is None:
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise OpenAIError(404, f"The model {shown!r} does not exist: GET /v1/models lists the fine-tuned models "
                              "(ids are the registered model's name:version; a run id works too).",
                              param="model", code="model_not_found")
        return run

    def _serving(self, run, run_id: str):
        """(run, its scoring target) when the run can score now; else the answer saying why (tunedrop's shape).
        A sleeping run is woken by this request (of many at once, one wakes it) and answers 503 while it wakes."""
        if run is None:
            return ScoreResponse(404, {"error": f"No run {run_id}."})
        if run.state == runs.TORN_DOWN:
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
        if run.state == runs.REGISTERED and run.gate and not run.gate.get("passed"):
            from shared.pipeline.gate import describe

            return ScoreResponse(409, {"error": f"Run {run_id} was held back by the quality gate ({describe(run.gate)}); "
                                       f"deploy it anyway with `tunedrop deploy {run_id} --force`.", "state": "gated"})
        if run.state != runs.DEPLOYED:
            return ScoreResponse(409, {"error": f"Run {run_id} is {run.state}; only a deployed run can score.",
                                       "state": run.state})
        try:
            return run, self.pipeline.backend.scoring_target(run.endpoint_name)
        except BackendError as exc:
            return ScoreResponse(503, {"error": f"Run {run_id}: endpoint unavailable ({exc.code})."}, {"Retry-After": "30"})

    def _checked_key(self, run, response: ScoreResponse) -> ScoreResponse:
        """A 401 from the endpoint means its keys were regenerated: forget ours, fetch them again next time."""
        if response.status != 401:
            return response
        forget = getattr(self.pipeline.backend, "forget_key", None)
        if forget is not None:
            forget(run.endpoint_name)
        return ScoreResponse(503, {"error": f"Run {run.run_id}: the endpoint refused its key; try again."},
                             {"Retry-After": "5"})

    def _chat_azureml(self, target, request: ChatRequest) -> "ScoreResponse | ChatStream":
        """An Azure ML endpoint takes the seed's request only: translated there and back; its answer comes
        whole, so a stream is that answer as one chunk. It returns no token counts, so there is no usage."""
        if request.seed is not None:
            raise OpenAIError(400, "seed is not supported by this model's Azure ML endpoint (its scoring script "
                              "takes no seed); leave it out.", param="seed", code="unsupported_parameter")
        answer = self._forward(target.url, target.key, openai_to_seed(request), target.headers)
        if answer.status != 200:
            return answer
        completion = seed_to_openai(answer.body, request)
        if not request.stream:
            return ScoreResponse(200, completion)
        return ChatStream(_as_events(completion))

    def _open_stream(self, url: str, key: str, request: dict, headers: dict | None = None) -> "ScoreResponse | ChatStream":
        """The endpoint's Server-Sent Events, passed on as they arrive; an error before the stream starts is
        answered as :meth:`_forward` answers it."""
        import httpx

        reply = self._send(url, key, request, headers, stream=True)
        if isinstance(reply, ScoreResponse):
            return reply
        if reply.status_code != 200 or not reply.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                reply.read()
            finally:
                reply.close()
            return self._answer_of(reply)

        def relay():
            try:
                yield from reply.iter_raw()
            except httpx.HTTPError as exc:  # the endpoint went away mid-stream: say so in the stream, as OpenAI does
                log.warning("stream from the endpoint broke off: %s", type(exc).__name__)
                error = OpenAIError(502, "The endpoint's stream broke off.", code="stream_broken")
                yield f"data: {json.dumps(error.body())}\n\n".encode()

        return ChatStream(relay(), reply.close)

    def _forward(self, url: str, key: str, request: dict, headers: dict | None = None) -> ScoreResponse:
        reply = self._send(url, key, request, headers)
        return reply if isinstance(reply, ScoreResponse) else self._answer_of(reply)

    def _send(self, url: str, key: str, request: dict, headers: dict | None = None, stream: bool = False):
        """The endpoint's reply (its body still to read when ``stream``), or the answer when none came."""
        import httpx

        outgoing = self.client.build_request("POST", url, json=request,
                                             headers={**(headers or {}), "Authorization": f"Bearer {key}"})
        for attempt in (1, 2):
            try:
                return self.client.send(outgoing, stream=stream)
            except httpx.TimeoutException:
                return ScoreResponse(504, {"error": "The endpoint did not answer in time."}, {"Retry-After": "10"})
            except httpx.TransportError:
                # A pooled keep-alive connection the endpoint had already closed fails before any answer:
                # once more, on a fresh connection; a second failure means the endpoint is not there.
                if attempt == 2:
                    return ScoreResponse(503, {"error": "The endpoint is not reachable."}, {"Retry-After": "30"})
        raise AssertionError("unreachable")

    def _answer_of(self, reply) -> ScoreResponse:
        """The endpoint's answer (read whole) as this app's: its JSON on 200, else a status and error that say
        what to do, never the endpoint's own internals."""
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
        """Record that the run was used now, at most every LAST_USE_WRITE_EVERY, and four times within the idle
        window when that is shorter: an endpoint in use is never idle for the sweeper."""
        now = time.monotonic()
        every = min(LAST_USE_WRITE_EVERY.total_seconds(), self.pipeline.settings.idle_minutes * 60 / 4)
        if now - self._last_write.get(run.run_id, -1e9) < every:
            return
        self._last_write[run.run_id] = now
        try:
            self.pipeline.store.update(run.run_id, last_scored_at=runs.utcnow().isoformat())
        except runs.RunStoreError as exc:
            log.warning("run %s: could not record last use: %s", run.run_id, exc)


#: The seed's generation parameters (step 10), the defaults of a translated OpenAI request.
SEED_PARAMETERS = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}


def openai_to_seed(request: ChatRequest) -> dict:
    """An OpenAI chat-completions request as the seed's Azure ML request."""
    parameters = dict(SEED_PARAMETERS)
    for ours, value in (("temperature", request.temperature), ("top_p", request.top_p),
                        ("max_new_tokens", request.max_tokens)):
        if value is not None:
            parameters[ours] = value
    if parameters.get("temperature") == 0:
        parameters["do_sample"] = False
    # The seed's own shape: a list holding the one conversation (shared/chat.py).
    return {"input_data": {"input_string": [request.messages], "parameters": parameters}, "params": {}}


def seed_to_openai(answer, request: ChatRequest) -> dict:
    """The Azure ML endpoint's answer (`{"output": text}`, or `[{"0": text}]`) as an OpenAI chat completion,
    cut at the request's first stop sequence."""
    import uuid

    if isinstance(answer, dict) and "output" in answer:
        text = answer["output"]
    elif isinstance(answer, list) and answer and isinstance(answer[0], dict):
        text = next(iter(answer[0].values()), "")
    else:
        text = answer
    text, _ = cut_at_stop(str(text), request.stop)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": request.model or "tunedrop",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class ChatStream:
    """A streamed chat completion: Server-Sent Events as bytes, passed on as they come; ``close()`` lets the
    endpoint go (also when the client hangs up part-way)."""

    media_type = "text/event-stream"

    def __init__(self, events: Iterator[bytes], close: Callable[[], None] = lambda: None):
        self._events = events
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._events
        finally:
            self.close()

    def close(self) -> None:
        close, self._close = self._close, lambda: None
        close()


def _as_events(completion: dict) -> Iterator[bytes]:
    """A whole completion as the chunks OpenAI would have streamed: the role, the text, the finish, [DONE]."""
    choice = completion["choices"][0]
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": choice["message"]["content"]}, None),
                          ({}, choice["finish_reason"])):
        yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _error_body(reply, default: str) -> dict:
    """The endpoint's own error (its message, and its code where it gives one: tunedrop's model servers
    name the limit and the setting), or ``default``; never more than those two fields."""
    try:
        data = reply.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return {"error": default}
    extra = {k: data[k] for k in ("code", "field") if isinstance(data.get(k), str)}
    return {"error": data["error"][:2000], **extra}


_scorers: dict[int, Scorer] = {}


def get_scorer(pipeline) -> Scorer:
    """One Scorer (and HTTP connection pool) per pipeline, per process."""
    scorer = _scorers.get(id(pipeline))
    if scorer is None:
        scorer = _scorers[id(pipeline)] = Scorer(pipeline)
    return scorer
