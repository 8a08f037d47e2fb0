"""LocalHost: load a Python v2 FunctionApp and drive its triggers for real, and the CLI entry point."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import azure.functions as func
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.meta import Datum

from tunedrop.host import http_streams
from tunedrop.host.blob import BlobListener
from tunedrop.host.config import HostConfig, HostConfigError, default_host_id, load_or_create_keys
from tunedrop.host.http import Route, make_server, sort_routes
from tunedrop.host.invoke import BLOB, EVENT_GRID, HTTP, QUEUE, TIMER, FunctionSpec, Invoker, index_functions
from tunedrop.host.listener import HostContext
from tunedrop.host.queue import QueueListener, bind_queue_message
from tunedrop.host.timer import API_REASON, TimerListener

log = logging.getLogger("tunedrop.host")


class LocalHost:
    """A small local stand-in for the Functions host (what ``func start`` runs), for one FunctionApp.

    ``environ`` holds the app settings (default: ``os.environ``); they resolve ``%NAME%`` in
    bindings and name the storage connections. The functions run in this process and read
    ``os.environ`` themselves, as the worker reads the app settings from its environment.
    ``host.json`` is read from ``root``; ``poll_interval_s`` (blob and queue polling),
    ``visibility_timeout_s``, ``max_dequeue_count`` and ``function_timeout_s`` override it.
    ``functions`` loads only those functions (``func start --functions``). Keys live in
    ``<state_dir>/host_keys.json`` (default ``<root>/.tunedrop``).

    Worker threads come in two lanes, so HTTP traffic never starves the timer, queue and blob
    triggers: ``max_workers`` (default 32) run timer, queue, blob and admin-API invocations;
    ``max_http_workers`` run HTTP functions and Event Grid deliveries, with ``max_http_backlog``
    more waiting for a worker, and any further HTTP request is answered at once with 429, a JSON
    error and ``Retry-After``. Their defaults come from host.json's ``extensions.http``:
    ``maxConcurrentRequests`` (default 32) and ``maxOutstandingRequests`` (running plus waiting;
    default twice maxConcurrentRequests, so a backlog of 32).
    """

    _UNSET = object()

    def __init__(self, app: func.FunctionApp, *, environ: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int = 7071, root: Path, state_dir: Path | None = None, poll_interval_s: float = 1.0,
                 visibility_timeout_s: float | None = None, max_dequeue_count: int | None = None,
                 function_timeout_s: float | None | object = _UNSET, host_id: str | None = None,
                 functions: Iterable[str] | None = None, max_workers: int = 32,
                 max_http_workers: int | None = None, max_http_backlog: int | None = None):
        self.root = Path(root).resolve()
        self.environ = dict(os.environ if environ is None else environ)
        self.config = HostConfig.load(self.root)
        self.host_id = host_id or default_host_id(self.environ)
        keys = load_or_create_keys(Path(state_dir) if state_dir else self.root / ".tunedrop")
        self.master_key: str = keys["masterKey"]
        self.function_key: str = keys["functionKey"]
        timeout = self.config.function_timeout_s if function_timeout_s is self._UNSET else function_timeout_s
        self.invoker = Invoker(
            max_workers=max_workers, timeout_s=timeout, function_directory=str(self.root),
            max_http_workers=self.config.http_workers if max_http_workers is None else max_http_workers,
            max_http_backlog=self.config.http_backlog if max_http_backlog is None else max_http_backlog)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.ctx = HostContext(
            environ=self.environ, invoker=self.invoker, host_id=self.host_id, stopping=self._stopping,
            poll_interval_s=poll_interval_s,
            max_dequeue_count=max_dequeue_count or self.config.max_dequeue_count,
            visibility_timeout_s=self.config.visibility_timeout_s if visibility_timeout_s is None else visibility_timeout_s,
            batch_size=self.config.batch_size, message_encoding=self.config.message_encoding,
            function_timeout_s=timeout)
        self.functions = {spec.name: spec for spec in index_functions(app, functions)}
        self.routes = sort_routes([Route(s, self.config.route_prefix) for s in self.functions.values() if s.kind == HTTP])
        self.http_streams = http_streams.uses_streams([route.spec.param_type for route in self.routes])
        if self.http_streams:
            for route in self.routes:
                http_streams.check_function(route.spec.name, route.spec.param_type)
        kinds = {BLOB: BlobListener, QUEUE: QueueListener, TIMER: TimerListener}
        self.listeners = {s.name: kinds[s.kind](s, self.ctx) for s in self.functions.values() if s.kind in kinds}
        self._address, self._port = host, port
        self._server = None
        self._threads: list[threading.Thread] = []
        self._background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin-invoke")

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def authority(self) -> str:
        return f"{self._address}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.authority}"

    def start(self) -> "LocalHost":
        """Listen on the HTTP port and start every trigger listener; returns once the port listens."""
        self._server = make_server(self, self._address, self._port)
        http_thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="http", daemon=True)
        http_thread.start()
        self._threads.append(http_thread)
        for listener in self.listeners.values():
            listener.start()
        self._log_functions()
        log.info("Host started (hostId=%s). Listening on %s", self.host_id, self.base_url)
        return self

    def stop(self) -> None:
        """Stop listening and polling, let running invocations finish, join every thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stopping.set()
        if self._server is None:  # never started
            self._background.shutdown(wait=True)
            self.invoker.shutdown()
            return
        self._server.shutdown()
        for listener in self.listeners.values():
            listener.join()
        self._background.shutdown(wait=True, cancel_futures=True)
        self.invoker.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join()
        log.info("Host stopped.")

    def serve_forever(self) -> None:
        """Start (if not yet started) and block until ``stop()`` or SIGINT/SIGTERM (main thread)."""
        if self._server is None:
            self.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self._stopping.set())
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> "LocalHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the HTTP front -----------------------------------------------------------------

    def function(self, name: str, kind: str | None = None) -> FunctionSpec | None:
        """The function called ``name`` (case-insensitive, as the host matches names), of ``kind`` if given."""
        for spec in self.functions.values():
            if spec.name.lower() == name.lower() and (kind is None or spec.kind == kind):
                return spec
        return None

    def invoke_now(self, spec: FunctionSpec, value: str) -> None:
        """Run a non-HTTP function in the background, as the admin API does, with ``value`` as input.

        Timer: a TimerRequest (the input is ignored). Queue: a message with that body. Blob: the blob
        at path "container/name". Event Grid: the input parsed as one event (JSON).
        """
        if spec.kind == TIMER:
            listener = self.listeners[spec.name]
            self._background.submit(listener.fire, reason=API_REASON)
            return
        if spec.kind == QUEUE:
            def bind():
                return bind_queue_message(spec, id=None, body=value.encode("utf-8"), dequeue_count=1)
        elif spec.kind == BLOB:
            listener = self.listeners[spec.name]

            def bind():
                container, _, name = value.strip("/").partition("/")
                if container != listener.container:
                    raise HostConfigError(f"input {value!r} is not a blob in container {listener.container!r}")
                return listener.bind(name)
        else:  # Event Grid
            def bind():
                return EventGridEventInConverter.decode(Datum(json.dumps(json.loads(value)), "json"), trigger_metadata=None)
        self._background.submit(self.invoker.invoke, spec, API_REASON, bind)

    def _log_functions(self) -> None:
        lines = []
        for spec in self.functions.values():
            if spec.kind == HTTP:
                route = next(r for r in self.routes if r.spec is spec)
                methods = ",".join(sorted(route.methods)) if route.methods else "ALL"
                prefix = f"/{self.config.route_prefix}" if self.config.route_prefix else ""
                lines.append(f"\t{spec.name}: [{methods}] {self.base_url}{prefix}/{spec.trigger.get('route') or spec.name}")
            elif spec.kind == EVENT_GRID:
                route = f"{self.base_url}/runtime/webhooks/EventGrid?functionName={spec.name}"
                lines.append(f"\t{spec.name}: eventGridTrigger {route}")
            else:
                lines.append(f"\t{spec.name}: {self.listeners[spec.name].describe()}")
        log.info("Functions:\n\n%s\n", "\n".join(lines))


