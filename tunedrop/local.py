"""The embedded mode's environment: what `tunedrop up`, `tunedrop demo` and the tests give the app."""

from __future__ import annotations

import os
from pathlib import Path

from shared.settings import Settings, binding_environment

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: How often `tunedrop up` sweeps (NCRONTAB, seconds first). A ready deployment does not wait for it (its model
#: server's ready event finishes it at once): the sweep tears idle endpoints down and makes up for a lost event.
LOCAL_SWEEP_SCHEDULE = "*/10 * * * * *"


def local_api_keys(state_dir: Path) -> str:
    """TUNEDROP_API_KEYS admitting the local host's function key as ``local``: one key for every route locally
    (``x-functions-key`` for /api/runs, ``Authorization: Bearer`` for the OpenAI-compatible /api/v1)."""
    from shared.api_keys import entry
    from tunedrop.host.config import load_or_create_keys

    return entry("local", load_or_create_keys(Path(state_dir))["functionKey"])


def embedded_environment(connection_string: str, *, state_dir: Path, port: int = 7071,
                         base: dict[str, str] | None = None) -> dict[str, str]:
    """App settings for the local host: Azurite, the local backend, events posted back to the host.

    Values already in ``base`` (default: os.environ) win, so users can override any of them.
    """
    base = dict(os.environ if base is None else base)
    env = {
        "TUNEDROP_STORAGE": connection_string,
        "TUNEDROP_BACKEND": "local",
        "TUNEDROP_STATE_DIR": str(state_dir),
        "TUNEDROP_EVENTS_URL": f"http://127.0.0.1:{port}/runtime/webhooks/EventGrid?functionName=job_events",
        "TUNEDROP_BLOB_TRIGGER_SOURCE": "LogsAndContainerScan",
        "TUNEDROP_WEBHOOK_ALLOW_PRIVATE": "true",  # receivers on this machine
        # Azure's 5-minute sweep would leave an idle endpoint (and a deployment whose ready event was lost) that long.
        "TUNEDROP_SWEEP_SCHEDULE": LOCAL_SWEEP_SCHEDULE,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env["TUNEDROP_API_KEYS"] = local_api_keys(state_dir)
    env.update({k: v for k, v in base.items() if k.startswith(("TUNEDROP_", "MLFLOW_", "HF_"))})
    env.update({k: v for k, v in binding_environment(Settings.from_env(env)).items() if k not in env})
    return env
