"""Every tunedrop setting, read once from the environment (app settings in Azure).

Each field's ``help`` metadata is the single place a setting is documented; the README table
is generated from it (``tunedrop settings``) so the two cannot drift.

Over 400 lines on purpose: one frozen dataclass, one field a setting, each with its help text where
it is defined (as TRL's config classes do); splitting it would scatter the one list users read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from shared.coerce import to_kind

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


def _limit(default, help: str, env: str, exceeded: str):
    """A setting that bounds what a client, a dataset or a job may make tunedrop do. ``exceeded`` says
    what happens past it (the code, the HTTP status): the README's Limits table is made from these."""
    return field(default=default, metadata={"help": help, "env": env, "exceeded": exceeded})


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
    job_events_queue: str = _setting(
        "job-events",
        "Queue between the `job_events` Event Grid trigger, which only queues each run event (Event Grid "
        "gives up on answers slower than 30 s), and `job_event_worker`, which acts on it; events that keep "
        "failing end in `<name>-poison`.",
        "TUNEDROP_JOB_EVENTS_QUEUE",
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
    api_keys: str = _setting(
        "",
        "Keys of the OpenAI-compatible routes (`/api/v1`, `Authorization: Bearer` or `api-key`), as comma-separated "
        "`name:sha256` entries: each key's SHA-256, never the key (`tunedrop keys new NAME` makes one). Empty: "
        "`/api/v1` answers 401. `tunedrop up` admits its function key as `local`.",
        "TUNEDROP_API_KEYS",
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
    webhook_order_wait_s: float = _limit(
        120.0,
        "How long a webhook waits for an earlier one of its run (to the same receiver) that is still being delivered, "
        "so that a run's webhooks arrive in order.",
        "TUNEDROP_WEBHOOK_ORDER_WAIT_S",
        "the webhook is sent out of order (receivers order by `data.sequence`)",
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
    local_train_workers: int = _setting(
        0, "Local backend: workers the trainer computes a step's micro-batches on, side by side "
        "(`gradient_accumulation_steps` of them; SmolLM2 brings 2), each with the cores / workers intra-op threads. "
        "It changes how fast a step runs, not what it computes (the gradients are summed as one worker would). "
        "0: one per core. 1: one at a time on every core, as before.",
        "TUNEDROP_LOCAL_TRAIN_WORKERS",
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
        "Local backend: where its jobs' lifecycle events and its model servers' ready events are posted (the "
        "host's Event Grid route).",
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
    job_timeout_minutes: float = _limit(
        24 * 60.0,
        "A job still submitted or running after this long is marked failed by the sweeper.",
        "TUNEDROP_JOB_TIMEOUT_MINUTES",
        "run fails: `job_timeout`",
    )
    deploy_timeout_minutes: float = _limit(
        60.0, "A deployment not ready after this long is marked failed.", "TUNEDROP_DEPLOY_TIMEOUT_MINUTES",
        "run fails: `deploy_timeout`",
    )
    score_timeout_s: float = _limit(
        90.0, "Seconds the score function waits for the endpoint (the seed's request timeout).", "TUNEDROP_SCORE_TIMEOUT_S",
        "HTTP 504",
    )
    max_new_tokens: int = _limit(
        512, "Local model server: most tokens a scoring request may ask it to generate (`max_new_tokens`, "
        "`max_tokens`, `max_completion_tokens`); asked for more, it refuses rather than clamps.",
        "TUNEDROP_MAX_NEW_TOKENS", "HTTP 400 `max_tokens_too_large`",
    )
    max_prompt_tokens: int = _limit(
        0, "Local model server: most prompt tokens (after the chat template) a request may send. 0: the model's "
        "context window less the tokens asked for is the only bound (it always applies).",
        "TUNEDROP_MAX_PROMPT_TOKENS", "HTTP 400 `prompt_too_long`, before any generation",
    )
    generation_timeout_s: float = _limit(
        80.0, "Local model server: seconds from a request's arrival after which its generation is stopped; keep it "
        "under TUNEDROP_SCORE_TIMEOUT_S. A generation whose client disconnects is stopped too.",
        "TUNEDROP_GENERATION_TIMEOUT_S", "generation stopped, HTTP 504 `generation_timeout`",
    )
    server_concurrency: int = _limit(
        16, "Local model server: requests generated at once, batched: every step gives each of them its next token in "
        "one forward pass, and a request joins or leaves the batch between steps, so a short request is not held "
        "behind a long one. More share each pass (more requests/s) and make each step slower; each holds its own "
        "KV cache.", "TUNEDROP_SERVER_CONCURRENCY",
        "the request waits in the server's queue",
    )
    server_queue: int = _limit(
        64, "Local model server: requests that may wait beyond those being generated.", "TUNEDROP_SERVER_QUEUE",
        "HTTP 429 `server_busy` with `Retry-After`",
    )
    server_prefix_cache_tokens: int = _limit(
        4096, "Local model server: prompt tokens whose KV the server keeps (least recently used out first) so that a "
        "prompt starting like a recent one (a system prompt, the chat template's opening, a conversation's earlier "
        "turns) reads only the rest. About 46 KB a token for SmolLM2-135M. 0: none kept.",
        "TUNEDROP_SERVER_PREFIX_CACHE_TOKENS", "the least recently used prompt's KV is dropped",
    )
    gate_margin: float = _setting(
        0.0,
        "Quality gate: before deploying, the fine-tuned model's held-out eval loss must be at least this much below "
        "the base model's on the same examples (0: not worse). A model that is not stops at `registered` with a "
        "`run.gated` webhook; `tunedrop deploy RUN --force` deploys it anyway. Negative: allow that much worse.",
        "TUNEDROP_GATE_MARGIN",
    )
    min_examples: int = _limit(10, "Datasets with fewer valid examples are rejected.", "TUNEDROP_MIN_EXAMPLES",
                               "dataset rejected: `too_few_examples`")
    max_blob_name_chars: int = _limit(
        512, "Longest dataset blob name, in characters. Such a name, or one with a control or invisible character, "
        "a backslash or a `.`/`..` path segment, is not read: the blob is quarantined under a safe name.",
        "TUNEDROP_MAX_BLOB_NAME_CHARS", "dataset rejected: `bad_blob_name`",
    )
    max_request_bytes: int = _limit(
        1_048_576, "Largest request body the score routes read, in bytes.", "TUNEDROP_MAX_REQUEST_BYTES", "HTTP 413",
    )
    max_json_depth: int = _limit(
        32, "Deepest nesting of arrays and objects in a request body the score routes take (a chat request needs 5).",
        "TUNEDROP_MAX_JSON_DEPTH", "HTTP 400",
    )
    max_errors: int = _setting(
        50, "Validation stops listing errors after this many (it keeps counting).", "TUNEDROP_MAX_ERRORS"
    )
    max_line_bytes: int = _limit(
        1_048_576, "Longest accepted dataset line, in bytes.", "TUNEDROP_MAX_LINE_BYTES",
        "the line is an error: `line_too_long`",
    )
    max_dataset_bytes: int = _limit(
        2 << 30, "Largest dataset file, in bytes as read: after decompression for `.jsonl.gz`, decoded for "
        "Parquet. Reading stops there; the trainers read no further either. 0: no limit.",
        "TUNEDROP_MAX_DATASET_BYTES", "dataset rejected: `dataset_too_large`",
    )
    max_compression_ratio: float = _limit(
        100.0, "Highest inflated / compressed size of a `.jsonl.gz` or Parquet file (chat text gzips 3-10x), "
        "checked as it inflates once past 16 MiB: a compression bomb is refused in its first megabytes. 0: no limit.",
        "TUNEDROP_MAX_COMPRESSION_RATIO", "dataset rejected: `compression_ratio_too_high`",
    )
    max_examples: int = _limit(
        1_000_000, "Most examples in a dataset file (a Parquet file's rows); reading stops past it. 0: no limit.",
        "TUNEDROP_MAX_EXAMPLES", "dataset rejected: `too_many_examples`",
    )
    max_tokens: int = _limit(
        500_000_000, "Most tokens in a dataset file, when tokens are counted (TUNEDROP_COUNT_TOKENS); reading "
        "stops past it. 0: no limit.", "TUNEDROP_MAX_TOKENS", "dataset rejected: `too_many_tokens`",
    )
    max_duplicate_share: float = _limit(
        0.5, "Largest share of a dataset file's examples that repeat an earlier conversation. 0: no limit.",
        "TUNEDROP_MAX_DUPLICATE_SHARE", "dataset rejected: `too_many_duplicates`",
    )
    max_estimated_hours: float = _limit(
        168.0, "Longest training time the report's rough estimate may come to, in hours. 0: no limit.",
        "TUNEDROP_MAX_ESTIMATED_HOURS", "dataset rejected: `training_too_long`",
    )
    max_estimated_cost: float = _limit(
        1000.0, "Highest training cost the report's rough estimate may come to (at "
        "TUNEDROP_ESTIMATE_COST_PER_HOUR). 0: no limit.", "TUNEDROP_MAX_ESTIMATED_COST",
        "dataset rejected: `training_too_costly`",
    )
    max_eval_examples: int = _limit(
        1000, "Most held-out examples a run evaluates: past it, a seeded sample of this many, the same on both "
        "backends, stated in the report and the run's params. 0: all.", "TUNEDROP_MAX_EVAL_EXAMPLES",
        "a sample of this many is evaluated",
    )
    training_overrides: str = _setting(
        "",
        "JSON object of training-parameter overrides applied to every run (see TrainingConfig), "
        'e.g. `{"num_train_epochs": 1, "max_steps": 20}`.',
        "TUNEDROP_TRAINING_OVERRIDES",
    )

    azureml_registry: str = _setting(
        "azureml", "Azure ML: registry holding the foundation model and `chat_completion_pipeline` (seed: azureml).",
        "TUNEDROP_AZUREML_REGISTRY",
    )
    azureml_model_label: str = _setting(
        "latest", "Azure ML: label of the foundation model and pipeline component to use (seed: latest).",
        "TUNEDROP_AZUREML_MODEL_LABEL",
    )
    azureml_finetune_compute: str = _setting(
        "gpu-cluster",
        "Azure ML: GPU cluster of the fine-tune step; checked against the model's `finetune_compute_allow_list`.",
        "TUNEDROP_AZUREML_FINETUNE_COMPUTE",
    )
    azureml_import_compute: str = _setting(
        "", "Azure ML: cluster of the model-import step. Empty: the fine-tune cluster (as the seed).",
        "TUNEDROP_AZUREML_IMPORT_COMPUTE",
    )
    azureml_preprocess_compute: str = _setting(
        "", "Azure ML: cluster of the preprocessing step. Empty: the fine-tune cluster (as the seed).",
        "TUNEDROP_AZUREML_PREPROCESS_COMPUTE",
    )
    azureml_evaluation_compute: str = _setting(
        "", "Azure ML: cluster of the evaluation step. Empty: the fine-tune cluster (as the seed).",
        "TUNEDROP_AZUREML_EVALUATION_COMPUTE",
    )
    azureml_experiment: str = _setting(
        "", "Azure ML: experiment of the fine-tune jobs. Empty: `chat_completion_<base model>`, as the seed names it.",
        "TUNEDROP_AZUREML_EXPERIMENT",
    )
    azureml_datastore: str = _setting(
        "tunedrop",
        "Azure ML: datastore (identity-based) on `TUNEDROP_AZUREML_DATA_CONTAINER`, through which jobs read "
        "the train/test split.",
        "TUNEDROP_AZUREML_DATASTORE",
    )
    azureml_data_container: str = _setting(
        "finetune-data",
        "Azure ML: container (in the app's storage account) where each run's train/test split is written "
        "as `<run id>/train.jsonl` and `<run id>/test.jsonl`.",
        "TUNEDROP_AZUREML_DATA_CONTAINER",
    )
    azureml_gpus_per_node: int = _setting(
        0,
        "Azure ML: GPUs per node of the fine-tune cluster's VM size. 0: from tunedrop's table of Azure GPU sizes "
        "(the seed asked `compute.list_sizes()`, which needs a subscription-wide role); set it for a size the "
        "table lacks.",
        "TUNEDROP_AZUREML_GPUS_PER_NODE",
    )
    azureml_instance_type: str = _setting(
        "Standard_NC24ads_A100_v4",
        "Azure ML: VM size of the online deployment. The seed's Standard_NC6s_v3 was retired on 2025-09-30 "
        "(NCv3); this default is the smallest current size in Phi-3-mini-4k-instruct's "
        "`inference_compute_allow_list` (1 A100). Checked against the base model's allow list when a dataset "
        "is accepted, before any GPU time is spent, and again before deploying.",
        "TUNEDROP_AZUREML_INSTANCE_TYPE",
    )
    azureml_instance_count: int = _setting(
        1, "Azure ML: instances of the online deployment (seed: 1).", "TUNEDROP_AZUREML_INSTANCE_COUNT"
    )
    azureml_client_id: str = _setting(
        "", "Azure ML: client id of a user-assigned managed identity for `DefaultAzureCredential`. Empty: "
        "the system-assigned identity (or your `az login` locally).",
        "TUNEDROP_AZUREML_CLIENT_ID",
    )
    azureml_key_ttl_s: float = _setting(
        300.0, "Azure ML: seconds an endpoint key fetched with `get_keys` is cached before it is fetched again.",
        "TUNEDROP_AZUREML_KEY_TTL_S",
    )
    count_tokens: bool = _setting(
        True,
        "Count tokens per example during validation (the target model's fast tokenizer when it is on this "
        "machine, else an estimate of 4 characters per token) for the report, the `too_long` warning and the "
        "training estimate. `false` for a quicker, structure-only check.",
        "TUNEDROP_COUNT_TOKENS",
    )
    estimate_tokens_per_s: float = _setting(
        0.0,
        "Training throughput (trained tokens per second) behind the report's time/cost estimate. 0: locally, "
        "what jobs on this machine measured for the base model (in the model cache's throughput.json), else a "
        "built-in figure for the backend (local 83 plus 12 s per job, azureml 1500).",
        "TUNEDROP_ESTIMATE_TOKENS_PER_S",
    )
    estimate_cost_per_hour: float = _setting(
        -1.0,
        "Price per hour of the training compute for the estimate. Negative: built-in (local 0, azureml 3.06, "
        "a Standard_NC6s_v3 list price).",
        "TUNEDROP_ESTIMATE_COST_PER_HOUR",
    )

    @property
    def effective_base_model(self) -> str:
        if self.base_model:
            return self.base_model
        return "Phi-3-mini-4k-instruct" if self.backend == "azureml" else "smollm2-135m-instruct"

    @property
    def effective_model_name(self) -> str:
        return self.model_name_for(self.effective_base_model)

    def model_name_for(self, base_model: str) -> str:
        """The registered model name of runs that fine-tune ``base_model``."""
        return self.registered_model_name or f"{base_model or self.effective_base_model}-ultrachat-200k"

    @property
    def effective_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @property
    def workspace_scope(self) -> tuple[str, str, str]:
        """(subscription id, resource group, workspace name), parsed from the workspace resource id."""
        parts = self.workspace_id.strip("/").split("/")
        try:
            if [p.lower() for p in parts[0:5:2]] != ["subscriptions", "resourcegroups", "providers"] or \
                    parts[5].lower() != "microsoft.machinelearningservices" or parts[6].lower() != "workspaces":
                raise IndexError
            return parts[1], parts[3], parts[7]
        except IndexError:
            raise SettingsError(
                f"TUNEDROP_WORKSPACE_ID={self.workspace_id!r} is not an Azure ML workspace resource id: use "
                "/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.MachineLearningServices/workspaces/<name>."
            ) from None

    @property
    def effective_experiment(self) -> str:
        return self.experiment_for(self.effective_base_model)

    def experiment_for(self, base_model: str) -> str:
        """The Azure ML experiment of runs that fine-tune ``base_model``."""
        return self.azureml_experiment or f"chat_completion_{base_model or self.effective_base_model}"

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
        if self.backend == "azureml":
            self.workspace_scope  # noqa: B018 - raises a SettingsError naming the fix
            if self.azureml_instance_count < 1:
                raise SettingsError("TUNEDROP_AZUREML_INSTANCE_COUNT must be at least 1.")
            if self.azureml_gpus_per_node < 0:
                raise SettingsError("TUNEDROP_AZUREML_GPUS_PER_NODE must be 0 (from the size) or more.")
        for env, value, low in (("TUNEDROP_MAX_NEW_TOKENS", self.max_new_tokens, 1),
                                ("TUNEDROP_MAX_PROMPT_TOKENS", self.max_prompt_tokens, 0),
                                ("TUNEDROP_SERVER_CONCURRENCY", self.server_concurrency, 1),
                                ("TUNEDROP_SERVER_QUEUE", self.server_queue, 0),
                                ("TUNEDROP_SERVER_PREFIX_CACHE_TOKENS", self.server_prefix_cache_tokens, 0),
                                ("TUNEDROP_LOCAL_TRAIN_WORKERS", self.local_train_workers, 0)):
            if value < low:
                raise SettingsError(f"{env}={value} must be at least {low}.")
        if not self.generation_timeout_s > 0:
            raise SettingsError(f"TUNEDROP_GENERATION_TIMEOUT_S={self.generation_timeout_s:g} must be above 0.")
        from shared.api_keys import ApiKeysError, parse

        try:
            parse(self.api_keys)
        except ApiKeysError as exc:
            raise SettingsError(str(exc)) from None
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
        if isinstance(default, (bool, int, float)):
            return to_kind(type(default), raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a valid {type(default).__name__}: {exc}.") from None
    return raw


#: Settings the function bindings name as `%SETTING%`: the host needs each one set.
BINDING_SETTINGS = ("training_container", "webhook_queue", "job_events_queue", "sweep_schedule")


def binding_environment(settings: "Settings") -> dict[str, str]:
    """`%SETTING%` values for the bindings, from ``settings`` (defaults included)."""
    by_name = {f.name: f for f in fields(Settings)}
    return {by_name[name].metadata["env"]: str(getattr(settings, name)) for name in BINDING_SETTINGS}


def _shown(default) -> str:
    if isinstance(default, tuple):
        return ",".join(default)
    if isinstance(default, Path) and str(default).startswith(str(Path.home())):
        return "~/" + str(Path(default).relative_to(Path.home()))
    return str(default)


def limits() -> list[tuple[str, str, str, str]]:
    """(environment variable, default, help, what happens past it) for every limit: the README's Limits table."""
    return [(f.metadata["env"], _shown(f.default), f.metadata["help"], f.metadata["exceeded"])
            for f in fields(Settings) if "exceeded" in f.metadata]


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting: the README's configuration table."""
    rows = [(STORAGE_CONNECTION, "", "Storage connection for blobs, queues and the run table. Locally an Azurite "
             "connection string (set by `tunedrop up`); in Azure identity-based: `TUNEDROP_STORAGE__blobServiceUri`, "
             "`__queueServiceUri`, `__tableServiceUri` (+ `__clientId` for a user-assigned identity).")]
    for f in fields(Settings):
        rows.append((f.metadata["env"], _shown(f.default), f.metadata["help"]))
    return rows
