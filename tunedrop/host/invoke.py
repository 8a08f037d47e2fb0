"""Index a FunctionApp's functions and invoke them the way the Functions host and Python worker do.

Indexing reads each function's own binding metadata (``get_functions()``); invoking runs the user
function in a thread pool (``async def`` ones under ``asyncio.run``), logs the host's
"Executing 'Functions.<name>'" / "Executed ..." lines and enforces ``functionTimeout``.

Two lanes of worker threads, so that HTTP traffic can never starve the triggers the host drives
itself: HTTP-delivered invocations (HTTP functions, Event Grid deliveries; ``http=True``) run on
``max_http_workers`` threads with at most ``max_http_backlog`` more waiting for one, and a further
one is refused at once with ``Throttled`` (the HTTP front answers 429 + Retry-After, as the
Functions host does past ``extensions.http.maxOutstandingRequests``); timer, queue and blob
invocations and the admin API's run on their own ``max_workers`` threads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import azure.functions as func

from tunedrop.host.config import HostConfigError, format_timespan

log = logging.getLogger("tunedrop.host")
#: The "Executing"/"Executed" lines: a logger of their own, so a quiet `tunedrop up` can leave them out.
invocations = logging.getLogger("tunedrop.host.invocations")

HTTP, TIMER, BLOB, QUEUE, EVENT_GRID = "httpTrigger", "timerTrigger", "blobTrigger", "queueTrigger", "eventGridTrigger"
SUPPORTED_TRIGGERS = (HTTP, TIMER, BLOB, QUEUE, EVENT_GRID)


@dataclass
class FunctionSpec:
    """One indexed function: its name, trigger binding (as in function.json) and user code."""

    name: str
    trigger: dict[str, Any]
    func: Callable[..., Any]
    param: str
    param_type: Any = None
    wants_context: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str:
        return self.trigger["type"]

    @property
    def log_name(self) -> str:
        return f"Functions.{self.name}"

    @property
    def function_id(self) -> str:
        """The id the host uses in blob receipts, poison messages and timer status blobs."""
        return f"Host.Functions.{self.name}"


def _plain(value: Any) -> Any:
    """Binding values as function.json holds them (enums become their strings)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def index_functions(app: func.FunctionApp, only: typing.Iterable[str] | None = None) -> list[FunctionSpec]:
    """The app's functions, from its binding metadata, like the worker's indexing.

    ``only`` mirrors ``func start --functions``: load just those names.
    """
    # FunctionApp.get_functions() remembers the names it returned and raises "does not have a unique
    # function name" on a second call (the worker indexes once per process). Index with a clean slate
    # and put back what was there, so a host can be built again for the same app (a restart) and
    # other code calling get_functions() later sees no difference.
    remembered = getattr(app, "functions_bindings", None)
    app.functions_bindings = None
    try:
        functions = app.get_functions()
    finally:
        app.functions_bindings = remembered
    wanted = set(only) if only else None
    specs = []
    for function in functions:
        name = function.get_function_name()
        if wanted is not None and name not in wanted:
            continue
        trigger = {k: _plain(v) for k, v in function.get_trigger().get_dict_repr().items()}
        if trigger["type"] not in SUPPORTED_TRIGGERS:
            raise HostConfigError(f"Function {name}: trigger {trigger['type']} is not supported by the local host.")
        others = [b for b in function.get_dict_repr()["bindings"]
                  if b.get("name") != trigger["name"] and not (trigger["type"] == HTTP and _plain(b.get("type")) == "http")]
        if others:
            kinds = ", ".join(str(_plain(b.get("type"))) for b in others)
            raise HostConfigError(f"Function {name}: bindings other than its trigger ({kinds}) are not supported "
                                  "by the local host.")
        user_func = function.get_user_function()
        signature = inspect.signature(user_func)
        if trigger["name"] not in signature.parameters:
            raise HostConfigError(f"Function {name}: it has no parameter named {trigger['name']!r} for its trigger.")
        try:
            hints = typing.get_type_hints(user_func)
        except Exception:  # unresolvable annotations: fall back to the raw ones
            hints = {p.name: p.annotation for p in signature.parameters.values()}
        annotation = hints.get(trigger["name"], inspect.Parameter.empty)
        specs.append(FunctionSpec(
            name=name, trigger=trigger, func=user_func, param=trigger["name"],
            param_type=None if annotation is inspect.Parameter.empty else annotation,
            wants_context="context" in signature.parameters,
        ))
    if wanted:
        missing = wanted - {s.name for s in specs}
        if missing:
            raise HostConfigError(f"No function named {', '.join(sorted(missing))} in the app.")
    return specs


class _TraceContext:
    def __init__(self):
        self.trace_parent, self.trace_state, self.attributes = "", "", {}


class _RetryContext:
    def __init__(self):
        self.retry_count, self.max_retry_count, self.exception = 0, 0, None


