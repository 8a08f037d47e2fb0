"""Every tunedrop setting, read once from the environment (app settings in Azure).

Each field's ``help`` metadata is the single place a setting is documented; the README table
is generated from it (``tunedrop settings``) so the two cannot drift.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

#: App setting (prefix) naming the storage connection the triggers and the core use. Locally it
#: holds an Azurite connection string; in Azure, `TUNEDROP_STORAGE__blobServiceUri`,
#: `__queueServiceUri` and `__tableServiceUri` with the managed identity.
STORAGE_CONNECTION = "TUNEDROP_STORAGE"

#: Azurite's published development account. It is not a secret; it only works against Azurite.
AZURITE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def _setting(default, help: str, env: str):
    return field(default=default, metadata={"help": help, "env": env})


class SettingsError(ValueError):
    """A setting has a value tunedrop cannot use; the message names the setting and the fix."""


@dataclass(frozen=True)
class Settings:
    training_container: str = _setting(
        "training-data", "Container users drop datasets into.", "TUNEDROP_TRAINING_CONTAINER"
    )
    quarantine_container: str = _setting(
        "quarantine",
        "Container where rejected datasets are kept, each beside its JSON report.",
        "TUNEDROP_QUARANTINE_CONTAINER",
    )
    runs_table: str = _setting("runs", "Table holding one record per dropped dataset.", "TUNEDROP_RUNS_TABLE")
    webhook_queue: str = _setting(
        "webhooks",
        "Outbox queue of webhooks; undeliverable ones end in `<name>-poison`.",
        "TUNEDROP_WEBHOOK_QUEUE",
    )
    webhook_urls: tuple[str, ...] = _setting(
        (), "Comma-separated URLs that receive run webhooks. Empty: no webhooks.", "TUNEDROP_WEBHOOK_URLS"
    )
    webhook_secret: str = _setting(
        "",
        "Standard Webhooks signing secret (`whsec_` + base64). Required when webhook URLs are set. "
        "Keep it in Key Vault in Azure.",
        "TUNEDROP_WEBHOOK_SECRET",
    )
    webhook_timeout_s: float = _setting(10.0, "Seconds to wait for a webhook receiver.", "TUNEDROP_WEBHOOK_TIMEOUT_S")
    webhook_attempts: int = _setting(
        6, "Deliveries tried per webhook before it is parked in `<queue>-poison`.", "TUNEDROP_WEBHOOK_ATTEMPTS"
    )
    webhook_backoff_s: float = _setting(
        10.0,
        "Wait before the first redelivery of a failed webhook; doubles each time (capped at one hour).",
        "TUNEDROP_WEBHOOK_BACKOFF_S",
    )
    webhook_allow_private: bool = _setting(
        False,
        "Deliver webhooks to loopback, private and link-local addresses. Off in Azure (SSRF guard); "
        "`tunedrop up` and the demo turn it on for receivers on this machine.",
        "TUNEDROP_WEBHOOK_ALLOW_PRIVATE",
    )
    backend: str = _setting(
        "local",
        "`local` (embedded: LoRA on this machine, MLflow, local model servers) or `azureml`.",
        "TUNEDROP_BACKEND",
    )
    base_model: str = _setting(
        "",
        "Foundation model to fine-tune. Empty: `Phi-3-mini-4k-instruct` on azureml, "
        "`smollm2-135m-instruct` on local (`tiny-random` is a tiny random Llama for tests).",
        "TUNEDROP_BASE_MODEL",
    )
    state_dir: Path = _setting(
        Path(".tunedrop"),
        "Local backend: folder for jobs, endpoints, MLflow (SQLite + artifacts) and Azurite data.",
        "TUNEDROP_STATE_DIR",
    )
    model_cache_dir: Path = _setting(
        Path.home() / ".cache" / "tunedrop",
        "Local backend: where the base model is cached after its one-time conversion from gguf.",
        "TUNEDROP_MODEL_CACHE",
    )
    mlflow_tracking_uri: str = _setting(
        "",
        "MLflow tracking and registry URI. Empty: `sqlite:///<state_dir>/mlflow.db` locally.",
        "MLFLOW_TRACKING_URI",
    )
    registered_model_name: str = _setting(
        "",
        "Name of the registered model. Empty: `<base model>-ultrachat-200k`, as the seed names it.",
        "TUNEDROP_MODEL_NAME",
    )
    events_url: str = _setting(
        "http://127.0.0.1:7071/runtime/webhooks/EventGrid?functionName=job_events",
        "Local backend: where its job lifecycle events are posted (the host's Event Grid route).",
        "TUNEDROP_EVENTS_URL",
    )
    workspace_id: str = _setting(
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local"
        "/providers/Microsoft.MachineLearningServices/workspaces/local",
        "Resource id of the Azure ML workspace whose run events this app accepts (Event Grid topic).",
        "TUNEDROP_WORKSPACE_ID",
    )
    sweep_schedule: str = _setting(
        "0 */5 * * * *",
        "NCRONTAB schedule of the sweeper (seconds first), read by the timer trigger's binding.",
        "TUNEDROP_SWEEP_SCHEDULE",
    )
    blob_trigger_source: str = _setting(
        "EventGrid",
        "Source of the ingest blob trigger: `EventGrid` (Azure, required on Flex Consumption) or "
        "`LogsAndContainerScan` (`func start` against Azurite). Read when the app is indexed.",
        "TUNEDROP_BLOB_TRIGGER_SOURCE",
    )
    idle_minutes: float = _setting(
        30.0, "Endpoints not scored for this long are torn down by the sweeper.", "TUNEDROP_IDLE_MINUTES"
    )
    job_timeout_minutes: float = _setting(
        24 * 60.0,
        "A job still submitted or running after this long is marked failed by the sweeper.",
        "TUNEDROP_JOB_TIMEOUT_MINUTES",
    )
    deploy_timeout_minutes: float = _setting(
        60.0, "A deployment not ready after this long is marked failed.", "TUNEDROP_DEPLOY_TIMEOUT_MINUTES"
    )
    score_timeout_s: float = _setting(
        90.0, "Seconds the score function waits for the endpoint (the seed's request timeout).", "TUNEDROP_SCORE_TIMEOUT_S"
    )
    min_examples: int = _setting(10, "Datasets with fewer valid examples are rejected.", "TUNEDROP_MIN_EXAMPLES")
    max_errors: int = _setting(
        50, "Validation stops listing errors after this many (it keeps counting).", "TUNEDROP_MAX_ERRORS"
    )
    max_line_bytes: int = _setting(
        1_048_576, "Longest accepted dataset line, in bytes.", "TUNEDROP_MAX_LINE_BYTES"
    )
    training_overrides: str = _setting(
        "",
        "JSON object of training-parameter overrides applied to every run (see TrainingConfig), "
        'e.g. `{"num_train_epochs": 1, "max_steps": 20}`.',
        "TUNEDROP_TRAINING_OVERRIDES",
    )

    @property
    def effective_base_model(self) -> str:
        if self.base_model:
            return self.base_model
        return "Phi-3-mini-4k-instruct" if self.backend == "azureml" else "smollm2-135m-instruct"

    @property
    def effective_model_name(self) -> str:
        return self.registered_model_name or f"{self.effective_base_model}-ultrachat-200k"

    @property
    def effective_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f, raw)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.backend not in ("local", "azureml"):
            raise SettingsError(f"TUNEDROP_BACKEND={self.backend!r}: use 'local' or 'azureml'.")
        if self.webhook_urls and not self.webhook_secret.startswith("whsec_"):
            raise SettingsError(
                "TUNEDROP_WEBHOOK_URLS is set but TUNEDROP_WEBHOOK_SECRET is missing or lacks the "
                "'whsec_' prefix: generate one with `tunedrop secret`."
            )


def _convert(f, raw: str):
    name = f.metadata["env"]
    default = f.default
    try:
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, Path):
            return Path(raw).expanduser()
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {type(default).__name__}.") from None
    return raw


#: Settings the function bindings name as `%SETTING%`: the host needs each one set.
BINDING_SETTINGS = ("training_container", "webhook_queue", "sweep_schedule")


def binding_environment(settings: "Settings") -> dict[str, str]:
    """`%SETTING%` values for the bindings, from ``settings`` (defaults included)."""
    by_name = {f.name: f for f in fields(Settings)}
    return {by_name[name].metadata["env"]: str(getattr(settings, name)) for name in BINDING_SETTINGS}


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting: the README's configuration table."""
    rows = [(STORAGE_CONNECTION, "", "Storage connection for blobs, queues and the run table. Locally an Azurite "
             "connection string (set by `tunedrop up`); in Azure identity-based: `TUNEDROP_STORAGE__blobServiceUri`, "
             "`__queueServiceUri`, `__tableServiceUri` (+ `__clientId` for a user-assigned identity).")]
    for f in fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, Path) and str(default).startswith(str(Path.home())):
            default = "~/" + str(Path(default).relative_to(Path.home()))
        rows.append((f.metadata["env"], str(default), f.metadata["help"]))
    return rows
