"""The Azure ML backend's serving steps, the seed's steps 8-11: the trained model registered, the
key-auth endpoint and its deployment "demo" started without waiting, their state read back (a failed
deployment's error from the async-operation URL recorded beside the run's data), traffic, delete, and
the scoring target with its key cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime

from shared.backends.azureml.clients import AzureMLClients
from shared.backends.azureml.errors import _deployment_fix, _error_code, _operation_url
from shared.backends.azureml.seed import DEPLOYMENT_NAME, _text, allow_list
from shared.backends.base import (
    DEPLOY_CREATING,
    DEPLOY_FAILED,
    DEPLOY_MISSING,
    DEPLOY_READY,
    BackendError,
    DeploymentInfo,
    ModelRef,
    ScoringTarget,
    endpoint_name_for,
)
from shared.events import RUN_ID_TAG

log = logging.getLogger("tunedrop.backends.azureml")

STATE_PREFIX = "deployments"


class EndpointSteps(AzureMLClients):
    """The serving steps over the clients (``_call``, ``workspace``, ``storage``, ...); AzureMLBackend joins
    them with the job steps, which give the foundation model the instance type is checked against."""

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

        endpoint_name = endpoint_name_for(run.run_id, run.cycle)
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
