"""The Azure ML backend: the seed notebook's steps with `azure-ai-ml`, split across events, never waiting.

    submit_finetune   (ingest)      clients -> foundation model -> deployment size, compute and datastore checks
                                    -> train/test split
                                    -> `chat_completion_pipeline` job named after the run, tagged with it
    get_job           (job events)  status; metrics through the workspace's MLflow REST API; failure reason
    register_model    (job events)  `azureml://jobs/<job>/outputs/trained_model` as MLFLOW_MODEL, one version per run
    begin_deploy      (job events)  inference allow-list check, `begin_create_or_update` of the key-auth endpoint
    get_deployment    (sweeper)     endpoint ready -> `begin_create_or_update` of deployment "demo"; its state/error
    activate          (sweeper)     traffic {"demo": 100} with `begin_create_or_update`
    delete_endpoint   (sweeper)     `begin_delete`
    scoring_target    (score)       scoring URI + `get_keys`, cached with an expiry

Nothing here waits on a poller: each `begin_*` returns at once and the next event or sweep reads the
state back from Azure ML. The SDK still polls on a daemon thread of its own; we keep no reference to it.
What a later call needs is kept in Azure itself (the endpoint's tags hold the model to deploy) or, for
the one thing Azure ML does not keep (the async-operation URL that carries a deployment's error), in a
small JSON blob beside the run's data split.

`azure.ai.ml` is imported only inside this module's functions (about 3 s): never on the import path of
`function_app.py`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

from shared.backends.base import (
    DEPLOY_CREATING,
    DEPLOY_FAILED,
    DEPLOY_MISSING,
    DEPLOY_READY,
    BackendError,
    DeploymentInfo,
    JobInfo,
    ModelRef,
    ScoringTarget,
    endpoint_name_for,
    job_name_for,
)
from shared.backends.gpu_sizes import gpus_per_node
from shared.events import RUN_ID_TAG
from shared.split import split_stream
from shared.status import JobStatus, job_status
from shared.training import TrainingConfig

log = logging.getLogger("tunedrop.backends.azureml")

PIPELINE_COMPONENT = "chat_completion_pipeline"
DEPLOYMENT_NAME = "demo"
#: Sizes the seed refuses for fine-tuning when the model has no `finetune_compute_allow_list` tag.
UNSUPPORTED_FINETUNE_SIZES = ("standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r")
#: The parameters the seed always passes (training + optimisation), before `model_specific_defaults`.
SEED_PARAMETERS = ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
                   "lr_scheduler_type", "apply_lora", "apply_deepspeed", "deepspeed_stage")
#: Further TrainingConfig fields the pipeline component takes; passed only when a run overrides them.
OPTIONAL_PARAMETERS = ("gradient_accumulation_steps", "num_nodes_finetune", "save_total_limit", "max_seq_length",
                       "lora_r", "lora_alpha", "lora_dropout", "max_steps", "seed")
ARM_SCOPE = "https://management.azure.com/.default"
STATE_PREFIX = "deployments"
MAX_METRIC_RUNS = 50

#: Deployment error codes (Azure ML's) -> what to do about them.
DEPLOYMENT_FIXES = {
    "OutOfQuota": "the subscription lacks VM quota for {instance_type} x{count} (creating needs ceil(1.2 x instances) "
                  "x cores of it): request more quota for that VM family in the workspace's region (Azure portal > "
                  "Quotas > Machine learning), or set TUNEDROP_AZUREML_INSTANCE_TYPE to a size you have quota for; "
                  "then retry the run.",
    "OutOfCapacity": "Azure has no {instance_type} capacity in the region right now: retry the run later, or set "
                     "TUNEDROP_AZUREML_INSTANCE_TYPE to another allowed size.",
    "ResourceNotReady": "the model container did not become ready (it crashed or failed its liveness probe): read "
                        "`az ml online-deployment get-logs -e {endpoint} -n demo`; a model too large for "
                        "{instance_type} needs a bigger size (TUNEDROP_AZUREML_INSTANCE_TYPE); then retry the run.",
    "BadArgument": "Azure ML refused the deployment's arguments: check TUNEDROP_AZUREML_INSTANCE_TYPE "
                   "({instance_type}) and TUNEDROP_AZUREML_INSTANCE_COUNT ({count}) against the model's "
                   "inference_compute_allow_list and the endpoint SKU list; then retry the run.",
}


def _text(value) -> str:
    """An SDK enum or string as its plain value ("Failed", not "ProvisioningState.FAILED")."""
    return str(getattr(value, "value", value) or "")


def _literal(value: str, what: str):
    """A model tag holding a Python literal (as the seed reads it with ast.literal_eval)."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise BackendError(f"The foundation model's tag {what} is not a Python literal: {value[:200]!r}.",
                           code="bad_model_tag") from None


