"""The Azure ML backend's clients, made lazily once per backend (the pipeline keeps one backend per
process): the workspace and `azureml` registry MLClients, a plain azure-core pipeline for the REST calls
the SDK does not make (MLflow, operation status), the credential and the run's storage. Every SDK call
goes through :meth:`AzureMLClients._call`, which maps Azure's errors (shared/backends/azureml/errors.py).
"""

from __future__ import annotations

import threading
from typing import Any

from shared.backends.azureml.errors import call
from shared.backends.base import ScoringTarget

ARM_SCOPE = "https://management.azure.com/.default"


class AzureMLClients:
    """What every step of the backend stands on; the steps are mixed in by AzureMLBackend."""

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

    def _call(self, doing: str, fn, not_found: str | None = None):
        """Run one SDK call; Azure's errors become BackendErrors (retryable: throttling, 5xx, network)."""
        return call(doing, fn, not_found)

    def _find(self, doing: str, fn):
        """One SDK get through :meth:`_call`: its result, or None when Azure says it does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._call(doing, fn)
        except ResourceNotFoundError:
            return None