# -- CLI ----------------------------------------------------------------------------------------


def load_local_settings(root: Path) -> None:
    """Put local.settings.json "Values" into os.environ, never over a variable already set (as Core Tools does)."""
    path = Path(root) / "local.settings.json"
    if not path.exists():
        return
    values = json.loads(path.read_text(encoding="utf-8-sig")).get("Values") or {}
    for key, value in values.items():
        if key in os.environ:
            log.info("Skipping '%s' from local.settings.json as it's already defined in current environment variables.", key)
        else:
            os.environ[key] = str(value)


def load_app(app_module: str, root: Path) -> func.FunctionApp:
    """Import ``app_module`` with ``root`` on sys.path and find its FunctionApp (``app`` first), like the worker."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(app_module)
    if isinstance(getattr(module, "app", None), func.FunctionApp):
        return module.app
    for value in vars(module).values():
        if isinstance(value, func.FunctionApp):
            return value
    raise HostConfigError(f"Module {app_module!r} defines no azure.functions.FunctionApp.")


def run_host(app_module: str = "function_app", root: Path = Path("."), port: int = 7071, *, host: str = "127.0.0.1",
             state_dir: Path | None = None, functions: Iterable[str] | None = None,
             poll_interval_s: float = 1.0) -> int:
    """Serve ``<root>/<app_module>.py``'s FunctionApp until SIGINT/SIGTERM; returns the exit code."""
    root = Path(root).resolve()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
        logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every request at INFO
    load_local_settings(root)
    app = load_app(app_module, root)
    LocalHost(app, root=root, port=port, host=host, state_dir=state_dir, functions=functions,
              poll_interval_s=poll_interval_s).serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunedrop.host", description="Run a Python v2 FunctionApp locally.")
    parser.add_argument("--root", type=Path, default=Path("."), help="folder with function_app.py and host.json")
    parser.add_argument("--module", default="function_app", help="module holding the FunctionApp")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--state-dir", type=Path, default=None, help="where host_keys.json lives (default <root>/.tunedrop)")
    parser.add_argument("--functions", nargs="*", default=None, help="load only these functions")
    args = parser.parse_args(argv)
    return run_host(args.module, args.root, args.port, host=args.host, state_dir=args.state_dir,
                    functions=args.functions)
