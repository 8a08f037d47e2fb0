"""The Azure ML backend's job steps, the seed's steps 2-7: foundation model and compute checks, the
data split, the `chat_completion_pipeline` job, and the job's status, metrics and failure reason.
"""

from __future__ import annotations

import logging

from shared.backends.azureml.clients import AzureMLClients
from shared.backends.azureml.seed import (
    PIPELINE_COMPONENT,
    UNSUPPORTED_FINETUNE_SIZES,
    _text,
    allow_list,
    finetune_parameters,
    seed_display_name,
)
from shared.backends.azureml.split_writer import write_split
from shared.backends.base import BackendError, JobInfo, job_name_for
from shared.backends.gpu_sizes import gpus_per_node
from shared.events import RUN_ID_TAG
from shared.status import ACTIVE, JobStatus, job_status
from shared.training import TrainingConfig

log = logging.getLogger("tunedrop.backends.azureml")

MAX_METRIC_RUNS = 50


class JobSteps(AzureMLClients):
    """The job steps over the clients (``_call``, ``workspace``, ``registry``, ...); AzureMLBackend joins them
    with the serving steps, whose instance-type check runs before a submit (``check_instance_type``)."""

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
        """The run's train/test split in the data container, as chat JSONL: see
        :func:`shared.backends.azureml.split_writer.write_split`. Returns the URIs the pipeline reads."""
        return write_split(self.storage, self.settings, run, config)

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

    def job_progress(self, job_name: str) -> dict:
        """The job's status and its Azure ML studio page, where its steps and metric curves are (this app reads
        the metrics once the job has ended, see :meth:`job_metrics`)."""
        job = self._existing_job(job_name)
        if job is None:
            return {}
        return {"phase": str(job.status or "").lower(), "studio_url": getattr(job, "studio_url", "") or ""}

    def cancel_job(self, job_name: str) -> None:
        """`jobs.begin_cancel`: Azure ML answers 202 and cancels the job and its child steps; the poller
        is not waited on. A job that has ended or is gone is left as it is."""
        job = self._existing_job(job_name)
        if job is None or job_status(job.status) not in ACTIVE:
            return
        self._call(f"cancel job {job_name}", lambda: self.workspace.jobs.begin_cancel(job_name))
        log.info("job %s: cancel requested", job_name)

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


def _run_name(run: dict) -> str:
    tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
    return tags.get("mlflow.runName") or run.get("info", {}).get("run_name") or run["info"]["run_id"]


def _collect(metrics: dict[str, float], run: dict, prefix: str) -> None:
    for metric in run.get("data", {}).get("metrics", []):
        metrics[f"{prefix}{metric['key']}"] = metric["value"]