class InvocationContext(func.Context):
    """What the worker passes to a ``context`` parameter."""

    def __init__(self, invocation_id: str, function_name: str, function_directory: str):
        self._id, self._name, self._dir = invocation_id, function_name, function_directory
        self._tls = threading.local()
        self._tls.invocation_id = invocation_id

    invocation_id = property(lambda self: self._id)
    function_name = property(lambda self: self._name)
    function_directory = property(lambda self: self._dir)
    thread_local_storage = property(lambda self: self._tls)
    trace_context = property(lambda self: _TraceContext())
    retry_context = property(lambda self: _RetryContext())


class Throttled(Exception):
    """The HTTP lane's workers are busy and its backlog is full: the invocation was not started."""


class FunctionTimeout(Exception):
    """The invocation ran past host.json's functionTimeout."""


@dataclass
class Outcome:
    invocation_id: str
    succeeded: bool
    value: Any = None
    error: BaseException | None = None


class Invoker:
    """Runs invocations in thread pools (an HTTP lane and a trigger lane), one "Executing"/"Executed" pair
    of log lines each."""

    def __init__(self, *, max_workers: int, timeout_s: float | None, function_directory: str,
                 max_http_workers: int | None = None, max_http_backlog: int = 0):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="function")
        self.max_http_workers = max(1, max_http_workers or max_workers)
        self.max_http_backlog = max(0, max_http_backlog)
        self._http_pool = ThreadPoolExecutor(max_workers=self.max_http_workers, thread_name_prefix="http-function")
        self._http_slots = threading.BoundedSemaphore(self.max_http_workers + self.max_http_backlog)
        self._http_count_lock = threading.Lock()
        self._http_outstanding = 0
        self._timeout_s = timeout_s
        self._dir = function_directory

    @property
    def http_outstanding(self) -> int:
        """HTTP-lane invocations running or waiting for a worker now."""
        return self._http_outstanding

    def invoke(self, spec: FunctionSpec, reason: str, bind: Callable[[], Any], *, http: bool = False) -> Outcome:
        """Run ``spec`` with the trigger value ``bind()`` returns (binding runs in the worker thread too).

        Blocks the caller until the function ends or times out; never raises for the function's errors.
        ``http=True`` runs it on the HTTP lane, and raises Throttled (nothing started, nothing logged
        but a warning) when that lane's workers and backlog are all taken.
        """
        if http:
            if not self._http_slots.acquire(blocking=False):
                log.warning("'%s' not run: all %d HTTP workers are busy and %d more invocations wait for one "
                            "(answered 429).", spec.log_name, self.max_http_workers, self.max_http_backlog)
                raise Throttled(spec.log_name)
            self._count_http(+1)
        invocation_id = str(uuid.uuid4())
        started = time.monotonic()
        invocations.info("Executing '%s' (Reason='%s', Id=%s)", spec.log_name, reason, invocation_id)
        outcome = self._run(spec, invocation_id, bind, http)
        duration = int((time.monotonic() - started) * 1000)
        if outcome.succeeded:
            invocations.info("Executed '%s' (Succeeded, Id=%s, Duration=%dms)", spec.log_name, invocation_id, duration)
        else:
            traceback = None if isinstance(outcome.error, FunctionTimeout) else outcome.error
            invocations.error("Executed '%s' (Failed, Id=%s, Duration=%dms)", spec.log_name, invocation_id, duration,
                      exc_info=traceback)
        return outcome

    def _count_http(self, delta: int) -> None:
        with self._http_count_lock:
            self._http_outstanding += delta

    def _release_http(self, _future=None) -> None:
        """An HTTP-lane slot is free once its function really ends (a timed-out one still holds a worker)."""
        self._count_http(-1)
        self._http_slots.release()

    def _run(self, spec: FunctionSpec, invocation_id: str, bind: Callable[[], Any], http: bool = False) -> Outcome:
        try:
            future = (self._http_pool if http else self._pool).submit(self._call, spec, invocation_id, bind)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown": the host is stopping
            if http:
                self._release_http()
            return Outcome(invocation_id, False, error=exc)
        if http:
            future.add_done_callback(self._release_http)
        if not wait([future], timeout=self._timeout_s).done:
            # The host would now restart the worker process; a thread cannot be killed, so it runs on.
            log.error("Timeout value of %s exceeded by function '%s' (Id: '%s'). Initiating cancellation.",
                      format_timespan(self._timeout_s), spec.log_name, invocation_id)
            return Outcome(invocation_id, False, error=FunctionTimeout(spec.log_name))
        if future.cancelled():  # still waiting for a worker when the host stopped
            return Outcome(invocation_id, False, error=RuntimeError("the host stopped before the invocation started"))
        if future.exception() is not None:
            return Outcome(invocation_id, False, error=future.exception())
        return Outcome(invocation_id, True, future.result())

    def _call(self, spec: FunctionSpec, invocation_id: str, bind: Callable[[], Any]) -> Any:
        kwargs = {spec.param: bind()}
        if spec.wants_context:
            kwargs["context"] = InvocationContext(invocation_id, spec.name, self._dir)
        if inspect.iscoroutinefunction(spec.func):
            return asyncio.run(spec.func(**kwargs))
        result = spec.func(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return result

    def shutdown(self) -> None:
        self._http_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)


async def _await(awaitable):
    return await awaitable
