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


#: Test files that take longest (`pytest --durations`), run first: with two workers taking a file at a time
#: (`make test`), a long file started last would leave one worker idle at the end.
LONGEST_FIRST = ("tests/test_demo.py", "tests/test_e2e.py", "tests/surfaces/", "tests/reliability/test_faults.py",
                 "tests/local/test_server.py", "tests/local/test_models.py", "tests/reliability/test_storms.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
