"""HTTP trigger through the local host: routes, methods, keys, errors, concurrency."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading

import httpx
import pytest

from tests.host import sample_app
from tests.host.conftest import wait_for
from tunedrop.azurite import free_port
from tunedrop.host import LocalHost


def test_route_params_methods_and_response(make_host):
    host = make_host("items", "secret")
    base = host.base_url

    response = httpx.get(f"{base}/api/items/5/blue", params={"q": "x"})
    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-sample"] == "yes"
    doc = response.json()
    assert doc["id"] == "5" and doc["tag"] == "blue" and doc["method"] == "GET" and doc["q"] == "x"
    assert doc["url"].startswith(f"{base}/api/items/5/blue?")

    assert httpx.get(f"{base}/api/items/7").json()["tag"] is None  # optional {tag?}
    assert httpx.post(f"{base}/api/ITEMS/7", content=b"payload").json()["body"] == "payload"
    assert httpx.get(f"{base}/api/items/abc").status_code == 404  # {id:int}
    assert httpx.delete(f"{base}/api/items/5").status_code == 405
    assert httpx.get(f"{base}/api/nowhere").status_code == 404
    assert httpx.get(f"{base}/items/5").status_code == 404  # outside the route prefix
    assert httpx.get(f"{base}/").status_code == 200
    assert len(sample_app.CALLS["items"]) == 3 and len(set(sample_app.CALLS["items"])) == 3  # context.invocation_id


def test_auth_levels_and_keys(make_host, tmp_path):
    host = make_host("secret", "admin_only")
    url = f"{host.base_url}/api/secret"

    wrong_header, wrong_code = {"x-functions-key": "wrong"}, {"code": "wrong"}
    for response in (httpx.get(url), httpx.get(url, headers=wrong_header), httpx.get(url, params=wrong_code)):
        assert response.status_code == 401 and response.content == b""
    assert httpx.get(url, headers={"x-functions-key": host.function_key}).text == "the secret"
    assert httpx.get(url, params={"code": host.function_key}).status_code == 200
    assert httpx.get(url, params={"code": host.master_key}).status_code == 200

    admin = f"{host.base_url}/api/admin-only"
    assert httpx.get(admin, headers={"x-functions-key": host.function_key}).status_code == 401
    assert httpx.get(admin, headers={"x-functions-key": host.master_key}).text == "admin"

    keys_file = tmp_path / "state" / "host_keys.json"
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    assert json.loads(keys_file.read_text()) == {"masterKey": host.master_key, "functionKey": host.function_key}
    again = make_host("secret")  # keys are created once and reused
    assert (again.master_key, again.function_key) == (host.master_key, host.function_key)


def test_failure_gives_500_without_trace_and_logs_like_the_host(make_host, caplog):
    caplog.set_level(logging.INFO, logger="tunedrop.host")
    host = make_host("boom", "secret")

    response = httpx.get(f"{host.base_url}/api/boom")
    assert response.status_code == 500 and response.content == b""
    httpx.get(f"{host.base_url}/api/secret", params={"code": host.function_key}, headers={"X-Private": "hdr-value"})

    text = caplog.text
    assert "Executing 'Functions.boom' (Reason='This function was programmatically called via the host APIs.', Id=" in text
    assert "Executed 'Functions.boom' (Failed, Id=" in text and "boom-internal-detail" in text  # traceback logged
    assert "Executed 'Functions.secret' (Succeeded, Id=" in text
    assert host.function_key not in text and "hdr-value" not in text


def test_a_slow_function_does_not_block_other_requests(make_host):
    host = make_host("slow", "items")
    results = {}
    slow = threading.Thread(target=lambda: results.setdefault(
        "slow", httpx.get(f"{host.base_url}/api/slow", params={"s": 2}, timeout=10)))
    slow.start()
    wait_for(lambda: httpx.get(f"{host.base_url}/api/items/1").status_code == 201, timeout=5)
    assert slow.is_alive()  # the quick request was answered while the slow one still runs
    slow.join()
    assert results["slow"].text == "slow done"


def test_route_prefix_from_host_json(make_host, tmp_path):
    root = tmp_path / "app"
    root.mkdir()
    (root / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": ""}}}))
    host = make_host("items", root=root)
    assert httpx.get(f"{host.base_url}/items/3").json()["id"] == "3"
    assert httpx.get(f"{host.base_url}/api/items/3").status_code == 404


def test_function_timeout_and_context_manager(sample_env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tunedrop.host")
    port = free_port()
    with LocalHost(sample_app.app, root=tmp_path, state_dir=tmp_path, port=port, functions=["slow"],
                   function_timeout_s=0.3) as host:
        assert httpx.get(f"{host.base_url}/api/slow", params={"s": 1}).status_code == 500
    assert "Timeout value of 00:00:00.3000000 exceeded by function 'Functions.slow'" in caplog.text
    assert "Executed 'Functions.slow' (Failed" in caplog.text
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens any more
        httpx.get(f"http://127.0.0.1:{port}/")
