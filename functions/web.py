"""What every HTTP function shares: the request as the worker gives it (HTTP streams: a FastAPI request) and
answers that are always JSON (or an event stream), never an empty 500.

HTTP streams (``azurefunctions-extensions-http-fastapi``) are on for the whole app once this module is
imported, so every HTTP function takes ``Request`` and returns a FastAPI response; the core stays
synchronous and runs on a worker thread (``run_in_threadpool``), keeping the worker's event loop free.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

from azurefunctions.extensions.http.fastapi import Request, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from shared.openai_api import OpenAIError
from shared.scoring import ScoreRequestError, ScoreResponse, check_run_id

__all__ = ["Request", "Response", "answers_json", "answers_openai", "body_of", "json_answer", "param", "run_core",
           "scored"]

log = logging.getLogger("tunedrop.functions")


def json_answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, headers=headers or {}, media_type="application/json")


def param(req: Request, name: str) -> str:
    """A route parameter (``{name}`` in the route)."""
    return req.path_params.get(name, "")


async def body_of(req: Request) -> bytes:
    return await req.body()


async def run_core(call: Callable, *args, **kwargs):
    """A synchronous core call, on a worker thread."""
    return await run_in_threadpool(call, *args, **kwargs)


def scored(result) -> Response:
    """A scoring answer: JSON, or a chat completion's event stream, passed on piece by piece."""
    if isinstance(result, ScoreResponse):
        return json_answer(result.status, result.body, result.headers)
    return StreamingResponse(_pieces(result), media_type=result.media_type,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _pieces(stream):
    """The stream's pieces, each read on a worker thread; the endpoint is let go however the stream ends."""
    events = iter(stream)
    done = object()
    try:
        while (piece := await run_in_threadpool(next, events, done)) is not done:
            yield piece
    finally:
        try:
            stream.close()
        except ValueError:  # still being read on its thread when the client went: its own end closes it
            pass


def _failure_answer(name: str, exc: Exception) -> tuple[int, str, dict[str, str], str | None]:
    """(status, message, headers, code) for what a handler raised that it did not answer itself."""
    from azure.core.exceptions import AzureError

    from shared.backends.base import BackendError
    from shared.runs import RunStoreError

    if isinstance(exc, BackendError):  # the backend (Azure ML) refused or did not answer a step asked for
        log.warning("%s: backend: %s (%s)", name, exc, exc.code)
        return (503 if exc.retryable else 502), str(exc), ({"Retry-After": "30"} if exc.retryable else {}), exc.code
    if isinstance(exc, (AzureError, RunStoreError)):
        log.warning("%s: storage unavailable: %s", name, type(exc).__name__)
        return 503, "The run store is unavailable; try again.", {"Retry-After": "10"}, "store_unavailable"
    log.exception("%s failed", name)
    return 500, "Internal error; it is in the function's log.", {}, None


def _answering(shape):
    """A decorator making every outcome of a handler an answer: a bad run id is 404 before any storage call; a
    failure the handler did not answer is turned into ``shape(status, message, field, code)``."""

    def decorate(handler):
        @functools.wraps(handler)
        async def wrapper(req: Request) -> Response:
            try:
                if "run_id" in req.path_params:
                    check_run_id(req.path_params["run_id"])
                return await handler(req)
            except ScoreRequestError as exc:
                return json_answer(exc.status, shape(exc.status, str(exc), exc.field, None))
            except OpenAIError as exc:
                return json_answer(exc.status, shape(exc.status, str(exc), exc.param, exc.code), exc.headers)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
                status, message, headers, code = _failure_answer(handler.__name__, exc)
                return json_answer(status, shape(status, message, None, code), headers)

        return wrapper

    return decorate


def _tunedrop_error(status: int, message: str, field: str | None, code: str | None) -> dict:
    return {"error": message, **({"field": field} if field else {}), **({"code": code} if code else {})}


def _openai_error(status: int, message: str, field: str | None, code: str | None) -> dict:
    return OpenAIError(status, message, param=field, code=code or ("model_not_found" if status == 404 else None)).body()


#: tunedrop's own routes: errors as ``{"error": text, "field"?, "code"?}``.
answers_json = _answering(_tunedrop_error)
#: The OpenAI-compatible routes: errors in OpenAI's shape.
answers_openai = _answering(_openai_error)
