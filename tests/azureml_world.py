"""The Azure ML world the backend's tests run in: the real azure-ai-ml SDK over a transport that answers
with Microsoft's recorded responses (tests/azureml_recordings.py), a real Azurite for storage, and the
recordings' own workspace. Its fixtures (`transport`, `settings`, `backend`) are registered for the
whole suite by tests/conftest.py; tests import the helpers they use from here.
"""

from __future__ import annotations

import json
import re

import pytest

from shared.backends.azureml import AzureMLBackend
from shared.runs import Run
from shared.settings import Settings
from shared.storage import default_storage
from tests.azureml_recordings import RECORDED_WSID, answer, body
from tests.azureml_transport import PIPELINE_COMPONENT, AzureMLTransport, StaticCredential

WSID = RECORDED_WSID
ARM = re.escape(WSID)
MODEL = "Phi-3-mini-4k-instruct"
TRACKING = "https://westus.api.azureml.ms/mlflow/v1.0" + WSID + "/api/2.0/mlflow"
#: Phi-3-mini-4k-instruct's tags in the azureml registry as Microsoft last published them with allow
#: lists (Azure/azureml-assets assets/models/system/phi-3-mini-4k-instruct/spec.yaml at c27704cd66a1,
#: version 15), list tags as the registry returns them: Python literals the seed reads with
#: ast.literal_eval. See tests/data/azureml/phi3-model-tags.md.
PHI3_INFERENCE = ["Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3", "Standard_ND40rs_v2",
                  "Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_ND96asr_v4",
                  "Standard_ND96amsr_A100_v4", "Standard_NC96ads_A100_v4"]
PHI3_FINETUNE = ["Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4", "Standard_NC96ads_A100_v4",
                 "Standard_ND96asr_v4", "Standard_ND96amsr_A100_v4"]
PHI3_TAGS = {"task": "chat-completion", "author": "Microsoft", "license": "MIT",
             "inference_compute_allow_list": repr(PHI3_INFERENCE), "finetune_compute_allow_list": repr(PHI3_FINETUNE),
             "model_specific_defaults": repr({"apply_deepspeed": "true", "deepspeed_stage": 2, "apply_lora": "true",
                                              "apply_ort": "false", "precision": 16, "ignore_mismatched_sizes": "false",
                                              "num_train_epochs": 1, "per_device_train_batch_size": 1,
                                              "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                                              "learning_rate": 5e-6, "lr_scheduler_type": "cosine",
                                              "logging_strategy": "steps", "logging_steps": 10, "save_total_limit": 1})}
RECORDED_MODEL = "test_267902544371"  # the registry model of the recorded session


def registry_model(tags: dict | None = None, name: str = MODEL) -> dict:
    """The recorded registry model version, as the azureml registry's Phi-3-mini-4k-instruct version 15."""
    def edit(b):
        b["properties"]["tags"] = PHI3_TAGS if tags is None else tags
    return body("registry_model_get", "GET", 200, r"/models/[^/]+/versions/2$",
                rename={RECORDED_MODEL: name, "testfeed": "azureml", "testFeed": "azureml", "/versions/2": "/versions/15"},
                edit=edit)


def compute(size: str = "STANDARD_NC24ADS_A100_V4", state: str = "Succeeded", name: str = "gpu-a100") -> dict:
    def edit(b):
        b["properties"]["properties"]["vmSize"] = size
        b["properties"]["provisioningState"] = state
    return body("compute_get", "GET", 200, r"/computes/test49208482942$", rename={"test49208482942": name}, edit=edit)


def put_echo(status: int = 200, headers: dict | None = None):
    """A PUT answered with its own body plus what the service adds (id, name, systemData), as ARM does."""
    system_data = body("workspace_get", "GET", 200, r"/workspaces/00000$")["systemData"]

    def answer(request, sent):
        path = request.url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        sent = json.loads(json.dumps(sent or {}))
        if "/models/" in path:
            sent["properties"].setdefault("flavors", {})
            sent["properties"].setdefault("stage", "Development")
        return status, {**sent, "id": "/" + path, "name": path.rsplit("/", 1)[-1], "systemData": system_data}, headers or {}
    return answer


def job(name: str, status: str) -> dict:
    """The recorded pipeline job (a GET of a running, then failed one), as ``name`` in ``status``."""
    def edit(b):
        b["properties"]["status"] = status
    return body("job_get", "GET", 200, r"/jobs/test_680454434153$", rename={"test_680454434153": name}, edit=edit)


def cancel_job(transport, name: str) -> None:
    """Answer `jobs.begin_cancel(name)` as Microsoft's recording does: 202 with the operation's Location,
    which answers 202 and then 200 (the SDK's poller reads it in the background; tunedrop never waits)."""
    renamed = {"000000000000000000000": name}
    transport.on("POST", rf"/jobs/{re.escape(name)}/cancel\?", answer("job_cancel", "POST", 202, rename=renamed))
    transport.on("GET", r"/mfeOperationResults/jc:", answer("job_cancel", "GET", 200, rename=renamed))


RECORDED_ENDPOINT = "online-ept-6696557f8dec409"


