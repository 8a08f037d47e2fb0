"""What every trigger listener shares: the host's settings and a background polling loop."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tunedrop.host.invoke import FunctionSpec, Invoker

log = logging.getLogger("tunedrop.host")


@dataclass
class HostContext:
    """Settings the listeners read (host.json values, possibly overridden by LocalHost's arguments)."""

    environ: dict[str, str]
    invoker: Invoker
    host_id: str
    stopping: threading.Event
    poll_interval_s: float
    max_dequeue_count: int
    visibility_timeout_s: float
    batch_size: int
    message_encoding: str
    function_timeout_s: float | None


class PollingListener:
    """A background thread that calls ``poll()`` until the host stops.

    ``poll()`` returns True when it found work, and is then called again at once (the host's queue
    listener polls again immediately after a non-empty batch); otherwise the thread waits
    ``poll_interval_s``. ``setup()`` (create containers/queues) is retried until it succeeds, as the
    host keeps retrying a listener that could not start.
    """

    def __init__(self, spec: FunctionSpec, ctx: HostContext, workers: int = 1):
        self.spec = spec
        self.ctx = ctx
        self._thread = threading.Thread(target=self._run, name=f"listener-{spec.name}", daemon=True)
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"dispatch-{spec.name}")
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        self._workers.shutdown(wait=True, cancel_futures=True)

    def setup(self) -> None:
        """Prepare storage; called (again) until it succeeds."""

    def poll(self) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        ready = False
        while not self.ctx.stopping.is_set():
            try:
                if not ready:
                    self.setup()
                    ready = True
                found = self.poll()
                if self._failing:
                    log.info("The listener for function '%s' has recovered.", self.spec.log_name)
                    self._failing = False
            except Exception as exc:
                found = False
                if not self._failing:
                    what = "was unable to start" if not ready else "failed to poll"
                    log.error("The listener for function '%s' %s: %s", self.spec.log_name, what, exc)
                    self._failing = True
            if not found:
                self.ctx.stopping.wait(self.ctx.poll_interval_s)
