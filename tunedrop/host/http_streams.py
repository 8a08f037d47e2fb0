"""HTTP streams: the Python worker's FastAPI binding (``azurefunctions-extensions-http-fastapi``), mirrored.

Mirrors: once the extension is imported anywhere in the app (the worker asks
``HttpV2FeatureChecker.http_v2_enabled()``), HTTP streams are on for the whole app: every HTTP function
must take the extension's ``Request`` (FastAPI's) and return one of its response types, which the worker
checks at indexing (``RequestTrackerMeta.check_type``), as :func:`check_function` does here. The function
gets a Starlette request with the method, URL, query, headers, body and route parameters (``path_params``,
as the worker's ``RequestSynchronizer`` sets them). Its response is an ASGI app, run as the worker's
uvicorn runs it: each piece of a ``StreamingResponse`` reaches the client as it is produced (the body is
delimited by closing the connection, as HTTP/1.0 does); a client that hangs up makes the next write fail,
which ends the response (ASGI spec 2.4: ``send`` raises ``OSError``). A ``dict``/``str`` return is sent
as JSON/text, as the extension's ``DictResponse``/``StrResponse`` labels allow.
Differences: the body is read before the function runs (the worker streams request bodies too).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Callable

from tunedrop.host.config import HostConfigError

EXTENSION = "azurefunctions.extensions.http.fastapi"


def uses_streams(param_types: list[Any]) -> bool:
    """Whether an app has HTTP streams on: the worker asks whether the extension is imported in its process,
    which serves one app; this process may host several (the tests'), so an app is taken to have them on when
    any of its HTTP functions takes the extension's Request, and then all must (HostConfigError names one
    that does not)."""
    if EXTENSION not in sys.modules:
        return False
    from azurefunctions.extensions.base import RequestTrackerMeta

    return any(RequestTrackerMeta.check_type(t) for t in param_types)


def check_function(name: str, param_type: Any) -> None:
    """HostConfigError unless the HTTP function's trigger parameter is the extension's Request type."""
    from azurefunctions.extensions.base import RequestTrackerMeta

    if not RequestTrackerMeta.check_type(param_type):
        raise HostConfigError(f"Function {name}: HTTP streams are on (the app imports {EXTENSION}), so its request "
                              f"parameter must be annotated with {EXTENSION}.Request, not {param_type!r}.")


def build_request(method: str, path: str, query_string: str, headers: list[tuple[str, str]], body: bytes,
                  route_params: dict[str, str], client: tuple[str, int] | None = None):
    """The Starlette request a function of an HTTP-streams app is given."""
    from starlette.requests import Request

    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect is reported once the body is read
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode("latin-1", "replace"),
             "root_path": "", "query_string": query_string.encode("latin-1", "replace"),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers],
             "client": client, "server": None, "path_params": dict(route_params)}
    return Request(scope, receive)


def as_response(value: Any):
    """What a function returned, as an ASGI response (dict -> JSON, str -> text, None -> 204)."""
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    if isinstance(value, Response):
        return value
    if isinstance(value, (dict, list)):
        return JSONResponse(value)
    if isinstance(value, str):
        return PlainTextResponse(value)
    if value is None:
        return Response(status_code=204)
    raise TypeError(f"an HTTP-streams function must return a FastAPI response, dict or str, not {type(value).__name__}")


def send(response, request, start: Callable[[int, list[tuple[str, str]]], None],
         write: Callable[[bytes], None]) -> None:
    """Run ``response`` (an ASGI app) for ``request``: ``start(status, headers)`` once, then ``write(piece)`` for
    each piece of the body as it comes. A write that fails (the client is gone) ends it quietly."""

    async def asgi_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start(message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]])
        elif message["type"] == "http.response.body" and message.get("body"):
            write(message["body"])

    async def disconnected() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await response(request.scope, disconnected, asgi_send)
        except OSError:
            pass
        except Exception as exc:  # starlette's ClientDisconnect wraps the OSError of a gone client
            if type(exc).__name__ != "ClientDisconnect":
                raise

    asyncio.run(run())
