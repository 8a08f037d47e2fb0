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
