"""Fixtures for the reliability suite: the app's handlers on real Azurite with the real local backend
(tiny model, a few steps), no host: the tests deliver events themselves, twice, ten at once, or
into a process that dies half-way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import azure.functions as func
import pytest

from shared.backends.local import LocalBackend
from shared.events import RUN_ID_TAG, run_event
from shared.pipeline import get_pipeline
from shared.settings import Settings
from shared.storage import default_storage
from shared.webhooks import OutboxMessage, new_secret
from tunedrop.local import PROJECT_ROOT

QUICK_TRAINING = {"num_train_epochs": 1, "max_steps": 2, "max_seq_length": 48}


@pytest.fixture
def app_env(storage_env, model_cache, monkeypatch):
    env = {
        "TUNEDROP_BASE_MODEL": "tiny-random",
        "TUNEDROP_MODEL_CACHE": str(model_cache),
        "TUNEDROP_TRAINING_OVERRIDES": json.dumps(QUICK_TRAINING),
        "TUNEDROP_EVENTS_URL": "",  # the tests deliver the job events themselves
        "TUNEDROP_WEBHOOK_URLS": "http://127.0.0.1:9/receiver",
        "TUNEDROP_WEBHOOK_SECRET": new_secret(),
        "TUNEDROP_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    yield SimpleNamespace(settings=settings, pipeline=get_pipeline())
    LocalBackend(settings).stop_all()


def dataset(n: int = 12) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def upload(settings, name: str, data: bytes):
    container = default_storage().ensure_container(settings.training_container)
    blob = container.get_blob_client(name)
    blob.upload_blob(data, overwrite=True)
    return blob


def completed_event(run) -> func.EventGridEvent:
    raw = run_event(status="Completed", topic=Settings().workspace_id, job_name=run.job_name,
                    experiment_name="tunedrop", run_tags={RUN_ID_TAG: run.run_id})
    return func.EventGridEvent(id=raw["id"], data=raw["data"], topic=raw["topic"], subject=raw["subject"],
                               event_type=raw["eventType"], event_time=datetime.now(timezone.utc),
                               data_version=raw["dataVersion"])


def wait_for_job(pipeline, job_name: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = pipeline.backend.get_job(job_name)
        if job.is_terminal:
            assert job.status == "Completed", job.error
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_name} still running after {timeout_s} s")


def outbox(settings) -> list[OutboxMessage]:
    queue = default_storage().queue(settings.webhook_queue)
    messages = []
    for batch in queue.receive_messages(messages_per_page=32, visibility_timeout=30).by_page():
        messages += [OutboxMessage.from_json(m.content) for m in batch]
    return messages


def in_child(code: str, faults: str) -> int:
    """Run ``code`` in a fresh process that dies at the named fault point; returns its exit code."""
    env = {**os.environ, "TUNEDROP_FAULTS": faults}
    prelude = "from tests.handlers import handler\nfrom shared.pipeline import get_pipeline\n"
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, cwd=PROJECT_ROOT, timeout=120).returncode


def summary(title: str, rows: dict[str, int]) -> None:
    """The suite's figures as a table (shown by `make soak`, or pytest -s)."""
    width = max(len(k) for k in rows)
    print(f"\n{title}\n" + "\n".join(f"  {k:<{width}}  {v:>6}" for k, v in rows.items()))
