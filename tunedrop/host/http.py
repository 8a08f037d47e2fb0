"""The host's HTTP front: function routes, the Event Grid webhook and the admin invoke API.

Mirrors: routes under ``/<routePrefix>/`` with ASP.NET-style templates (``{id}``, ``{id?}``,
``{id:int}``, ``{id=default}``, ``{*rest}``; literals case-insensitive); method filter; auth
levels (anonymous; function: the function key or the master key, in header ``x-functions-key``
or query ``code``; admin: the master key) answering 401 with an empty body; a function that raises
gives 500 with an empty body; ``POST /runtime/webhooks/EventGrid?functionName=<name>`` with the
Event Grid extension's handling of ``aeg-event-type``; ``POST /admin/functions/<name>``
(master key) running a non-HTTP function now, answering 202.
Differences: a method that the route does not allow gets 405 (the host answers 404); the Event
Grid webhook does not ask for the ``eventgrid_extension`` system key (Core Tools does not either);
a failing Event Grid delivery gets 500 without the exception message the host puts in the body;
events of one delivery run one after the other (the host runs them in parallel). Nothing from a
request's headers, query or body is logged, since they may carry keys.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum

from tunedrop.host.invoke import FunctionSpec, Invoker


class LocalHost(Protocol):
    """What the HTTP front needs of the host (tunedrop.host.host.LocalHost), so that it does not import it."""

    master_key: str
    function_key: str
    routes: list[Route]
    authority: str
    invoker: Invoker

    def function(self, name: str, kind: str | None = None) -> FunctionSpec | None: ...

    def invoke_now(self, spec: FunctionSpec, value: str) -> None: ...

log = logging.getLogger("tunedrop.host")

_CONSTRAINTS = {"int": r"-?\d+", "long": r"-?\d+", "alpha": r"[A-Za-z]+", "bool": r"(?i:true|false)",
                "guid": r"[0-9A-Fa-f]{8}-?(?:[0-9A-Fa-f]{4}-?){3}[0-9A-Fa-f]{12}"}
_PARAM = re.compile(r"^(\*{1,2})?([^:?=*]+)((?::[^:?=]+)*)(\?)?(?:=(.*))?$")


class Route:
    """A compiled route template of one HTTP function."""

    def __init__(self, spec: FunctionSpec, prefix: str):
        self.spec = spec
        template = (spec.trigger.get("route") or spec.name).strip("/")
        methods = spec.trigger.get("methods")
        self.methods = {m.upper() for m in methods} if methods else None
        self.auth_level = str(spec.trigger.get("authLevel") or "function").lower()
        self.names: list[str] = []
        self.defaults: dict[str, str] = {}
        regex = "/" + re.escape(prefix) if prefix else ""
        self.param_count = 0
        for segment in [s for s in template.split("/") if s]:
            whole = re.fullmatch(r"\{([^{}]+)\}", segment)
            parsed = _PARAM.match(whole.group(1)) if whole else None
            if parsed and (parsed.group(4) or parsed.group(5) is not None):  # optional or defaulted segment
                regex += rf"(?:/{self._group(parsed)})?"
                continue
            regex += "/"
            pos = 0
            for match in re.finditer(r"\{([^{}]+)\}", segment):
                regex += re.escape(segment[pos:match.start()]) + self._group(_PARAM.match(match.group(1)))
                pos = match.end()
            regex += re.escape(segment[pos:])
        self.regex = re.compile(regex + "/?", re.IGNORECASE)

    def _group(self, parsed: re.Match | None) -> str:
        if parsed is None:
            raise ValueError(f"Function {self.spec.name}: bad route parameter in {self.spec.trigger.get('route')!r}.")
        catch_all, name, constraints, _, default = parsed.groups()
        self.names.append(name)
        self.param_count += 1
        if default is not None:
            self.defaults[name] = default
        pattern = r".*" if catch_all else r"[^/]+"
        for constraint in filter(None, constraints.split(":")):
            pattern = _CONSTRAINTS.get(constraint.split("(")[0].lower(), pattern)
        return f"(?P<p{len(self.names) - 1}>{pattern})"

    def match(self, path: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(path)
        if not found:
            return None
        params = dict(self.defaults)
        for index, name in enumerate(self.names):
            value = found.group(f"p{index}")
            if value is not None:
                params[name] = unquote(value)
        return params


def sort_routes(routes: list[Route]) -> list[Route]:
    """Literal routes before parameterised ones, as ASP.NET route precedence does."""
    return sorted(routes, key=lambda r: (r.param_count, -len(r.regex.pattern)))


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets connections under a burst of clients
    daemon_threads = True

    def __init__(self, address: tuple[str, int], host: "LocalHost"):
        self.local_host = host
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


def make_server(host: "LocalHost", address: str, port: int) -> ThreadingHTTPServer:
    """Bind ``address:port`` now (so it listens on return); serve with ``serve_forever()``."""
    return _Server((address, port), host)


def _http_response(value: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """The HTTP response for what an HTTP function returned (func.HttpResponse or str)."""
    if isinstance(value, func.HttpResponse):
        headers = list(value.headers.items())
        if not any(k.lower() == "content-type" for k, _ in headers):
            mimetype = value.mimetype or "text/plain"
            content_type = f"{mimetype}; charset={value.charset}" if mimetype.startswith("text/") else mimetype
            headers.append(("Content-Type", content_type))
        return int(value.status_code), headers, value.get_body() or b""
    if isinstance(value, str):
        return 200, [("Content-Type", "text/plain; charset=utf-8")], value.encode("utf-8")
    if value is None:
        return 204, [], b""
    raise TypeError(f"an HTTP function must return func.HttpResponse or str, not {type(value).__name__}")


class _Handler(BaseHTTPRequestHandler):
    server_version = "tunedrop-localhost"
    protocol_version = "HTTP/1.0"
    timeout = 60

    def log_message(self, format, *args):  # the default logs the full path, query keys included
        pass

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def host(self) -> "LocalHost":
        return self.server.local_host

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        for name, value in headers or []:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode(), [("Content-Type", "application/json; charset=utf-8")])

    def _key_ok(self, query: dict[str, str], *, admin: bool) -> bool:
        given = self.headers.get("x-functions-key") or query.get("code") or ""
        keys = [self.host.master_key] if admin else [self.host.function_key, self.host.master_key]
        return any(hmac.compare_digest(given.encode(), key.encode()) for key in keys)

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = dict(reversed(parse_qsl(url.query, keep_blank_values=True)))  # the first value wins
        body = self._read_body()
        path = url.path
        lowered = path.lower().rstrip("/")
        if lowered == "/runtime/webhooks/eventgrid":
            return self._event_grid(query, body)
        if lowered.startswith("/admin/functions/"):
            return self._admin_invoke(unquote(path.rstrip("/").rsplit("/", 1)[1]), query, body)
        if path == "/":
            return self._send(200, b"Your Functions 4.0 app is up and running", [("Content-Type", "text/plain")])
        not_allowed = False
        for route in self.host.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.methods is not None and self.command not in route.methods:
                not_allowed = True
                continue
            return self._http_function(route, params, query, body, url)
        self._send(405 if not_allowed else 404)

    def _http_function(self, route: Route, params: dict[str, str], query: dict[str, str], body: bytes, url) -> None:
        if route.auth_level != "anonymous" and not self._key_ok(query, admin=route.auth_level == "admin"):
            return self._send(401)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        full_url = f"http://{self.headers.get('Host') or self.host.authority}{self.path}"

        def bind():
            return func.HttpRequest(self.command, full_url, headers=headers, params=query,
                                    route_params=params, body=body)

        outcome = self.host.invoker.invoke(route.spec, "This function was programmatically called via the host APIs.", bind)
        if not outcome.succeeded:
            return self._send(500)
        try:
            status, response_headers, response_body = _http_response(outcome.value)
        except TypeError:
            log.exception("Function '%s' returned a value the host cannot send", route.spec.log_name)
            return self._send(500)
        self._send(status, response_body, response_headers)

    def _event_grid(self, query: dict[str, str], body: bytes) -> None:
        """The Event Grid extension's webhook: handshake, notifications, unsubscribe."""
        if self.command != "POST":
            return self._send(405)
        spec = self.host.function(query.get("functionName", ""), kind="eventGridTrigger")
        if spec is None:
            return self._send(404)
        event_type = (self.headers.get("aeg-event-type") or "").lower()
        if event_type == "unsubscribe":
            return self._send(202)
        if event_type not in ("subscriptionvalidation", "notification"):
            return self._send(400)
        try:
            doc = json.loads(body)
            events = doc if isinstance(doc, list) else [doc]
            if not events or not all(isinstance(e, dict) for e in events):
                raise ValueError("expected a JSON array of events")
            if event_type == "subscriptionvalidation":
                code = events[0]["data"]["validationCode"]
        except (ValueError, KeyError, TypeError):
            return self._send(400)
        if event_type == "subscriptionvalidation":
            log.info("perform handshake with eventGrid for function: %s", spec.name)
            return self._send_json(200, {"validationResponse": code})
        failed = False
        for event in events:
            reason = f"EventGrid trigger fired at {datetime.now(timezone.utc).isoformat()}"
            outcome = self.host.invoker.invoke(spec, reason, lambda event=event: EventGridEventInConverter.decode(
                Datum(json.dumps(event), "json"), trigger_metadata=None))
            failed = failed or not outcome.succeeded
        self._send(500 if failed else 202)

    def _admin_invoke(self, name: str, query: dict[str, str], body: bytes) -> None:
        """POST /admin/functions/<name> {"input": "..."}: run a non-HTTP function now (master key)."""
        if self.command != "POST":
            return self._send(405)
        if not self._key_ok(query, admin=True):
            return self._send(401)
        spec = self.host.function(name)
        if spec is None:
            return self._send(404)
        if spec.kind == "httpTrigger":
            return self._send(400)
        try:
            doc = json.loads(body) if body.strip() else {}
            value = doc.get("input") if isinstance(doc, dict) else None
        except ValueError:
            return self._send(400)
        self.host.invoke_now(spec, "" if value is None else str(value))
        self._send(202)
