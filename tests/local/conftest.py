"""Fixtures for the local backend's tests: a shared base-model cache, an event recorder, and one
real training run (tiny-random, a few steps) that the trainer and server tests both look at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from shared.events import RUN_ID_TAG  # noqa: F401  (re-exported for the tests)
from shared.storage import Storage
from tunedrop.receiver import PostReceiver

ROOT = Path(__file__).resolve().parents[2]
TRAINING_CONFIG = {
    "num_train_epochs": 2,
    "learning_rate": 5e-3,
    "max_seq_length": 128,
    "lora_r": 8,
    "lora_alpha": 16,
    "test_fraction": 0.2,
    "lr_scheduler_type": "cosine",
}


def conversations(n: int = 20) -> list[dict]:
    """Small arithmetic chats: some with a system prompt, some with two turns, extra keys."""
    rows = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You answer sums in one sentence."})
        if i % 4 == 0:
            messages += [
                {"role": "user", "content": f"And {a} times {b}?"},
                {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
            ]
        rows.append({"prompt": messages[-2]["content"], "prompt_id": f"p{i}", "messages": messages})
    return rows


def dataset_bytes(rows: list[dict]) -> bytes:
    """JSONL as people save it: a BOM, CRLF line ends and blank lines."""
    return ("\ufeff" + "\r\n".join(json.dumps(r) for r in rows) + "\r\n\r\n").encode("utf-8")


class EventRecorder:
    """Records what is POSTed to it (the Functions host's Event Grid route)."""

    def __init__(self):
        self.posts: list[dict] = []
        self._lock = threading.Lock()
        self._post = PostReceiver(self._receive, "/runtime/webhooks/EventGrid?functionName=job_events")
        self.url = self._post.url

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.posts.append({"path": path, "headers": headers, "body": json.loads(body)})
        return 200

    @property
    def events(self) -> list[dict]:
        with self._lock:
            return [event for post in self.posts for event in post["body"]]

    def close(self):
        self._post.close()


def write_job(job_dir: Path, *, container: str, blob: str, etag: str | None, model_cache: Path,
              events_url: str | None, config: dict | None = None, base_model: str = "tiny-random") -> dict:
    job_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "job_name": f"job-{uuid.uuid4().hex[:8]}",
        "run_id": f"run-{uuid.uuid4().hex[:8]}",
        "experiment_name": "tunedrop-tests",
        "base_model": base_model,
        "model_cache_dir": str(model_cache),
        "dataset": {"container": container, "blob": blob, "etag": etag},
        "config": dict(TRAINING_CONFIG if config is None else config),
        "tracking_uri": f"sqlite:///{(job_dir.parent / 'mlflow.db').resolve()}",
        "events_url": events_url,
        "workspace_id": "/subscriptions/0/resourceGroups/local/providers/Microsoft.MachineLearningServices/workspaces/local",
    }
    (job_dir / "job.json").write_text(json.dumps(job))
    return job


def run_trainer(job_dir: Path, connection_string: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEDROP_STORAGE": connection_string, "HF_HUB_OFFLINE": "1"}
    with open(job_dir / "train.log", "wb") as log:
        return subprocess.run(
            [sys.executable, "-m", "shared.backends.local.trainer", str(job_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
        )


def upload(connection_string: str, container: str, blob: str, data: bytes) -> str:
    storage = Storage({"TUNEDROP_STORAGE": connection_string})
    client = storage.blob_service.get_container_client(container)
    if not client.exists():
        client.create_container()
    return client.get_blob_client(blob).upload_blob(data, overwrite=True)["etag"]


@pytest.fixture(scope="session")
def trained_run(azurite, model_cache, tmp_path_factory):
    """One real training run of the trainer module on tiny-random, with its events recorded."""
    base = tmp_path_factory.mktemp("trained")
    container = f"training-{uuid.uuid4().hex[:8]}"
    etag = upload(azurite.connection_string, container, "chats/sums.jsonl", dataset_bytes(conversations()))
    recorder = EventRecorder()
    job_dir = base / "job"
    job = write_job(job_dir, container=container, blob="chats/sums.jsonl", etag=etag,
                    model_cache=model_cache, events_url=recorder.url)
    started = time.monotonic()
    result = run_trainer(job_dir, azurite.connection_string)
    recorder.close()
    log = (job_dir / "train.log").read_text(errors="replace")
    assert result.returncode == 0, log
    return {
        "job": job,
        "job_dir": job_dir,
        "status": json.loads((job_dir / "status.json").read_text()),
        "posts": recorder.posts,
        "events": recorder.events,
        "log": log,
        "seconds": time.monotonic() - started,
    }
