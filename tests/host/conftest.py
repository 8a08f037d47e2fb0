"""Fixtures for the local host's tests: the sample app's settings and hosts started on free ports."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.host import sample_app
from tunedrop.azurite import free_port
from tunedrop.host import LocalHost


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def sample_env(azurite, storage_env, monkeypatch):
    """App settings for sample_app: its own container and queue names on the session's Azurite."""
    suffix = uuid.uuid4().hex[:8]
    env = {"SAMPLE_STORAGE": azurite.connection_string, "SAMPLE_CONTAINER": f"sample-{suffix}",
           "SAMPLE_QUEUE": f"sample-{suffix}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sample_app.reset()
    yield env
    sample_app.reset()


@pytest.fixture
def make_host(sample_env, tmp_path):
    """Build and start a LocalHost for sample_app (only the named functions); all are stopped at the end."""
    hosts: list[LocalHost] = []
    host_id = f"test-{uuid.uuid4().hex[:8]}"

    def make(*functions: str, **kwargs) -> LocalHost:
        kwargs.setdefault("root", tmp_path)
        kwargs.setdefault("state_dir", tmp_path / "state")
        kwargs.setdefault("host_id", host_id)
        kwargs.setdefault("poll_interval_s", 0.1)
        host = LocalHost(sample_app.app, port=free_port(), functions=functions or None, **kwargs)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        host.stop()