def endpoint(name: str, state: str = "Succeeded", tags: dict | None = None, traffic: dict | None = None) -> dict:
    """The recorded endpoint GET (after creation), as ``name`` with key auth, in ``state``."""
    def edit(b):
        b["properties"].update(provisioningState=state, authMode="Key", traffic=traffic or {})
        b["tags"] = tags or {}
    return body("online_endpoint", "GET", 200, rf"/onlineEndpoints/{RECORDED_ENDPOINT}$",
                rename={RECORDED_ENDPOINT: name}, edit=edit)


def deployment(endpoint_name: str, state: str) -> dict:
    def edit(b):
        b["properties"]["provisioningState"] = state
    return body("online_deployment", "GET", 200, r"/deployments/online-dpm-b0249d5411f7413$",
                rename={"online-ept-a2eef48db44f4a9": endpoint_name, "online-dpm-b0249d5411f7413": "demo"}, edit=edit)


def recorded(name: str, method: str, status: int | None = None, path: str = "", **kwargs):
    return lambda request, sent: answer(name, method, status, path, **kwargs)


def recorded_deployment_put(endpoint_name: str):
    return recorded("online_deployment", "PUT", 201, rename={"online-ept-a2eef48db44f4a9": endpoint_name,
                                                             "online-dpm-b0249d5411f7413": "demo"})


def recorded_not_found():
    """Azure ML's 404 for a resource that does not exist (recorded for a datastore; the same service
    answers every workspace resource: tests/data/azureml/recordings/README.md)."""
    return recorded("datastore", "GET", 404)


@pytest.fixture
def transport():
    t = AzureMLTransport()
    registry = {"testFeed": "azureml", "testfeed": "azureml"}
    t.on("GET", r"/registries/azureml/discovery", recorded("registry_discovery", "GET", 200, rename=registry))
    t.on("GET", rf"/registries/azureml/models/{MODEL}/versions\?", {"value": [registry_model()]})
    t.on("GET", rf"/registries/azureml/models/{MODEL}/versions/15\?", registry_model())
    # No recording holds the azureml registry's chat_completion_pipeline (tests/data/azureml/recordings/README.md).
    t.on("GET", r"/registries/azureml/components/chat_completion_pipeline/versions\?", PIPELINE_COMPONENT)
    t.on("GET", r"/registries/azureml/components/chat_completion_pipeline/versions/0.0.57\?",
         PIPELINE_COMPONENT["value"][0])
    t.on("GET", rf"{ARM}/computes/gpu-a100\?", compute())
    t.on("GET", rf"{ARM}\?", recorded("workspace_get", "GET", 200, r"/workspaces/00000$"))
    t.on("GET", rf"{ARM}/datastores/tunedrop\?", recorded("datastore", "GET", 200, r"/datastores/test_318669269601$",
                                                          rename={"test_318669269601": "tunedrop"}))
    t.on("PUT", rf"{ARM}/jobs/", put_echo(201))
    t.on("PUT", rf"{ARM}/models/", put_echo(201))
    t.on("GET", r"/mfeOperationsStatus/", recorded("online_endpoint", "GET", 200, r"/mfeOperationsStatus/.*5b3886840537$"))
    t.on("GET", r"/onlineEndpoints/[^/?]+/deployments\?", recorded("online_endpoint", "GET", 200, r"/deployments$"))
    return t


@pytest.fixture
def settings(storage_env):
    return Settings(backend="azureml", workspace_id=WSID, azureml_finetune_compute="gpu-a100",
                    runs_table=storage_env["TUNEDROP_RUNS_TABLE"],
                    training_container=storage_env["TUNEDROP_TRAINING_CONTAINER"],
                    webhook_queue=storage_env["TUNEDROP_WEBHOOK_QUEUE"],
                    azureml_data_container="fd" + storage_env["TUNEDROP_RUNS_TABLE"][4:])


@pytest.fixture
def backend(settings, transport):
    return AzureMLBackend(settings, credential=StaticCredential(), transport=transport)


def dataset(n: int = 20) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def stored_run(settings, run_id: str = "chat-0123456789ab", **fields) -> Run:
    container = default_storage().ensure_container(settings.training_container)
    etag = container.upload_blob("chat.jsonl", dataset(), overwrite=True).get_blob_properties().etag
    return Run(run_id, dataset_container=settings.training_container, dataset_blob="chat.jsonl", dataset_etag=etag,
               base_model=MODEL, created_at="2024-05-01T10:00:00.123456+00:00", **fields)


def mlflow_routes(transport, job_name: str) -> None:
    transport.on("GET", rf"/api/2.0/mlflow/runs/get\?run_id={job_name}", {"run": {
        "info": {"run_id": job_name, "experiment_id": "7", "status": "FINISHED"},
        "data": {"metrics": [], "tags": [{"key": "mlflow.runName", "value": job_name}]}}})

    def search(request, body):
        children = {job_name: [("ft-node", "chat_completion_pipeline", [])],
                    "ft-node": [("ft-step", "finetune", [("train_loss", 1.25)]),
                                ("ev-step", "model_evaluation", [("perplexity", 3.5)])]}
        parent = body["filter"].split("'")[1]
        return {"runs": [{"info": {"run_id": rid, "experiment_id": "7"},
                          "data": {"metrics": [{"key": k, "value": v, "step": 0, "timestamp": 0} for k, v in metrics],
                                   "tags": [{"key": "mlflow.runName", "value": name}]}}
                         for rid, name, metrics in children.get(parent, [])]}
    transport.on("POST", r"/api/2.0/mlflow/runs/search", search)