#: Where a registry model lists the VM sizes it supports: the tag the seed reads, or, since the
#: azureml registry moved them (azureml-assets #5150, 2026-06), system metadata `supportedComputes`.
ALLOW_LISTS = {"inference": ("inference_compute_allow_list", "inferenceComputes"),
               "finetune": ("finetune_compute_allow_list", "finetuneComputes")}


def allow_list(model, kind: str) -> list[str] | None:
    """The VM sizes ``model`` allows for ``kind`` ("inference" or "finetune"), or None when it names none."""
    tag, field = ALLOW_LISTS[kind]
    tags = model.tags or {}
    if tag in tags:
        sizes = _literal(tags[tag], tag)
    else:
        # azure-ai-ml 1.35 keeps it as Model._system_metadata (filled from the REST version when present)
        metadata = getattr(model, "system_metadata", None) or getattr(model, "_system_metadata", None) or {}
        supported = metadata.get("supportedComputes") or {} if isinstance(metadata, dict) else {}
        sizes = supported.get(field)
        if sizes is None:
            return None
    if not isinstance(sizes, (list, tuple)):
        raise BackendError(f"The foundation model's {tag} is not a list: {str(sizes)[:200]!r}.", code="bad_model_tag")
    return [str(size) for size in sizes]


def _seed_value(name: str, value: Any) -> Any:
    """A TrainingConfig value as the seed passes it: booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def seed_display_name(model_name: str, params: dict[str, Any], gpus_per_node: int) -> str:
    """The pipeline's display name, computed from the merged parameters exactly as the seed does."""
    batch = (int(params.get("per_device_train_batch_size", 1)) * int(params.get("gradient_accumulation_steps", 1))
             * int(gpus_per_node) * int(params.get("num_nodes_finetune", 1)))
    ds = f"ds{params.get('deepspeed_stage', '2')}" if str(params.get("apply_deepspeed", "false")) == "true" else "nods"
    lora = "lora" if str(params.get("apply_lora", "false")) == "true" else "nolora"
    return (f"{model_name}-ultrachat-bs{batch}-{params.get('lr_scheduler_type', 'linear')}-{ds}-{lora}"
            f"-save_limit{params.get('save_total_limit', -1)}-seqlen{params.get('max_seq_length', -1)}")


def finetune_parameters(config: TrainingConfig, model_tags: dict[str, str]) -> dict[str, Any]:
    """The seed's parameters, updated by the model's `model_specific_defaults`, then by the run's overrides.

    A run override is a TrainingConfig field whose value differs from the default (blob metadata or
    TUNEDROP_TRAINING_OVERRIDES); it wins over the model's defaults.
    """
    defaults = TrainingConfig()
    params = {name: _seed_value(name, getattr(config, name)) for name in SEED_PARAMETERS}
    if "model_specific_defaults" in model_tags:
        specific = _literal(model_tags["model_specific_defaults"], "model_specific_defaults")
        if not isinstance(specific, dict):
            raise BackendError("The foundation model's tag model_specific_defaults is not a dict.", code="bad_model_tag")
        params.update(specific)
    for name in (*SEED_PARAMETERS, *OPTIONAL_PARAMETERS):
        value = getattr(config, name)
        if value != getattr(defaults, name) and not (name == "max_steps" and value <= 0):
            params[name] = _seed_value(name, value)
    return params


def _deployment_fix(code: str, message: str, endpoint: str, instance_type: str, count: int) -> str:
    fix = DEPLOYMENT_FIXES.get(code)
    detail = f" Azure ML said: {message}" if message else ""
    if fix is None:
        return f"Deployment {DEPLOYMENT_NAME} on endpoint {endpoint} failed ({code or 'unknown error'}).{detail}"
    return (f"Deployment {DEPLOYMENT_NAME} on endpoint {endpoint} failed with {code}: "
            + fix.format(instance_type=instance_type, count=count, endpoint=endpoint) + detail)


def _error_code(exc) -> tuple[str, str]:
    """(code, message) of an azure.core HttpResponseError, from its ODataV4 error or its JSON body."""
    error = getattr(exc, "error", None)
    code, message = getattr(error, "code", None) or "", getattr(error, "message", None) or ""
    if not code:
        try:
            body = exc.response.json()
            code = body.get("error", {}).get("code", "") or ""
            message = body.get("error", {}).get("message", "") or message
        except Exception:  # noqa: BLE001 - no JSON body: keep what we have
            pass
    return code, message or str(getattr(exc, "message", "") or exc).splitlines()[0]


