"""The local backend's online endpoint: one fine-tuned model behind an Azure ML-style scoring API.

``python -m shared.backends.local.server --model-uri URI --tracking-uri URI --port P
--key-file F --state-file S [--model-cache-dir D] [--events-url URL --endpoint-name E --run-id R]``

Routes (127.0.0.1 only):

* ``GET /health`` -> ``{"status": "ready"}`` (no auth; liveness and readiness probe)
* ``POST /score`` -> ``{"output": "..."}`` for an Azure ML chat-completion request
  ``{"input_data": {"input_string": [messages], "parameters": {...}}}`` (or the seed's
  ``"input_string": [[messages]]``, one conversation in a list: see shared/chat.py)
* ``POST /v1/chat/completions`` -> an OpenAI chat-completion response

Both POST routes need ``Authorization: Bearer <key>``; the key is read from the key file and
never logged. The state file reports ``ready`` (with pid and port) once the model is loaded
and the port is listening, ``failed`` (with the error) if loading fails, ``stopped`` on SIGTERM.
With ``--events-url`` it then also posts a ``DEPLOYMENT_READY`` event there (shared/events.py), so the app
finishes run R's deployment at once instead of at its next sweep; best effort, in the background (a
host that is down costs the server nothing: the sweep still finds the state file ``ready``).

Every error is ``{"error": "<what, and what to do>", "code": "<code>"}``, never a trace (the codes and
their statuses: SERVER_ANSWERS in shared/failures.py). The limits, ``--max-new-tokens`` ... ``--queue``
(the settings TUNEDROP_MAX_NEW_TOKENS ... TUNEDROP_SERVER_QUEUE), and how requests are batched:
shared/backends/local/generation.py.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shared.backends.local.generation import Generator, Limits, Refused, Scheduler
from shared.backends.local.reporting import post_event
from shared.chat import ChatRequestError, conversation
from shared.events import deployment_ready_event
from shared.openai_api import ChatRequest, parse_chat_request

MAX_BODY_BYTES = 1_048_576
MODEL_INFO_FILE = "tunedrop_model.json"


class BadRequest(ChatRequestError):
    """The request body is not what the route expects; the message names the field."""


def write_state(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, path)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- request validation ------------------------------------------------------------------------


def _name(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _number(params: dict, key: str, field: str, low: float, high: float, default: float, low_open=False) -> float:
    value = params.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (low < value if low_open else low <= value)
        or not value <= high
    ):
        span = f"{'above' if low_open else 'from'} {low:g} up to {high:g}"
        raise BadRequest(f"{_name(field, key)} must be a number {span}")
    return float(value)


def _int(params: dict, key: str, field: str) -> int | None:
    """A positive integer or None; its limit (TUNEDROP_MAX_NEW_TOKENS) is the scheduler's to check, not clamp."""
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{_name(field, key)} must be a positive integer")
    return value


#: Temperatures below this decode greedily, as temperature 0 does.
GREEDY_BELOW = 1e-3


def _sampling(params: dict, field: str, tokens_key: str, sample_by_default: bool) -> dict[str, Any]:
    temperature = _number(params, "temperature", field, 0.0, 2.0, 1.0)
    top_p = _number(params, "top_p", field, 0.0, 1.0, 1.0, low_open=True)
    do_sample = params.get("do_sample", sample_by_default)
    if not isinstance(do_sample, bool):
        raise BadRequest(f"{_name(field, 'do_sample')} must be true or false")
    return {
        "temperature": temperature,
        "top_p": top_p,
        # A temperature this close to 0 overflows the softmax (inf / nan probabilities): it is greedy anyway.
        "do_sample": do_sample and temperature >= GREEDY_BELOW,
        "max_new_tokens": _int(params, tokens_key, field),
        "tokens_field": _name(field, tokens_key),
    }


