"""One local app for the user-facing surfaces (the OpenAI-compatible API with the official client, the status
page in a real browser, the CLI following a run): the local Functions host on Azurite with the embedded
environment `tunedrop up` gives it (its function key admitted as the `local` API key), tiny-random as the
base model and a quick training, and one real run shared by the package, so that it trains once."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest

import function_app
from shared import runs
from shared.settings import Settings
from shared.storage import default_storage, reset_default_storage
from tests.waiting import wait_for
from tunedrop.azurite import free_port
from tunedrop.host import LocalHost
from tunedrop.local import PROJECT_ROOT, embedded_environment

QUICK_TRAINING = {"num_train_epochs": 1, "max_steps": 6, "max_seq_length": 64, "learning_rate": 1e-3}


def conversations(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@pytest.fixture(scope="package")
def served(azurite, model_cache, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("surfaces") / "state"
    port = free_port()
    suffix = uuid.uuid4().hex[:8]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        env = embedded_environment(azurite.connection_string, state_dir=state_dir, port=port, base={})
        env.update({
            "TUNEDROP_TRAINING_CONTAINER": f"training-{suffix}", "TUNEDROP_QUARANTINE_CONTAINER": f"quarantine-{suffix}",
            "TUNEDROP_RUNS_TABLE": f"runs{suffix}", "TUNEDROP_WEBHOOK_QUEUE": f"webhooks-{suffix}",
            "TUNEDROP_JOB_EVENTS_QUEUE": f"job-events-{suffix}",
            "TUNEDROP_BASE_MODEL": "tiny-random", "TUNEDROP_MODEL_CACHE": str(model_cache),
            "TUNEDROP_TRAINING_OVERRIDES": json.dumps(QUICK_TRAINING),
            "TUNEDROP_SWEEP_SCHEDULE": "*/1 * * * * *",
        })
        for key, value in env.items():
            patch.setenv(key, value)
        reset_default_storage()
        host = LocalHost(function_app.app, environ=env, port=port, root=PROJECT_ROOT, state_dir=state_dir,
                         poll_interval_s=0.3, visibility_timeout_s=1)
        settings = Settings.from_env()
        with host:
            yield SimpleNamespace(host=host, settings=settings, port=port, state_dir=state_dir, env=env,
                                  base_url=f"http://127.0.0.1:{port}", key=host.function_key)
        from shared.backends.local import LocalBackend

        LocalBackend(settings).stop_all()
        reset_default_storage()


def drop(served, name: str, data: bytes) -> str:
    container = default_storage().ensure_container(served.settings.training_container)
    result = container.get_blob_client(name).upload_blob(data, overwrite=True)
    return runs.run_id_for(served.settings.training_container, name, result["etag"])


def state_of(served, run_id: str, target: str):
    run = runs.RunStore.from_settings(served.settings).find(run_id)
    assert run is None or run.state not in (runs.FAILED, runs.REJECTED), run.error
    return run if run is not None and run.state == target else None


@pytest.fixture(scope="package")
def deployed_run(served):
    """A deployed run: the one the package's first test made, or one dropped now."""
    store = runs.RunStore.from_settings(served.settings)
    found = [r for r in store.list() if r.state in runs.ORDER[:runs.ORDER.index(runs.DEPLOYED) + 1]]
    run_id = found[0].run_id if found else drop(served, "sums.jsonl", conversations(24))
    return wait_for(lambda: state_of(served, run_id, runs.DEPLOYED), 240, f"run {run_id} deployed")

