"""A small client of the app's HTTP API (status, score) and the host's admin route (run a function now)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx


class ApiError(Exception):
    """The API answered with an error; the message is the API's own."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def host_keys(state_dir: Path) -> dict:
    path = Path(state_dir) / "host_keys.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


class ApiClient:
    def __init__(self, base_url: str | None = None, key: str | None = None, state_dir: Path | None = None,
                 timeout_s: float = 120.0):
        state_dir = Path(state_dir or os.environ.get("TUNEDROP_STATE_DIR", ".tunedrop"))
        keys = host_keys(state_dir)
        self.base_url = (base_url or os.environ.get("TUNEDROP_API_URL") or "http://127.0.0.1:7071").rstrip("/")
        self.key = key or os.environ.get("TUNEDROP_FUNCTION_KEY") or keys.get("functionKey", "")
        self.master_key = os.environ.get("TUNEDROP_MASTER_KEY") or keys.get("masterKey", "")
        self._http = httpx.Client(timeout=timeout_s)

    def _call(self, method: str, path: str, *, key: str | None = None, **kwargs) -> dict:
        headers = {"x-functions-key": key if key is not None else self.key}
        try:
            response = self._http.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
        except httpx.ConnectError:
            raise ApiError(0, f"Nothing answers at {self.base_url}: start it with `tunedrop up`.") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text or f"HTTP {response.status_code}"
            raise ApiError(response.status_code, f"HTTP {response.status_code}: {message}")
        return response.json() if response.content else {}

    def runs(self) -> list[dict]:
        return self._call("GET", "/api/runs")["runs"]

    def run(self, run_id: str) -> dict:
        return self._call("GET", f"/api/runs/{run_id}")

    def progress(self, run_id: str) -> dict:
        return self._call("GET", f"/api/runs/{run_id}/progress")

    def retry(self, run_id: str) -> dict:
        return self._call("POST", f"/api/runs/{run_id}/retry")

    def cancel(self, run_id: str) -> dict:
        return self._call("POST", f"/api/runs/{run_id}/cancel")

    def deploy(self, run_id: str, force: bool = False) -> dict:
        return self._call("POST", f"/api/runs/{run_id}/deploy" + ("?force=true" if force else ""))

    def undeploy(self, run_id: str) -> dict:
        return self._call("POST", f"/api/runs/{run_id}/undeploy")

    def score(self, run_id: str, messages: list[dict], **parameters) -> dict:
        body = {"input_data": {"input_string": messages, "parameters": parameters}, "params": {}}
        return self._call("POST", f"/api/runs/{run_id}/score", json=body)

    def run_function(self, name: str) -> None:
        """Run a non-HTTP function now (the host's admin route), e.g. the sweeper."""
        self._call("POST", f"/admin/functions/{name}", key=self.master_key, json={"input": ""})
