"""HTTP load through the local host: HTTP functions have their own workers and a bounded backlog, answer a
fast JSON 429 past it, and never starve the timer, queue and blob triggers; http.server's own refusals
(414, 431) are JSON too."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.host import sample_app
from tests.host.conftest import wait_for
from tunedrop.host.config import HostConfig, HostConfigError
from tunedrop.host.invoke import Invoker, Throttled, index_functions


def test_http_limits_from_host_json(tmp_path):
    assert HostConfig().http_workers == 32 and HostConfig().http_backlog == 32
    (tmp_path / "host.json").write_text(json.dumps(
        {"version": "2.0", "extensions": {"http": {"maxConcurrentRequests": 4, "maxOutstandingRequests": 10}}}))
    config = HostConfig.load(tmp_path)
    assert (config.http_workers, config.http_backlog) == (4, 6)
    (tmp_path / "host.json").write_text(json.dumps(
        {"version": "2.0", "extensions": {"http": {"maxConcurrentRequests": -1, "maxOutstandingRequests": 8}}}))
    assert (HostConfig.load(tmp_path).http_workers, HostConfig.load(tmp_path).http_backlog) == (8, 0)
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"maxConcurrentRequests": 0}}}))
    with pytest.raises(HostConfigError, match="maxConcurrentRequests"):
        HostConfig.load(tmp_path)


def test_the_invoker_keeps_http_and_trigger_lanes_apart(tmp_path):
    [spec] = index_functions(sample_app.app, ["slow"])
    invoker = Invoker(max_workers=1, timeout_s=None, function_directory=str(tmp_path), max_http_workers=1,
                      max_http_backlog=1)
    release = threading.Event()
    try:
        blocked = [threading.Thread(target=invoker.invoke, args=(spec, "test", lambda: release.wait(10)),
                                    kwargs={"http": True}) for _ in range(2)]
        for thread in blocked:
            thread.start()
        wait_for(lambda: invoker.http_outstanding == 2, timeout=5)  # one running, one waiting
        started = time.monotonic()
        with pytest.raises(Throttled):
            invoker.invoke(spec, "test", lambda: None, http=True)
        assert time.monotonic() - started < 3  # refused, not queued: a waiting one would take 5 s and more
        # The trigger lane still runs at once (the bind raises, which is the quickest invocation there is).
        outcome = invoker.invoke(spec, "test", lambda: (_ for _ in ()).throw(ValueError("ran")))
        assert isinstance(outcome.error, ValueError)
    finally:
        release.set()
    for thread in blocked:
        thread.join(10)
    wait_for(lambda: invoker.http_outstanding == 0, timeout=5)  # slots come back once the functions end
    invoker.shutdown()


def test_saturated_http_workers_do_not_stall_timers_and_excess_requests_get_a_fast_429(make_host):
    # Two trigger workers and two HTTP workers (+1 waiting): with one shared pool the slow requests
    # would hold every worker and the every-second timer would stop firing.
    host = make_host("slow", "every_second", max_workers=2, max_http_workers=2, max_http_backlog=1)
    results: list[httpx.Response] = []
    slow = [threading.Thread(target=lambda: results.append(
        httpx.get(f"{host.base_url}/api/slow", params={"s": 4}, timeout=30))) for _ in range(3)]
    for thread in slow:
        thread.start()
    wait_for(lambda: host.invoker.http_outstanding == 3, timeout=5)
    fired = len(sample_app.CALLS["every_second"])

    started = time.monotonic()
    refused = httpx.get(f"{host.base_url}/api/slow", params={"s": 0}, timeout=30)
    assert time.monotonic() - started < 3  # refused at once, not after the 4 s slow requests
    assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
    assert refused.headers["content-type"].startswith("application/json") and "busy" in refused.json()["error"]

    wait_for(lambda: len(sample_app.CALLS["every_second"]) >= fired + 2, timeout=3.5)  # timers fire meanwhile
    assert all(thread.is_alive() for thread in slow)  # ...while the slow requests are still running
    for thread in slow:
        thread.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]  # the waiting one ran once a worker was free
    wait_for(lambda: host.invoker.http_outstanding == 0, timeout=5)
    assert httpx.get(f"{host.base_url}/api/slow", params={"s": 0}).status_code == 200


def _raw(host, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", host.port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("iso-8859-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /api/slow HTTP/1.1\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"BREW /api/slow HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /api/slow extra HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_http_servers_own_refusals_are_json(make_host, request_bytes, status):
    host = make_host("slow")
    code, headers, body = _raw(host, request_bytes)
    assert code == status
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    assert isinstance(json.loads(body)["error"], str) and b"<" not in body