class AzureMLBackend:
    name = "azureml"

    def __init__(self, settings, credential=None, transport=None, storage=None):
        self.settings = settings
        self._storage = storage  # where the split and the deployment record go; default: the process's
        self.subscription_id, self.resource_group, self.workspace_name = settings.workspace_scope
        self._credential = credential
        self._transport = transport  # tests: an azure.core transport answering recorded-shaped JSON
        self._lock = threading.RLock()
        self._clients: dict[str, Any] = {}
        self._keys: dict[str, tuple[float, ScoringTarget]] = {}

    # ---- clients (lazy, once per backend; the pipeline keeps one backend per process) --------------

    @property
    def storage(self):
        if self._storage is None:
            from shared.storage import default_storage

            self._storage = default_storage()
        return self._storage

    @property
    def credential(self):
        if self._credential is None:
            from azure.identity import DefaultAzureCredential

            client_id = self.settings.azureml_client_id
            self._credential = (DefaultAzureCredential(managed_identity_client_id=client_id) if client_id
                                else DefaultAzureCredential())
        return self._credential

    def _client_kwargs(self) -> dict[str, Any]:
        return {"transport": self._transport} if self._transport is not None else {}

    def _client(self, key: str, make):
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make()
            return self._clients[key]

    @property
    def workspace(self):
        """MLClient for the workspace (seed step 1)."""
        def make():
            from azure.ai.ml import MLClient

            return MLClient(self.credential, self.subscription_id, self.resource_group, self.workspace_name,
                            **self._client_kwargs())
        return self._client("workspace", make)

    @property
    def registry(self):
        """MLClient for the `azureml` registry (seed step 1); its creation asks the registry discovery service."""
        def make():
            from azure.ai.ml import MLClient

            return self._call("connect to the registry", lambda: MLClient(
                self.credential, registry_name=self.settings.azureml_registry, **self._client_kwargs()))
        return self._client("registry", make)

    @property
    def _rest(self):
        """A plain azure-core pipeline with the same credential and transport (MLflow REST, operation status)."""
        def make():
            from azure.core import PipelineClient
            from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy

            return PipelineClient("https://management.azure.com", policies=[
                RetryPolicy(retry_total=2), BearerTokenCredentialPolicy(self.credential, ARM_SCOPE)],
                **self._client_kwargs())
        return self._client("rest", make)

    def _get_json(self, url: str, method: str = "GET", body: dict | None = None) -> dict:
        from azure.core.rest import HttpRequest

        response = self._rest.send_request(HttpRequest(method, url, json=body))
        response.read()
        response.raise_for_status()
        return response.json()

    # ---- error mapping ----------------------------------------------------------------------------

    def _call(self, doing: str, fn, not_found: str | None = None):
        """Run one SDK call; Azure's errors become BackendErrors (retryable: throttling, 5xx, network)."""
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        try:
            return fn()
        except ResourceNotFoundError as exc:
            if not_found is None:
                raise
            raise BackendError(not_found, code="not_found") from exc
        except ClientAuthenticationError as exc:
            raise BackendError(
                f"Could not {doing}: authentication failed ({_error_code(exc)[1]}). Give the Function App's identity "
                "the AzureML Data Scientist role on the workspace (and set TUNEDROP_AZUREML_CLIENT_ID for a "
                "user-assigned identity).", code="auth_failed") from exc
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise BackendError(f"Could not {doing}: Azure did not answer ({exc}); will retry.", code="unreachable",
                               retryable=True) from exc
        except HttpResponseError as exc:
            status = getattr(exc, "status_code", None) or 0
            code, message = _error_code(exc)
            if status == 404 and not_found is not None:  # some SDK calls raise a plain HttpResponseError for 404
                raise BackendError(not_found, code="not_found") from exc
            if status == 429 or status >= 500:
                raise BackendError(f"Could not {doing}: Azure answered {status} {code}; will retry.",
                                   code="throttled" if status == 429 else "azure_unavailable", retryable=True) from exc
            if status == 403:
                raise BackendError(
                    f"Could not {doing}: forbidden ({message}). Give the Function App's identity the AzureML Data "
                    "Scientist role on the workspace.", code="forbidden") from exc
            raise BackendError(f"Could not {doing}: {code or status} {message}", code=code or f"http_{status}") from exc

    def _find(self, doing: str, fn):
        """One SDK get through :meth:`_call`: its result, or None when Azure says it does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._call(doing, fn)
        except ResourceNotFoundError:
            return None

    # ---- seed steps 2-3: foundation model and compute ---------------------------------------------

    def foundation_model(self, name: str | None = None):
        name = name or self.settings.effective_base_model
        label = self.settings.azureml_model_label
        return self._call(f"get model {name} from registry {self.settings.azureml_registry}",
                          lambda: self.registry.models.get(name, label=label),
                          not_found=f"Model {name} (label {label}) is not in registry {self.settings.azureml_registry}:"
                                    " set TUNEDROP_BASE_MODEL to a model of that registry.")

    def check_base_model(self, name: str) -> None:
        try:
            self.foundation_model(name)
        except BackendError as exc:
            if exc.code == "not_found":
                raise BackendError(f"base_model {name!r}: {exc}".replace("set TUNEDROP_BASE_MODEL", "set base_model"),
                                   code="unknown_base_model") from None
            raise

    def check_compute(self, model) -> tuple[str, int]:
        """The seed's compute checks; returns (cluster name, GPUs per node)."""
        name = self.settings.azureml_finetune_compute
        setting = "TUNEDROP_AZUREML_FINETUNE_COMPUTE"
        allow = allow_list(model, "finetune")
        compute = self._call(f"get compute {name}", lambda: self.workspace.compute.get(name),
                             not_found=f"Compute cluster {name} does not exist in workspace {self.workspace_name}: "
                                       f"create it (a GPU size from {allow or 'the fine-tuning SKU list'}) or set "
                                       f"{setting} to an existing cluster.")
        state = _text(compute.provisioning_state)
        if state.lower() == "failed":
            raise BackendError(f"Cluster {name} is in state Failed: recreate it or set {setting} to another cluster.",
                               code="compute_failed")
        size = _text(getattr(compute, "size", ""))
        if allow is not None:
            if size.lower() not in [str(x).lower() for x in allow]:
                raise BackendError(f"Cluster {name} has VM size {size}, which is not in the allow-listed computes for "
                                   f"fine-tuning {model.name} ({', '.join(map(str, allow))}): create a cluster of one "
                                   f"of those sizes and set {setting} to it.", code="compute_not_allowed")
        elif size.lower() in UNSUPPORTED_FINETUNE_SIZES:
            raise BackendError(f"Cluster {name} has VM size {size}, which is not supported for fine-tuning: create a "
                               f"cluster of a current GPU size (e.g. Standard_NC24ads_A100_v4) and set {setting} to it.",
                               code="compute_not_supported")
        gpus = self.settings.azureml_gpus_per_node or gpus_per_node(size)
        if gpus < 1:
            raise BackendError(f"VM size {size} of cluster {name} is not in tunedrop's table of GPU sizes: set "
                               "TUNEDROP_AZUREML_GPUS_PER_NODE to its GPUs per node, or set "
                               f"{setting} to a GPU cluster.", code="compute_no_gpus")
        return name, gpus

    # ---- seed step 4: data ----------------------------------------------------------------------

    def write_split(self, run, config: TrainingConfig) -> tuple[str, str | None]:
        """Stream the validated dataset into `<run>/train.jsonl` and `<run>/test.jsonl` in the data container.

        Whatever format was dropped (.jsonl, .jsonl.gz, Parquet), the pipeline gets chat JSONL, one
        `{"messages": [...]}` per line, as the validator read it. A train/test pair is copied as given.
        A single file is split by :func:`shared.split.split_stream`, as the local backend splits it:
        deterministic, one pass, bounded memory (blocks of 4 MiB are staged as they fill). Returns the
        `azureml://datastores/...` URIs the pipeline reads.
        """

        service = self.storage.blob_service
        container = self.storage.ensure_container(self.settings.azureml_data_container)
        paths = {"train": f"{run.run_id}/train.jsonl", "test": f"{run.run_id}/test.jsonl"}
        writers = {side: _BlockWriter(container.get_blob_client(path)) for side, path in paths.items()}
        with_test = bool(run.test_blob) or config.test_fraction > 0
        if run.test_blob:
            for side, blob, etag in (("train", run.dataset_blob, run.dataset_etag), ("test", run.test_blob, run.test_etag)):
                for line in _chat_lines(service, run.dataset_container, blob, etag):
                    writers[side].write(line)
        else:
            lines = _chat_lines(service, run.dataset_container, run.dataset_blob, run.dataset_etag)
            for side, line in split_stream(lines, config.test_fraction, config.seed):
                writers[side].write(line)
        writers["train"].commit()
        if with_test:
            writers["test"].commit()
        store = self.settings.azureml_datastore
        train = f"azureml://datastores/{store}/paths/{paths['train']}"
        test = f"azureml://datastores/{store}/paths/{paths['test']}" if with_test else None
        return train, test

    def check_datastore(self) -> None:
        """The datastore the job reads its data through must exist: Azure ML checks it only when the job
        starts on the cluster, hours of queueing later. infra/ creates it (credential-less AzureBlob on
        the data container); once found, it is not asked again in this process."""
        def find():
            name = self.settings.azureml_datastore
            return self._call(f"get datastore {name}", lambda: self.workspace.datastores.get(name), not_found=(
                f"Datastore {name} does not exist in workspace {self.workspace_name}: run `azd provision` (infra/ "
                f"creates it), or create a credential-less AzureBlob datastore {name} on container "
                f"{self.settings.azureml_data_container} of the app's data account, or set TUNEDROP_AZUREML_DATASTORE "
                "to one that is; then drop the dataset again."))
        try:
            self._client("datastore", find)
        except BackendError as exc:
            if exc.code == "not_found":
                raise BackendError(str(exc), code="datastore_missing") from None
            raise

    # ---- seed steps 5-6: the pipeline job ---------------------------------------------------------

    def _existing_job(self, job_name: str):
        return self._find(f"get job {job_name}", lambda: self.workspace.jobs.get(job_name))

    def submit_finetune(self, run, config: TrainingConfig) -> str:
        job_name = job_name_for(run.run_id, run.retries)
        if self._existing_job(job_name) is not None:
            log.info("job %s already exists, not submitting again", job_name)
            return job_name
        base = run.base_model or self.settings.effective_base_model
        model = self.foundation_model(base)
        self.check_instance_type(model, then="drop the dataset again")
        compute, gpus = self.check_compute(model)
        self.check_datastore()
        params = finetune_parameters(config, model.tags or {})
        train_uri, test_uri = self.write_split(run, config)
        job = self.build_pipeline_job(run, job_name, model, compute, gpus, params, train_uri, test_uri)
        experiment = self.settings.experiment_for(base)
        self._call(f"submit job {job_name}", lambda: self.workspace.jobs.create_or_update(job, experiment_name=experiment))
        log.info("job %s submitted to experiment %s", job_name, experiment)
        return job_name

    def build_pipeline_job(self, run, job_name, model, compute, gpus, params, train_uri, test_uri):
        from azure.ai.ml import Input
        from azure.ai.ml.dsl import pipeline

        label = self.settings.azureml_model_label
        component = self._call(f"get component {PIPELINE_COMPONENT}",
                               lambda: self.registry.components.get(name=PIPELINE_COMPONENT, label=label),
                               not_found=f"Component {PIPELINE_COMPONENT} (label {label}) is not in registry "
                                         f"{self.settings.azureml_registry}.")
        s = self.settings
        display_name = seed_display_name(model.name, params, gpus)
        inputs = {"test_file_path": Input(type="uri_file", path=test_uri)} if test_uri else {}
        # A model's model_specific_defaults may name parameters this component version does not take
        # (Phi-3's list has learning_rate_min/_max, logging_steps, ...); the SDK refuses unknown keywords.
        accepted = {name.lower() for name in (getattr(component, "inputs", None) or {})}
        if accepted:
            dropped = sorted(name for name in params if name.lower() not in accepted)
            if dropped:
                log.info("job %s: %s takes no %s; not passed", job_name, PIPELINE_COMPONENT, ", ".join(dropped))
            params = {name: value for name, value in params.items() if name.lower() in accepted}

        @pipeline(name=display_name)
        def create_pipeline():
            chat_completion_pipeline = component(
                mlflow_model_path=model.id,
                compute_model_import=s.azureml_import_compute or compute,
                compute_preprocess=s.azureml_preprocess_compute or compute,
                compute_finetune=compute,
                compute_model_evaluation=s.azureml_evaluation_compute or compute,
                train_file_path=Input(type="uri_file", path=train_uri),
                **inputs,
                number_of_gpu_to_use_finetuning=gpus,
                **params,
            )
            return {"trained_model": chat_completion_pipeline.outputs.mlflow_model_folder}

        job = create_pipeline()
        job.name = job_name
        job.display_name = display_name
        job.tags = {RUN_ID_TAG: run.run_id, "dataset": f"{run.dataset_container}/{run.dataset_blob}",
                    "dataset_etag": run.dataset_etag.strip('"'), "base_model": model.name,
                    "base_model_version": str(model.version)}
        job.settings.force_rerun = True
        job.settings.continue_on_step_failure = False
        return job

    # ---- seed step 7: job status and metrics -------------------------------------------------------

    def get_job(self, job_name: str) -> JobInfo:
        job = self._existing_job(job_name)
        if job is None:
            return JobInfo(job_name, JobStatus.NOT_FOUND, error=f"Job {job_name} does not exist in workspace "
                                                          f"{self.workspace_name}.")
        status = job_status(job.status)
        if status == JobStatus.COMPLETED:
            return JobInfo(job_name, status, metrics=self.job_metrics(job_name))
        if status in (JobStatus.FAILED, JobStatus.CANCELED):
            return JobInfo(job_name, status, error=self.job_error(job_name, status, getattr(job, "studio_url", "")))
        return JobInfo(job_name, status)

    @property
    def mlflow_uri(self) -> str:
        """The workspace's MLflow tracking URI as https (it is an MLflow tracking server)."""
        def make():
            ws = self._call("get the workspace", lambda: self.workspace.workspaces.get(self.workspace_name))
            uri = ws.mlflow_tracking_uri or ""
            return "https://" + uri.split("://", 1)[1] if "://" in uri else uri
        return self._client("mlflow_uri", make)

    def job_metrics(self, job_name: str) -> dict[str, float]:
        """Latest metrics of the job and its steps (prefixed `<step>/`), via MLflow's REST API.

        Missing metrics never fail a run: a problem is logged and what was read is returned.
        """
        metrics: dict[str, float] = {}
        try:
            base = self.mlflow_uri + "/api/2.0/mlflow"
            root = self._get_json(f"{base}/runs/get?run_id={job_name}")["run"]
            experiment = root["info"]["experiment_id"]
            _collect(metrics, root, "")
            parents, seen = [job_name], 0
            while parents and seen < MAX_METRIC_RUNS:
                parent = parents.pop(0)
                found = self._get_json(f"{base}/runs/search", "POST", {
                    "experiment_ids": [experiment], "filter": f"tags.mlflow.parentRunId = '{parent}'",
                    "max_results": MAX_METRIC_RUNS})
                for child in found.get("runs", []):
                    seen += 1
                    _collect(metrics, child, _run_name(child) + "/")
                    parents.append(child["info"]["run_id"])
        except Exception as exc:  # noqa: BLE001 - metrics are informative, never fatal
            log.warning("job %s: could not read metrics: %s", job_name, exc)
        return metrics

    def job_error(self, job_name: str, status: str, studio_url: str = "") -> str:
        """Why the job ended: its run-history error, else a pointer to the studio."""
        where = f" See {studio_url}." if studio_url else ""
        try:
            host = self.mlflow_uri.split("/mlflow/", 1)[0]
            sub, rg, ws = self.subscription_id, self.resource_group, self.workspace_name
            data = self._get_json(f"{host}/history/v1.0/subscriptions/{sub}/resourceGroups/{rg}/providers/"
                                  f"Microsoft.MachineLearningServices/workspaces/{ws}/runs/{job_name}")
            error = (data.get("error") or {}).get("error") or {}
            if error.get("message"):
                return f"Job {job_name} {status}: {error.get('code', 'error')}: {error['message']}{where}"
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: could not read its error: %s", job_name, exc)
        return f"Job {job_name} ended {status}.{where}"

    # ---- seed step 8: register -----------------------------------------------------------------

    @staticmethod
    def model_version_for(run) -> str:
        """The seed's version is a timestamp: here the run's creation time, so a repeated event finds it."""
        created = datetime.fromisoformat(run.created_at) if run.created_at else None
        return created.strftime("%Y%m%d%H%M%S%f") if created else hashlib.sha256(run.run_id.encode()).hexdigest()[:12]

    def register_model(self, run) -> ModelRef:
        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model

        name = self.settings.model_name_for(run.base_model).replace("/", "-")
        version = self.model_version_for(run)
        existing = self._find(f"get model {name}:{version}", lambda: self.workspace.models.get(name, version))
        if existing is not None:
            owner = (existing.tags or {}).get(RUN_ID_TAG)
            if owner != run.run_id:
                raise BackendError(f"Model {name}:{version} already belongs to run {owner}: set TUNEDROP_MODEL_NAME "
                                   "to another name and retry.", code="model_version_conflict")
            return ModelRef(name, str(existing.version))
        path = f"azureml://jobs/{run.job_name}/outputs/trained_model"
        model = Model(
            path=path, type=AssetTypes.MLFLOW_MODEL, name=name, version=version,
            description=(f"{run.base_model} fine tuned model for ultrachat 200k chat-completion: dataset "
                         f"{run.dataset_container}/{run.dataset_blob} (ETag {run.dataset_etag}), job {run.job_name}, "
                         f"tunedrop run {run.run_id}."),
            tags={RUN_ID_TAG: run.run_id, "job_name": run.job_name, "base_model": run.base_model,
                  "dataset": f"{run.dataset_container}/{run.dataset_blob}", "dataset_etag": run.dataset_etag.strip('"')},
        )
        registered = self._call(f"register model {name}:{version}", lambda: self.workspace.models.create_or_update(model))
        return ModelRef(name, str(registered.version))

    # ---- seed step 9: deploy ---------------------------------------------------------------------

    def check_instance_type(self, model, then: str = "retry the run") -> None:
        """The seed's check of the deployment's VM size against the foundation model's
        `inference_compute_allow_list`. Run when a dataset is accepted too, so that a size the model
        cannot be served on fails in seconds, not after hours of training."""
        allow = allow_list(model, "inference")
        if allow is None:
            return
        instance_type = self.settings.azureml_instance_type
        if instance_type.lower() not in [str(x).lower() for x in allow]:
            raise BackendError(f"Instance type {instance_type} (TUNEDROP_AZUREML_INSTANCE_TYPE) is not in the "
                               f"allow-listed computes for inference of {model.name}: "
                               f"{', '.join(map(str, allow))}. Set TUNEDROP_AZUREML_INSTANCE_TYPE to one of them "
                               f"(with quota in the workspace's region) and {then}.",
                               code="instance_type_not_allowed")

    def _get_endpoint(self, endpoint_name: str):
        return self._find(f"get endpoint {endpoint_name}", lambda: self.workspace.online_endpoints.get(endpoint_name))

    def begin_deploy(self, run, model: ModelRef) -> str:
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        endpoint_name = endpoint_name_for(run.run_id)
        self.check_instance_type(self.foundation_model(run.base_model or self.settings.effective_base_model))
        endpoint = self._get_endpoint(endpoint_name)
        if endpoint is None:
            endpoint = ManagedOnlineEndpoint(
                name=endpoint_name, auth_mode="key",
                description=f"Online endpoint for {model.name}, fine tuned model for ultrachat-200k-chat-completion "
                            f"(tunedrop run {run.run_id})",
                tags={RUN_ID_TAG: run.run_id, "model_name": model.name, "model_version": model.version},
            )
            self._call(f"create endpoint {endpoint_name}",
                       lambda: self.workspace.online_endpoints.begin_create_or_update(endpoint))
            log.info("endpoint %s: creation started", endpoint_name)
        elif _text(endpoint.provisioning_state).lower() == "succeeded":
            self._ensure_deployment(endpoint)
        return endpoint_name

    def _ensure_deployment(self, endpoint) -> DeploymentInfo:
        """Start deployment "demo" of the model named in the endpoint's tags (seed step 9), at once."""
        from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings
        from azure.core.exceptions import HttpResponseError

        tags = endpoint.tags or {}
        if not tags.get("model_name"):
            return DeploymentInfo(DEPLOY_FAILED, error=f"Endpoint {endpoint.name} has no model_name tag: it was not "
                                  "made by tunedrop.", error_code="foreign_endpoint")
        model_id = (f"{self.settings.workspace_id}/models/{tags['model_name']}/versions/{tags['model_version']}")
        deployment = ManagedOnlineDeployment(
            name=DEPLOYMENT_NAME, endpoint_name=endpoint.name, model=model_id,
            instance_type=self.settings.azureml_instance_type, instance_count=self.settings.azureml_instance_count,
            liveness_probe=ProbeSettings(initial_delay=600),
            request_settings=OnlineRequestSettings(request_timeout_ms=90000),
            tags={RUN_ID_TAG: tags.get(RUN_ID_TAG, "")},
        )
        try:
            poller = self._call(f"create deployment {DEPLOYMENT_NAME} on {endpoint.name}",
                                lambda: self.workspace.online_deployments.begin_create_or_update(deployment))
        except BackendError as exc:
            cause = exc.__cause__
            if exc.retryable or not isinstance(cause, HttpResponseError):
                raise
            code, message = _error_code(cause)
            return self._failed(endpoint.name, code, message)
        self._record_operation(endpoint.name, _operation_url(poller))
        log.info("endpoint %s: deployment %s started", endpoint.name, DEPLOYMENT_NAME)
        return DeploymentInfo(DEPLOY_CREATING)

    def _failed(self, endpoint_name: str, code: str, message: str) -> DeploymentInfo:
        s = self.settings
        return DeploymentInfo(DEPLOY_FAILED, error=_deployment_fix(code, message, endpoint_name, s.azureml_instance_type,
                                                                   s.azureml_instance_count),
                              error_code=code or "deployment_failed")

    def get_deployment(self, endpoint_name: str) -> DeploymentInfo:
        endpoint = self._get_endpoint(endpoint_name)
        if endpoint is None:
            return DeploymentInfo(DEPLOY_MISSING, error=f"Endpoint {endpoint_name} does not exist.")
        state = _text(endpoint.provisioning_state).lower()
        if state in ("failed", "canceled"):
            return DeploymentInfo(DEPLOY_FAILED, error=f"Endpoint {endpoint_name} is {_text(endpoint.provisioning_state)}: "
                                  "retry the run.", error_code="endpoint_failed")
        if state != "succeeded":
            return DeploymentInfo(DEPLOY_CREATING)
        deployment = self._find(f"get deployment {DEPLOYMENT_NAME}",
                                lambda: self.workspace.online_deployments.get(DEPLOYMENT_NAME, endpoint_name))
        if deployment is None:
            return self._ensure_deployment(endpoint)
        state = _text(deployment.provisioning_state).lower()
        if state == "succeeded":
            return DeploymentInfo(DEPLOY_READY)
        if state in ("failed", "canceled"):
            code, message = self._operation_error(endpoint_name)
            return self._failed(endpoint_name, code, message)
        return DeploymentInfo(DEPLOY_CREATING)

    def activate(self, endpoint_name: str) -> None:
        endpoint = self._get_endpoint(endpoint_name)
        if endpoint is None:
            raise BackendError(f"Endpoint {endpoint_name} does not exist.", code="endpoint_missing")
        if (endpoint.traffic or {}).get(DEPLOYMENT_NAME) == 100:
            return
        endpoint.traffic = {DEPLOYMENT_NAME: 100}
        self._call(f"set traffic on {endpoint_name}",
                   lambda: self.workspace.online_endpoints.begin_create_or_update(endpoint))

    # ---- seed step 11: delete --------------------------------------------------------------------

    def delete_endpoint(self, endpoint_name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        self._keys.pop(endpoint_name, None)
        try:
            self._call(f"delete endpoint {endpoint_name}",
                       lambda: self.workspace.online_endpoints.begin_delete(name=endpoint_name))
        except ResourceNotFoundError:
            log.info("endpoint %s is already gone", endpoint_name)

    # ---- seed step 10: score ---------------------------------------------------------------------

    def scoring_target(self, endpoint_name: str) -> ScoringTarget:
        cached = self._keys.get(endpoint_name)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        endpoint = self._get_endpoint(endpoint_name)
        if endpoint is None or not endpoint.scoring_uri:
            raise BackendError(f"Endpoint {endpoint_name} does not exist.", code="endpoint_missing")
        keys = self._call(f"get keys of {endpoint_name}", lambda: self.workspace.online_endpoints.get_keys(endpoint_name))
        key = getattr(keys, "primary_key", None)
        if not key:
            raise BackendError(f"Endpoint {endpoint_name} does not use key auth.", code="endpoint_auth")
        target = ScoringTarget(endpoint.scoring_uri, key, headers={"azureml-model-deployment": DEPLOYMENT_NAME},
                               format="azureml")
        self._keys[endpoint_name] = (time.monotonic() + self.settings.azureml_key_ttl_s, target)
        return target

    def forget_key(self, endpoint_name: str) -> None:
        """Drop a cached key (the endpoint answered 401: its keys were regenerated)."""
        self._keys.pop(endpoint_name, None)

    # ---- deployment operation record ---------------------------------------------------------------

    def _state_blob(self, endpoint_name: str):
        return self.storage.blob_service.get_blob_client(
            self.settings.azureml_data_container, f"{STATE_PREFIX}/{endpoint_name}.json")

    def _record_operation(self, endpoint_name: str, url: str | None) -> None:
        if not url:
            return

        blob = self._state_blob(endpoint_name)
        try:
            self.storage.ensure_container(self.settings.azureml_data_container)
            blob.upload_blob(json.dumps({"operation_url": url}).encode(), overwrite=True)
        except Exception as exc:  # noqa: BLE001 - only the error text of a later failure depends on it
            log.warning("endpoint %s: could not record the deployment operation: %s", endpoint_name, exc)

    def _operation_error(self, endpoint_name: str) -> tuple[str, str]:
        """(code, message) of the failed deployment, from its async operation's status."""
        try:
            url = json.loads(self._state_blob(endpoint_name).download_blob().readall())["operation_url"]
            status = self._get_json(url)
            error = status.get("error") or {}
            return error.get("code", ""), error.get("message", "")
        except Exception as exc:  # noqa: BLE001
            log.warning("endpoint %s: no error details for the failed deployment: %s", endpoint_name, exc)
            return "", ""


def _operation_url(poller) -> str | None:
    """The Azure-AsyncOperation URL of a poller's initial response (where the operation's error will be)."""
    try:
        response = poller.polling_method()._initial_response.http_response  # noqa: SLF001
        headers = response.headers
        return headers.get("Azure-AsyncOperation") or headers.get("Location")
    except Exception:  # noqa: BLE001
        return None


def _run_name(run: dict) -> str:
    tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
    return tags.get("mlflow.runName") or run.get("info", {}).get("run_name") or run["info"]["run_id"]


def _collect(metrics: dict[str, float], run: dict, prefix: str) -> None:
    for metric in run.get("data", {}).get("metrics", []):
        metrics[f"{prefix}{metric['key']}"] = metric["value"]


def _chat_lines(service, container: str, blob: str, etag: str):
    """The examples of one blob version as chat JSONL lines, whatever its format."""
    from azure.core import MatchConditions

    from shared.validation import detect_format, iter_conversations

    stream = service.get_blob_client(container, blob).download_blob(
        etag=etag, match_condition=MatchConditions.IfNotModified)
    for messages in iter_conversations(stream.chunks(), format=detect_format(blob)):
        yield json.dumps({"messages": messages}, ensure_ascii=False).encode() + b"\n"


class _BlockWriter:
    """Write a block blob as staged blocks of up to 4 MiB, committed at the end (bounded memory)."""

    BLOCK = 4 * 1024 * 1024

    def __init__(self, blob):
        self.blob, self.buffer, self.blocks = blob, bytearray(), []

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= self.BLOCK:
            self._stage()

    def _stage(self) -> None:
        from azure.storage.blob import BlobBlock

        block_id = f"{len(self.blocks):08d}"
        self.blob.stage_block(block_id, bytes(self.buffer))
        self.blocks.append(BlobBlock(block_id=block_id))
        self.buffer = bytearray()

    def commit(self) -> None:
        if self.buffer or not self.blocks:
            self._stage()
        self.blob.commit_block_list(self.blocks)
