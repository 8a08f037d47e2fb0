"""The host's HTTP front: function routes, the Event Grid webhook and the admin invoke API.

(A little over 400 lines: one request handler, whose every answer, malformed input's included, is
written here so that no path can fall through to http.server's HTML or a dropped connection.)

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
Malformed requests: as ASP.NET Core, a route value is percent-decoded except ``%2F`` (an encoded '/'
stays ``%2F``, so it never splits a segment); a body over 100 MiB (the Functions host's
``maxRequestBodySize``) gets 413 unread, a bad ``Content-Length`` or chunk size 400; a body the Event
Grid or admin route cannot read (not JSON, nested too deep, events that do not decode) 400; each
with a short JSON error. A fault in the host itself answers 500 and is logged, never a dropped connection.
A request line over 65536 bytes gets 414, a header line over that or more than 100 headers 431, an
unparsable request line 400, an unknown method 501: JSON errors too (not http.server's HTML page).
Load: HTTP functions and Event Grid deliveries run on their own lane of workers (the host's
``max_http_workers``, host.json ``extensions.http.maxConcurrentRequests``, default 32) with a bounded
backlog waiting for one (``max_http_backlog``, from ``maxOutstandingRequests``, default 32 more); a
request past that gets 429 at once with a JSON error and ``Retry-After: 5`` (seconds), so a burst of
slow HTTP functions neither holds clients for minutes nor starves the timer, queue and blob triggers,
which have workers of their own. Events of an Event Grid delivery refused part-way through were run
already; Event Grid retries the whole delivery after a 429.
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

from tunedrop.host import http_streams
from tunedrop.host.invoke import FunctionSpec, Invoker, Throttled


class LocalHost(Protocol):
    """What the HTTP front needs of the host (tunedrop.host.host.LocalHost), so that it does not import it."""

    master_key: str
    function_key: str
    routes: list[Route]
    authority: str
    invoker: Invoker
    http_streams: bool

    def function(self, name: str, kind: str | None = None) -> FunctionSpec | None: ...

    def invoke_now(self, spec: FunctionSpec, value: str) -> None: ...

log = logging.getLogger("tunedrop.host")

#: The Functions host's default limit on a request body (http.maxRequestBodySize, 100 MiB).
MAX_REQUEST_BODY_BYTES = 100 * 1024 * 1024
#: Deepest JSON the host itself parses (Event Grid deliveries, the admin route); deeper is refused (400).
MAX_JSON_DEPTH = 64
#: Largest body the host itself parses: Event Grid delivers at most 1 MB a request.
MAX_PARSED_BODY_BYTES = 1024 * 1024
#: Retry-After (seconds) on a 429 for an HTTP request refused because every HTTP worker and backlog slot is taken.
THROTTLED_RETRY_AFTER_S = 5

_ENCODED_SLASH = re.compile(r"(%2[Ff])")


def unquote_route_value(value: str) -> str:
    """Percent-decode a route value as ASP.NET Core does: everything but ``%2F``, which stays as sent."""
    return "".join(part if _ENCODED_SLASH.fullmatch(part) else unquote(part) for part in _ENCODED_SLASH.split(value))


class BadRequest(Exception):
    """A request the host cannot take (framing, size, a body it parses itself); answered with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_json(body: bytes, what: str):
    """JSON the host parses itself, refused with BadRequest (400) when it is not UTF-8 JSON or nests too deep,
    413 over MAX_PARSED_BODY_BYTES.

    The depth is counted before parsing, without recursion: brackets inside strings aside (escaped
    backslashes, then escaped quotes, dropped first), every byte but brackets dropped."""
    if len(body) > MAX_PARSED_BODY_BYTES:
        raise BadRequest(413, f"{what} is over {MAX_PARSED_BODY_BYTES} bytes.")
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    depth = 0
    for byte in outside.translate(None, _NOT_BRACKETS):
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(400, f"{what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep.")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"{what} is not UTF-8 (offset {exc.start}).") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(400, f"{what} is not valid JSON: {getattr(exc, 'msg', type(exc).__name__)}.") from None


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
                params[name] = unquote_route_value(value)
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
        """The request body; BadRequest for a bad Content-Length or chunk size (400) or one too large (413)."""
        too_large = f"Request body over {MAX_REQUEST_BODY_BYTES} bytes (the Functions host's maxRequestBodySize)."
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024).split(b";")[0].strip()
                try:
                    size = int(line or b"0", 16)
                except ValueError:
                    raise BadRequest(400, "Bad chunk size in a chunked request body.") from None
                if size < 0:
                    raise BadRequest(400, "Bad chunk size in a chunked request body.")
                if size == 0:
                    for _ in range(100):  # trailers, up to the blank line
                        if not self.rfile.readline(8192).strip():
                            break
                    return b"".join(chunks)
                total += size
                if total > MAX_REQUEST_BODY_BYTES:
                    raise BadRequest(413, too_large)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit():  # also refuses a negative length, which would read until the client gives up
            raise BadRequest(400, "Content-Length is not a number of bytes.")
        length = int(raw)
        if length > MAX_REQUEST_BODY_BYTES:
            raise BadRequest(413, too_large)
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

    def _send_json(self, status: int, doc: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), [("Content-Type", "application/json; charset=utf-8"),
                                                       *(headers or [])])

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (414, 431, 400 for a bad request line, 501) as a JSON error, not its HTML page."""
        short, long = self.responses.get(code, ("Error", ""))
        self.close_connection = True
        try:
            self.send_response(code, message or short)
            self.send_header("Connection", "close")
            body = b""
            if code >= 200 and code not in (204, 205, 304) and self.command != "HEAD":
                text = message or short
                detail = explain or long
                body = json.dumps({"error": f"{text}: {detail}" if detail and detail != text else text}).encode()
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)
            if code in (414, 431):
                self._drain()
        except OSError:  # the client is gone
            pass

    def _drain(self, limit: int = 1024 * 1024, timeout_s: float = 0.5) -> None:
        """Read and drop what is left of a refused request (up to ``limit`` bytes, idle ``timeout_s``), so that
        closing with unread input does not reset the connection before the client has read the answer."""
        self.connection.settimeout(timeout_s)
        while limit > 0:
            chunk = self.rfile.read1(min(65536, limit))
            if not chunk:
                return
            limit -= len(chunk)

    def _key_ok(self, query: dict[str, str], *, admin: bool) -> bool:
        given = self.headers.get("x-functions-key") or query.get("code") or ""
        keys = [self.host.master_key] if admin else [self.host.function_key, self.host.master_key]
        return any(hmac.compare_digest(given.encode(), key.encode()) for key in keys)

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._route()
        except BadRequest as exc:
            self._send_json(exc.status, {"error": str(exc)})
        except Throttled:
            self._send_json(429, {"error": "The host is busy: every HTTP worker is taken and the backlog waiting for "
                                           f"one is full. Retry after {THROTTLED_RETRY_AFTER_S} s."},
                            [("Retry-After", str(THROTTLED_RETRY_AFTER_S))])
        except OSError:  # the client went away or stalled past the socket timeout: nobody to answer
            self.close_connection = True
        except Exception:  # a fault of the host itself: answer, do not drop the connection
            log.exception("The host failed to handle a request")
            try:
                self._send_json(500, {"error": "The host failed to handle the request; it is in the host's log."})
            except OSError:
                pass

    def _route(self) -> None:
        try:
            url = urlsplit(self.path)
        except ValueError:  # e.g. an absolute-form target with a malformed host
            raise BadRequest(400, "The request target is not a URL path.") from None
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
        streams = self.host.http_streams
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        full_url = f"http://{self.headers.get('Host') or self.host.authority}{self.path}"

        def bind():
            if streams:
                return http_streams.build_request(self.command, url.path, url.query, list(self.headers.items()), body,
                                                  params, self.client_address[:2])
            return func.HttpRequest(self.command, full_url, headers=headers, params=query,
                                    route_params=params, body=body)

        outcome = self.host.invoker.invoke(route.spec, "This function was programmatically called via the host APIs.",
                                           bind, http=True)
        if not outcome.succeeded:
            return self._send(500)
        if streams:
            return self._send_streamed(route, outcome.value)
        try:
            status, response_headers, response_body = _http_response(outcome.value)
        except TypeError:
            log.exception("Function '%s' returned a value the host cannot send", route.spec.log_name)
            return self._send(500)
        self._send(status, response_body, response_headers)

    def _send_streamed(self, route: Route, value: Any) -> None:
        """An HTTP-streams function's response, each piece written as it comes (tunedrop/host/http_streams.py)."""
        try:
            response = http_streams.as_response(value)
        except TypeError:
            log.exception("Function '%s' returned a value the host cannot send", route.spec.log_name)
            return self._send(500)
        request = http_streams.build_request(self.command, "/", "", [], b"", {})

        def start(status: int, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()

        def write(piece: bytes) -> None:
            if self.command != "HEAD":
                self.wfile.write(piece)
                self.wfile.flush()

        self.close_connection = True
        http_streams.send(response, request, start, write)

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
        doc = parse_json(body, "The Event Grid delivery")
        events = doc if isinstance(doc, list) else [doc]
        if not events or not all(isinstance(e, dict) for e in events):
            raise BadRequest(400, "An Event Grid delivery is a JSON array of event objects.")
        if event_type == "subscriptionvalidation":
            code = (events[0].get("data") or {}).get("validationCode") if isinstance(events[0].get("data"), dict) else None
            if not isinstance(code, str):
                raise BadRequest(400, "A subscription validation event needs data.validationCode.")
            log.info("perform handshake with eventGrid for function: %s", spec.name)
            return self._send_json(200, {"validationResponse": code})
        decoded = []
        for index, event in enumerate(events):  # all decoded first: a malformed event is the sender's fault
            try:
                decoded.append(EventGridEventInConverter.decode(Datum(json.dumps(event), "json"), trigger_metadata=None))
            except Exception as exc:
                raise BadRequest(400, f"Event {index} of the delivery is not an Event Grid event "
                                      f"({type(exc).__name__}).") from None
        failed = False
        for event in decoded:
            reason = f"EventGrid trigger fired at {datetime.now(timezone.utc).isoformat()}"
            outcome = self.host.invoker.invoke(spec, reason, lambda event=event: event, http=True)
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
        doc = parse_json(body, "The admin request") if body.strip() else {}
        value = doc.get("input") if isinstance(doc, dict) else None
        self.host.invoke_now(spec, "" if value is None else str(value))
        self._send(202)
