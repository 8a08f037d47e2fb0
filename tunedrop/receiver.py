"""A local HTTP server that takes POSTs: the demo's webhook receiver, and the tests' receivers."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

#: handle(path, headers with lower-case names, body) -> the response status
PostHandler = Callable[[str, dict[str, str], bytes], int]


class PostReceiver:
    """Listens on 127.0.0.1 at a free port from construction until :meth:`close`, in a thread,
    and answers each POST with the status ``handle`` returns (an exception in it answers 500)."""

    def __init__(self, handle: PostHandler, path: str = "/") -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {name.lower(): value for name, value in self.headers.items()}
                try:
                    status = handle(self.path, headers, body)
                except Exception:
                    status = 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> PostReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
