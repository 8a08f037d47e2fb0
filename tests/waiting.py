"""Waiting in tests for something a real process does: a bound that only guards against a hang."""

from __future__ import annotations

import time


def wait_for(condition, timeout_s: float, what: str):
    """``condition()``'s first truthy value, polled every 0.2 s; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout_s} s")