def parse_score_request(body: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with input_data")
    data = body.get("input_data")
    if not isinstance(data, dict):
        raise BadRequest("input_data must be an object with input_string")
    messages = conversation(data.get("input_string"), "input_data.input_string")
    params = data.get("parameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("input_data.parameters must be an object")
    # As the Hugging Face pipeline behind Azure ML: greedy unless do_sample is asked for.
    return messages, _sampling(params, "input_data.parameters", "max_new_tokens", sample_by_default=False)


def parse_openai_request(body: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """The request read as the Function reads it (shared/openai_api.py), and its generation arguments."""
    request = parse_chat_request(body)
    params = {"temperature": request.temperature, "top_p": request.top_p, request.tokens_field: request.max_tokens}
    # As OpenAI: sampling at temperature 1 unless told otherwise.
    sampling = _sampling(params, "", request.tokens_field, sample_by_default=True)
    return request, {**sampling, "stop": request.stop, "seed": request.seed}


# -- the model ---------------------------------------------------------------------------------


def load_generator(model_uri: str, tracking_uri: str, cache_dir: Path) -> Generator:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import mlflow
    import torch
    import transformers

    from shared.backends.local.models import load_for_inference, resolve_base_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="tunedrop-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        info_path = local / MODEL_INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{model_uri} has no {MODEL_INFO_FILE}")
        info = json.loads(info_path.read_text())
        if info.get("adapter"):
            base = resolve_base_model(info["base_model"], cache_dir)
            model, tokenizer = load_for_inference(base, adapter_dir=local)
        else:
            model, tokenizer = load_for_inference(local)
    name = model_uri.split("/", 1)[-1].lstrip("/") if model_uri.startswith("models:/") else model_uri
    return Generator(model, tokenizer, name)


# -- HTTP --------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 resets connections under a burst of clients


class Handler(BaseHTTPRequestHandler):
    server_version = "tunedrop-local"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    generator: Generator
    scheduler: Scheduler
    key: bytes

    def log_message(self, format: str, *args: Any) -> None:  # no headers, so never the key
        log(f"{self.address_string()} {format % args}")

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, message: str, *, code: str, field: str | None = None) -> None:
        self._send(status, {"error": message, "code": code, **({"field": field} if field else {})})

    def _client_gone(self) -> bool:
        """Whether the client closed its connection while its request is being generated."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            self._send(200, {"status": "ready"})
        else:
            self._refuse(404, "not found", code="unknown_route")

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token.strip().encode(), self.key)

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _discard_body(self, length: int | None) -> None:
        """Read and drop an unwanted body, so closing the socket does not reset the client."""
        self.close_connection = True
        remaining = length if length is not None and length <= 16 * MAX_BODY_BYTES else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)

    def _read_body(self) -> Any:
        """The parsed JSON body; sends the error response and returns None when it cannot."""
        length = self._content_length()
        if length is None:
            self.close_connection = True
            self._refuse(411, "a Content-Length header is required", code="length_required")
            return None
        if length > MAX_BODY_BYTES:
            self._discard_body(length)
            self._refuse(413, f"body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._refuse(400, "body is not valid JSON", code="bad_request")
            return None

    def do_POST(self) -> None:
        arrived = time.monotonic()
        route = self.path.split("?", 1)[0]
        if route not in ("/score", "/v1/chat/completions"):
            self._discard_body(self._content_length())
            self._refuse(404, "not found", code="unknown_route")
            return
        if not self._authorized():
            self._discard_body(self._content_length())
            self._refuse(401, "unauthorized", code="unauthorized")
            return
        body = self._read_body()
        if body is None:
            return
        request = None
        try:
            if route == "/score":
                messages, sampling = parse_score_request(body)
            else:
                request, sampling = parse_openai_request(body)
                messages = request.messages
        except ChatRequestError as exc:
            self._refuse(400, str(exc), code="bad_request", field=exc.field)
            return
        if request is not None and request.user:
            log(f"request for end user {request.user!r}")
        serve = self.scheduler.stream if request is not None and request.stream else self.scheduler.serve
        try:
            result = serve(messages, sampling, gone=self._client_gone, arrived=arrived)
        except Refused as refused:
            if refused.code == "client_gone":  # nobody to answer
                self.close_connection = True
                return
            self._send(refused.status, refused.body(), refused.headers)
            return
        except Exception as exc:  # never a stack trace in a response
            log(f"generation failed: {type(exc).__name__}: {exc}")
            self._refuse(500, "generation failed", code="generation_failed")
            return
        if route == "/score":
            self._send(200, {"output": result["text"]})
        elif request.stream:
            self._stream(result, request)
        else:
            completion = _completion(request, self.generator.name, result["finish_reason"])
            completion["choices"][0]["message"] = {"role": "assistant", "content": result["text"]}
            self._send(200, {**completion, "usage": _usage(result)})

    def _stream(self, pieces, request: ChatRequest) -> None:
        """Server-Sent Events as OpenAI sends them: a chunk per text piece, one with the finish reason, usage
        if asked for, ``data: [DONE]``. A generation stopped part-way ends with an error event."""
        self.close_connection = True  # the stream's end is the connection's end
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = _completion(request, self.generator.name, None, chunk=True)

        def event(choice_delta: dict | None, finish: str | None = None, **extra) -> None:
            choices = [] if choice_delta is None else [{"index": 0, "delta": choice_delta, "finish_reason": finish}]
            self.wfile.write(f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            for piece in pieces:
                event({"content": piece})
            event({}, pieces.result["finish_reason"])
            if request.include_usage:
                event(None, usage=_usage(pieces.result))
            self.wfile.write(b"data: [DONE]\n\n")
        except Refused as refused:
            if refused.code != "client_gone":
                error = {"message": str(refused), "type": "server_error", "param": None, "code": refused.code}
                self.wfile.write(f"data: {json.dumps({'error': error})}\n\n".encode())
        except OSError:
            pass  # the client hung up: closing the stream below stops the generation
        finally:
            pieces.close()


def _completion(request: ChatRequest, served: str, finish: str | None, chunk: bool = False) -> dict[str, Any]:
    """The envelope of a chat completion (or of each chunk of one) with its one choice."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": request.model or served,
            "choices": [{"index": 0, "finish_reason": finish}]}


