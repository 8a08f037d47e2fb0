"""OpenAI's chat-completions vocabulary, written once: the request (what is honoured, what is refused
and why), the error shape, and the model objects that name tunedrop's fine-tuned models.

Both the Function (one base URL, ``/api/v1``) and the local model server read requests through
:func:`parse_chat_request`, so a field means the same at both. Nothing is silently ignored: a field
tunedrop honours is checked and used, a field it cannot honour is accepted only at the value that
asks for nothing (``tools: []``, ``logprobs: false`` ...) and refused otherwise with a 400 naming
it, and a field OpenAI does not define is refused as OpenAI refuses it. Nothing heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from shared.chat import ChatRequestError, check_sampling
from shared.chat import messages as checked_messages

#: OpenAI's error ``type`` for each status this app answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}
#: Stop sequences a request may send (OpenAI's own limit).
MAX_STOP_SEQUENCES = 4
MAX_USER_CHARS = 256


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def as_openai_error(status: int, body: Any, headers: dict[str, str] | None = None) -> OpenAIError:
    """tunedrop's own error body (``{"error": text, "field"?, "code"?, "state"?}``) in OpenAI's shape."""
    body = body if isinstance(body, dict) else {}
    message = body.get("error") if isinstance(body.get("error"), str) else f"HTTP {status}"
    code = body.get("code") if isinstance(body.get("code"), str) else None
    state = body.get("state")
    if code is None and isinstance(state, str):
        code = "model_waking" if state == "waking" else f"model_{state}"
    return OpenAIError(status, message, param=body.get("field") if isinstance(body.get("field"), str) else None,
                       code=code, headers=headers)


# -- the request ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request: what generation is asked for."""

    messages: list[dict[str, str]]
    model: str | None = None
    max_tokens: int | None = None
    tokens_field: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict, compare=False)


def _absent(value) -> bool:
    return value is None


#: Fields tunedrop cannot honour, each with the values that ask for nothing, and why anything else is refused.
AT_NOTHING_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: v is None or v == [], "the fine-tuned models have no tool calling; leave tools out"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "the fine-tuned models have no tool calling"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "it must be true or false"),
    "functions": (lambda v: v is None or v == [], "the fine-tuned models have no function calling"),
    "function_call": (lambda v: v in (None, "none", "auto"), "the fine-tuned models have no function calling"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "output is plain text: JSON mode and JSON schemas are not enforced; send "
                        '{"type": "text"} or leave it out'),
    "logprobs": (lambda v: v in (None, False), "log probabilities are not returned; send false or leave it out"),
    "top_logprobs": (lambda v: v in (None, 0), "log probabilities are not returned"),
    "presence_penalty": (lambda v: v in (None, 0), "penalties are not applied; send 0 or leave it out"),
    "frequency_penalty": (lambda v: v in (None, 0), "penalties are not applied; send 0 or leave it out"),
    "logit_bias": (lambda v: v is None or v == {}, "logit bias is not applied; leave it out"),
    "store": (lambda v: v in (None, False), "completions are not stored; send false or leave it out"),
    "metadata": (lambda v: v is None or v == {}, "completions are not stored, so they carry no metadata"),
    "modalities": (lambda v: v is None or v == ["text"], "the models read and write text only"),
    "audio": (_absent, "the models read and write text only"),
    "prediction": (_absent, "predicted outputs are not supported"),
    "reasoning_effort": (_absent, "the fine-tuned models are not reasoning models"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier"),
    "web_search_options": (_absent, "the models have no web search"),
    "verbosity": (_absent, "verbosity is not a setting of these models"),
}
HONOURED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n",
            "seed", "user", "stream", "stream_options")


