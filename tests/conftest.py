"""Shared fixtures: a real Azurite per test session, an environment pointing at it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from shared.storage import reset_default_storage
from tunedrop.azurite import Azurite

# The Azure ML backend's fixtures (transport, settings, backend) for every module that tests it.
pytest_plugins = ["tests.azureml_world"]


@pytest.fixture(scope="session")
def azurite():
    """A real Azurite on free ports, in memory, for the whole test session."""
    instance = Azurite.start()
    yield instance
    instance.stop()


@pytest.fixture
def storage_env(azurite, monkeypatch, tmp_path):
    """Environment for one test: Azurite connection, unique container/queue/table names, state dir.

    Names are unique per test so tests never see each other's blobs, runs or messages.
    """
    suffix = uuid.uuid4().hex[:8]
    env = {
        "TUNEDROP_STORAGE": azurite.connection_string,
        "TUNEDROP_TRAINING_CONTAINER": f"training-{suffix}",
        "TUNEDROP_QUARANTINE_CONTAINER": f"quarantine-{suffix}",
        "TUNEDROP_RUNS_TABLE": f"runs{suffix}",
        "TUNEDROP_WEBHOOK_QUEUE": f"webhooks-{suffix}",
        "TUNEDROP_JOB_EVENTS_QUEUE": f"job-events-{suffix}",
        "TUNEDROP_STATE_DIR": str(tmp_path / "state"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # each test's MLflow lives in its state dir
    reset_default_storage()
    yield env
    reset_default_storage()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The base-model cache: $TUNEDROP_MODEL_CACHE when set (conversion shared across runs)."""
    configured = os.environ.get("TUNEDROP_MODEL_CACHE")
    if configured:
        path = Path(configured).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for all workers (conversion takes a file lock)
        path = tmp_path_factory.getbasetemp().parent / "model-cache"
        path.mkdir(exist_ok=True)
        return path
    return tmp_path_factory.mktemp("model-cache")