def _usage(result: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def make_server(generator: Generator, key: bytes, limits: Limits, port: int = 0) -> _Server:
    """The HTTP server on 127.0.0.1:``port`` (0: any free port) for ``generator``, not yet serving."""
    scheduler = Scheduler(generator, limits)
    handler = type("BoundHandler", (Handler,), {"generator": generator, "scheduler": scheduler, "key": key})
    server = _Server(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.scheduler = scheduler
    return server


def say_ready(events_url: str, endpoint_name: str, run_id: str) -> bool:
    """Post this endpoint's DEPLOYMENT_READY event: two tries, 5 s each, never raising, the URL never logged."""
    delivered = post_event(events_url, deployment_ready_event(endpoint_name=endpoint_name, run_id=run_id),
                           attempts=2, timeout_s=5.0)
    log("ready event delivered" if delivered else "ready event not delivered: the app's sweep will find this ready")
    return delivered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.backends.local.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", required=True, help="models:/<name>/<version> or runs:/<id>/model")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking (and registry) URI")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-file", type=Path, required=True, help="file holding the bearer key")
    parser.add_argument("--state-file", type=Path, required=True, help="JSON state written here")
    parser.add_argument("--model-cache-dir", type=Path, default=None, help="base model cache (TUNEDROP_MODEL_CACHE)")
    parser.add_argument("--events-url", default="", help="post a DEPLOYMENT_READY event here once serving")
    parser.add_argument("--endpoint-name", default="", help="the endpoint the ready event names")
    parser.add_argument("--run-id", default="", help="the tunedrop run the ready event names")
    Limits.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.events_url and not (args.endpoint_name and args.run_id):
        parser.error("--events-url needs --endpoint-name and --run-id")
    state_file: Path = args.state_file
    cache_dir = args.model_cache_dir or Path(
        os.environ.get("TUNEDROP_MODEL_CACHE") or Path.home() / ".cache" / "tunedrop"
    ).expanduser()

    pid = os.getpid()
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        if not serving.is_set():
            raise _Stopped()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        key = args.key_file.read_text().strip().encode()
        if not key:
            raise ValueError(f"key file {args.key_file} is empty")
        limits = Limits.from_arguments(args)
        generator = load_generator(args.model_uri, args.tracking_uri, cache_dir)
        server = make_server(generator, key, limits, args.port)
        serving.set()
    except _Stopped:
        write_state(state_file, {"state": "stopped", "pid": pid, "model_uri": args.model_uri})
        return 0
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        log(f"failed to start: {message}")
        write_state(state_file, {"state": "failed", "error": message, "pid": pid, "model_uri": args.model_uri})
        return 1

    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    write_state(state_file, {"state": "ready", "pid": pid, "port": args.port, "model_uri": args.model_uri})
    log(f"serving {args.model_uri} on 127.0.0.1:{args.port}: context window {generator.context_window} tokens, "
        f"{limits}")
    if args.events_url:  # after the state file says ready: that, not the event, is what the app checks
        threading.Thread(target=say_ready, args=(args.events_url, args.endpoint_name, args.run_id),
                         daemon=True).start()
    while not stop.wait(1.0):
        pass
    log("stopping")
    server.shutdown()
    server.server_close()
    write_state(state_file, {"state": "stopped", "pid": pid, "model_uri": args.model_uri})
    return 0


class _Stopped(BaseException):
    """SIGTERM or SIGINT arrived before the server was listening."""


if __name__ == "__main__":
    sys.exit(main())
