"""A real HTTP webhook receiver for tests: records what arrives, verifies Standard Webhooks signatures."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook


class Receiver:
    def __init__(self, secret: str, fail_first: int = 0, status: int = 204):
        self.secret = secret
        self.received: list[dict] = []  # verified payloads, with their webhook-id
        self.rejected = 0
        self.attempts = 0
        self.fail_first = fail_first
        self.status = status
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.attempts += 1
                    if receiver.attempts <= receiver.fail_first:
                        self.send_response(503)
                        self.end_headers()
                        return
                    try:
                        payload = Webhook(receiver.secret).verify(body, dict(self.headers))
                    except Exception:
                        receiver.rejected += 1
                        self.send_response(400)
                        self.end_headers()
                        return
                    receiver.received.append({"id": self.headers["webhook-id"], **payload})
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

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
