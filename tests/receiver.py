"""A real HTTP webhook receiver for tests: records what arrives, verifies Standard Webhooks signatures."""

from __future__ import annotations

import json
import threading
import time

from standardwebhooks.webhooks import Webhook

from tunedrop.receiver import PostReceiver


class Receiver:
    def __init__(self, secret: str, fail_first: int = 0, status: int = 204):
        self.secret = secret
        self.received: list[dict] = []  # verified payloads, with their webhook-id
        self.rejected = 0
        self.attempts = 0
        self.fail_first = fail_first
        self.status = status
        self._lock = threading.Lock()
        self._post: PostReceiver | None = None
        self.url = ""

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.attempts += 1
            if self.attempts <= self.fail_first:
                return 503
            try:
                payload = Webhook(self.secret).verify(body, headers)
            except Exception:
                self.rejected += 1
                return 400
            self.received.append({"id": headers["webhook-id"], **payload})
        return self.status

    def __enter__(self):
        self._post = PostReceiver(self._receive, "/hooks?token=abc")
        self.url = self._post.url
        return self

    def __exit__(self, *exc):
        self._post.close()

    def types(self) -> list[str]:
        with self._lock:
            return [p["type"] for p in self.received]

    def wait_for(self, event_type: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                for payload in self.received:
                    if payload["type"] == event_type:
                        return payload
            time.sleep(0.1)
        raise AssertionError(f"no {event_type} webhook within {timeout_s} s; got {self.types()}")


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()