def parse_chat_request(body: Any, *, model_required: bool = False) -> ChatRequest:
    """``body`` checked as an OpenAI chat-completions request; ChatRequestError (a 400) names the field."""
    if not isinstance(body, dict):
        raise ChatRequestError("the request body must be a JSON object with model and messages")
    for key in body:
        if key not in HONOURED and key not in AT_NOTHING_ONLY:
            raise ChatRequestError(f"Unrecognized request argument supplied: {key}", key)
    for key, (allowed, why) in AT_NOTHING_ONLY.items():
        if key in body and not allowed(body[key]):
            raise ChatRequestError(f"{key} is not supported: {why}", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ChatRequestError("model must be a string", "model")
    if model_required and not model:
        raise ChatRequestError("model is required: an id from GET /v1/models (the registered model name:version) "
                               "or a run id", "model")
    check_sampling(body, "", ("max_tokens", "max_completion_tokens"))
    tokens, tokens_field = body.get("max_completion_tokens"), "max_completion_tokens"
    if body.get("max_tokens") is not None:
        if tokens is not None and tokens != body["max_tokens"]:
            raise ChatRequestError("max_tokens and max_completion_tokens differ: send one of them", "max_tokens")
        tokens, tokens_field = body["max_tokens"], "max_tokens"
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ChatRequestError("n must be 1: one choice per request (send several requests for several answers)", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ChatRequestError("seed must be an integer", "seed")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS):
        raise ChatRequestError(f"user must be a string of at most {MAX_USER_CHARS} characters", "user")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ChatRequestError("stream must be true or false", "stream")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    return ChatRequest(messages=openai_messages(body.get("messages")), model=model or None, max_tokens=tokens,
                       tokens_field=tokens_field, temperature=body.get("temperature"), top_p=body.get("top_p"),
                       stop=_stop(body.get("stop")), seed=seed, user=user, stream=bool(stream),
                       include_usage=include_usage)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP_SEQUENCES \
            or not all(isinstance(s, str) and s for s in stops):
        raise ChatRequestError(f"stop must be a non-empty string or a list of 1 to {MAX_STOP_SEQUENCES} "
                               "non-empty strings", "stop")
    return tuple(stops)


def _stream_options(value, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise ChatRequestError("stream_options is only allowed with stream true", "stream_options")
    if not isinstance(value, dict) or any(k not in ("include_usage", "include_obfuscation") for k in value):
        raise ChatRequestError("stream_options may hold include_usage (true or false)", "stream_options")
    if value.get("include_obfuscation") not in (None, False):
        raise ChatRequestError("stream_options.include_obfuscation is not supported: chunks are not padded",
                               "stream_options.include_obfuscation")
    usage = value.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ChatRequestError("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return bool(usage)


def openai_messages(value) -> list[dict[str, str]]:
    """OpenAI's messages as the chat template's {role, content}: ``developer`` is the system role, content
    may be text parts (joined); images, audio, files, tool calls and tool results are refused by name."""
    if not isinstance(value, list) or not value:
        raise ChatRequestError("messages must be a non-empty list of messages", "messages")
    plain = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatRequestError(f"{where} must be an object with role and content", where)
        if message.get("role") == "tool" or message.get("tool_calls") or message.get("function_call"):
            raise ChatRequestError(f"{where}: tool calls and tool results are not supported (the models have no "
                                   "tool calling)", where)
        unknown = set(message) - {"role", "content", "name", "refusal"}
        if unknown:
            raise ChatRequestError(f"{where}.{sorted(unknown)[0]} is not a message field tunedrop knows",
                                   f"{where}.{sorted(unknown)[0]}")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ChatRequestError(f"{where}.name must be a string", f"{where}.name")
        content = message.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"{where}.content")
        role = "system" if message.get("role") == "developer" else message.get("role")
        plain.append({"role": role, "content": content})
    return checked_messages(plain, "messages")


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise ChatRequestError(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                   f"read{f', not {kind!r}' if isinstance(kind, str) else ''}: the models read text "
                                   "only", f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence (excluded, as OpenAI does), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


# -- models ----------------------------------------------------------------------------------------------

#: Run states whose model can be asked for: registered (gated: it answers 409 saying so), deploying, deployed
#: and torn down (asleep: a request wakes it).
LISTED_STATES = ("registered", "deploying", "deployed", "torn_down")
#: What each listed state means for a client, in ``serving``.
SERVING = {"deployed": "ready", "torn_down": "asleep", "deploying": "deploying", "registered": "not_deployed"}


def model_id(run) -> str:
    """The registered model's name and version, OpenAI's ``model`` for this run."""
    return f"{run.model_name}:{run.model_version}"


def _epoch(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


def model_object(run) -> dict:
    """An OpenAI model object, with tunedrop's own fields beside the standard ones."""
    return {"id": model_id(run), "object": "model", "created": _epoch(run.at("registered") or run.created_at),
            "owned_by": "tunedrop", "run_id": run.run_id, "state": run.state, "serving": SERVING.get(run.state),
            "base_model": run.base_model, "dataset": f"{run.dataset_container}/{run.dataset_blob}",
            "metrics": {k: v for k, v in run.metrics.items() if isinstance(v, (int, float))},
            "gate": run.gate or None}


def listed(runs) -> list:
    """The runs whose models the API lists, newest first."""
    found = [r for r in runs if r.state in LISTED_STATES and r.model_name and r.model_version]
    return sorted(found, key=lambda r: r.created_at, reverse=True)


def resolve_model(runs, model: str):
    """The run that ``model`` names: a model id (``name:version``) or a bare model name (its newest
    version) among the listed runs; None when none does. (A run id is looked up directly by the caller.)"""
    candidates = listed(runs)
    for run in candidates:
        if model == model_id(run):
            return run
    named = [r for r in candidates if r.model_name == model]
    return max(named, key=lambda r: int(r.model_version) if r.model_version.isdigit() else 0) if named else None
