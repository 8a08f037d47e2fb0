"""How a fine-tune job reports: log lines on stderr, status files written atomically and run
events posted to the events webhook (retried, never raising)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# -- events ------------------------------------------------------------------------------------


def post_event(url: str | None, event: dict[str, Any], attempts: int = 5, timeout_s: float = 10.0) -> bool:
    """POST one event (as an Event Grid array) to ``url``; retries, never raises."""
    if not url:
        return False
    body = json.dumps([event]).encode()
    headers = {"Content-Type": "application/json", "aeg-event-type": "Notification"}
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
            return True
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                log(f"event {event['eventType'].rsplit('.', 1)[-1]} rejected: HTTP {exc.code}")
                return False
            problem = f"HTTP {exc.code}"
        except Exception as exc:  # unreachable host, timeout, reset...
            problem = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            time.sleep(delay)
            delay *= 2
    log(f"event not delivered after {attempts} tries ({problem})")
    return False


class Progress:
    """``progress.json`` of a job, for people watching it (the status page, `tunedrop drop --wait`): the phase,
    the step and its loss, every step's loss so far, and the time left at the pace so far. Written atomically,
    at most every ``every_s`` seconds within a phase (a phase change is written at once)."""

    #: Most loss points kept: past it every other one is dropped (the curve keeps its shape, the file stays small).
    MAX_POINTS = 1000

    def __init__(self, path: Path, every_s: float = 0.5):
        self.path = path
        self.every_s = every_s
        self.state: dict[str, Any] = {"phase": "starting", "losses": [], "started_at": now()}
        self._started = time.monotonic()
        self._written = 0.0

    def update(self, phase: str | None = None, loss_point: tuple[int, float] | None = None, **fields: Any) -> None:
        changed = phase is not None and phase != self.state["phase"]
        if phase is not None:
            self.state["phase"] = phase
        if loss_point is not None:
            self.state["losses"].append([loss_point[0], round(loss_point[1], 5)])
            if len(self.state["losses"]) > self.MAX_POINTS:
                self.state["losses"] = self.state["losses"][::2]
        self.state.update(fields)
        elapsed = time.monotonic() - self._started
        self.state["elapsed_s"] = round(elapsed, 1)
        if changed or time.monotonic() - self._written >= self.every_s:
            self._written = time.monotonic()
            try:
                write_json_atomic(self.path, {**self.state, "updated_at": now()})
            except OSError as exc:  # watching is best effort: never fail the job for it
                log(f"progress not written: {exc}")
