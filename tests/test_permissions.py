"""The permissions matrix: every Azure call tunedrop makes, the RBAC action it needs, and whether the
roles infra/ grants cover it at that scope.

- Calls the app makes itself are captured, not listed: the Azure ML backend runs a whole run (submit,
  job events, register, deploy, traffic, keys, failure details, teardown) against Microsoft's recorded
  responses, and the core runs ingest, quarantine, webhooks and the job-event queue against Azurite,
  with every HTTP request kept. Each one must match a rule of MATRIX below (a new kind of call fails
  until it is placed there) and the rule's action must be granted.
- Calls the platform makes on the app's behalf (the Functions host, the blob extension's queue, the
  Key Vault reference, telemetry, the fine-tune job reading its data) cannot be captured here: they are
  PLATFORM, each with the document that says so.
- Actions come from Microsoft's operation lists and role definitions (tests/data/rbac/, sources noted
  there); grants are read from the Bicep (tests/rbac.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.azureml_world import (
    ARM,
    RECORDED_ENDPOINT,
    dataset,
    deployment,
    endpoint,
    job,
    mlflow_routes,
    recorded,
    recorded_deployment_put,
)
from tests.rbac import Grant, builtin_roles, covers, grants

ML = "Microsoft.MachineLearningServices"
BLOB = "Microsoft.Storage/storageAccounts/blobServices/containers"
QUEUE = "Microsoft.Storage/storageAccounts/queueServices/queues"
TABLE = "Microsoft.Storage/storageAccounts/tableServices/tables"
WS = r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/workspaces/[^/]+"


@dataclass(frozen=True)
class Need:
    """What one call needs: any one of ``actions`` (each a tuple of actions needed together), held by
    ``principal`` at a scope covering ``scope``. ``data``: data-plane (DataActions) or control plane.
    ``no_grant``: why infra/ grants nothing for it (and what happens without it)."""

    name: str
    principal: str
    actions: tuple[tuple[str, ...], ...]
    scope: str
    data: bool = False
    no_grant: str = ""


def one(*actions: str) -> tuple[tuple[str, ...], ...]:
    return (tuple(actions),)


# ---- rules for captured calls: (kind, method, URL path regex, query test) -> Need ----------------------

SYSTEM_REGISTRY = ("the azureml registry is Microsoft's system registry, which every signed-in identity "
                   "reads (Microsoft's seed notebook and samples read it with no role); not provable here")
OPERATION_STATUS = ("Azure-AsyncOperation URLs sit at subscription scope; which check ARM makes on them is not "
                    "documented (tests/data/rbac/operations.md). Only the SDK's own poller (never read) and the "
                    "failed-deployment error text read them; a 403 leaves the generic error "
                    "(test_a_forbidden_operation_status_still_fails_the_deployment_clearly)")

ARM_RULES: list[tuple[str, str, Need]] = [
    ("GET", rf"^{WS}$", Need("workspace read (MLflow URI)", "app", one(f"{ML}/workspaces/read"), "ws/workspace")),
    ("GET", rf"^{WS}/jobs/[^/]+$", Need("job read", "app", one(f"{ML}/workspaces/jobs/read"), "ws/workspace")),
    ("PUT", rf"^{WS}/jobs/[^/]+$", Need("pipeline job submit", "app", one(f"{ML}/workspaces/jobs/write"), "ws/workspace")),
    ("GET", rf"^{WS}/computes/[^/]+$", Need("compute read", "app", one(f"{ML}/workspaces/computes/read"), "ws/workspace")),
    ("GET", rf"^{WS}/datastores/[^/]+$", Need("datastore read", "app", one(f"{ML}/workspaces/datastores/read"),
                                              "ws/workspace")),
    ("GET", rf"^{WS}/models/[^/]+/versions(/[^/]+)?$", Need("model version read", "app",
                                                            one(f"{ML}/workspaces/models/versions/read"), "ws/workspace")),
    ("PUT", rf"^{WS}/models/[^/]+/versions/[^/]+$", Need("model version register", "app",
                                                         one(f"{ML}/workspaces/models/versions/write"), "ws/workspace")),
    ("GET", rf"^{WS}/onlineEndpoints/[^/]+$", Need("endpoint read", "app", one(f"{ML}/workspaces/onlineEndpoints/read"),
                                                   "ws/workspace")),
    ("PUT", rf"^{WS}/onlineEndpoints/[^/]+$", Need("endpoint create / traffic", "app",
                                                   one(f"{ML}/workspaces/onlineEndpoints/write"), "ws/workspace")),
    ("DELETE", rf"^{WS}/onlineEndpoints/[^/]+$", Need("endpoint delete", "app",
                                                      one(f"{ML}/workspaces/onlineEndpoints/delete"), "ws/workspace")),
    ("POST", rf"^{WS}/onlineEndpoints/[^/]+/listKeys$", Need("endpoint keys", "app",
                                                             one(f"{ML}/workspaces/onlineendpoints/listkeys/action"),
                                                             "ws/workspace")),
    ("GET", rf"^{WS}/onlineEndpoints/[^/]+/deployments(/[^/]+)?$", Need(
        "deployment read", "app", one(f"{ML}/workspaces/onlineEndpoints/deployments/read"), "ws/workspace")),
    ("PUT", rf"^{WS}/onlineEndpoints/[^/]+/deployments/[^/]+$", Need(
        "deployment create", "app", one(f"{ML}/workspaces/onlineEndpoints/deployments/write"), "ws/workspace")),
    # The seed's compute.list_sizes(): subscription scope, which no workspace role reaches (defect 3).
    ("GET", r"^/subscriptions/[^/]+/providers/Microsoft\.MachineLearningServices/locations/[^/]+/vmSizes$",
     Need("VM sizes list", "app", one(f"{ML}/locations/vmsizes/read"), "subscription")),
    ("GET", r"^/subscriptions/[^/]+/providers/Microsoft\.MachineLearningServices/locations/[^/]+/mfeOperations(Status|Results)/",
     Need("async operation status", "app", one(f"{ML}/locations/mfeOperationsStatus/read"), "subscription",
          no_grant=OPERATION_STATUS)),
    # MLflow and run history of the workspace: ARM actions, no data actions (Microsoft's how-to-assign-roles).
    ("GET", rf"/mlflow/v1\.0{WS}/api/2\.0/mlflow/runs/get$", Need("job metrics (MLflow)", "app",
                                                                   one(f"{ML}/workspaces/experiments/runs/read"),
                                                                   "ws/workspace")),
    ("POST", rf"/mlflow/v1\.0{WS}/api/2\.0/mlflow/runs/search$", Need("step metrics (MLflow)", "app",
                                                                        one(f"{ML}/workspaces/experiments/runs/read"),
                                                                        "ws/workspace")),
    ("GET", rf"^/history/v1\.0{WS}/runs/[^/]+$", Need("job error (run history)", "app",
                                                       one(f"{ML}/workspaces/experiments/runs/read"), "ws/workspace")),
    ("GET", r"/registries/azureml/discovery$", Need("registry discovery", "app", one(f"{ML}/registries/read"),
                                                    "registry/azureml", no_grant=SYSTEM_REGISTRY)),
    ("GET", r"/registries/azureml/(models|components)/[^/]+/versions(/[^/]+)?$",
     Need("foundation model / component", "app", one(f"{ML}/registries/assets/read"), "registry/azureml",
          no_grant=SYSTEM_REGISTRY)),
]


def arm_need(method: str, url: str) -> Need | None:
    path = urlsplit(url).path
    for rule_method, pattern, need in ARM_RULES:
        if method == rule_method and re.search(pattern, path):
            return need
    return None


def storage_need(method: str, url: str, services: dict[int, str]) -> Need | None:
    """The action of one Storage REST call (Microsoft's "Permissions for calling data operations"),
    on the app's data account; ``services``: Azurite's port of each service."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    segments = [s for s in parts.path.split("/") if s][1:]  # drop the account
    service = services.get(parts.port)
    if service == "blob":
        scope = f"rg/data/{segments[0]}" if segments else "rg/data"
        if query.get("restype") == "container":
            if query.get("comp") == "list":
                return Need("list blobs", "app", one(f"{BLOB}/blobs/read"), scope, data=True)
            action = {"PUT": "write", "GET": "read", "HEAD": "read", "DELETE": "delete"}[method]
            return Need(f"container {action}", "app", one(f"{BLOB}/{action}"), scope)
        if method in ("GET", "HEAD"):
            return Need("blob read", "app", one(f"{BLOB}/blobs/read"), scope, data=True)
        if method == "PUT":
            if query.get("comp") == "tags":
                return Need("blob tags", "app", one(f"{BLOB}/blobs/tags/write"), scope, data=True)
            return Need("blob write", "app", ((f"{BLOB}/blobs/write",), (f"{BLOB}/blobs/add/action",)), scope, data=True)
        if method == "DELETE":
            return Need("blob delete", "app", one(f"{BLOB}/blobs/delete"), scope, data=True)
    if service == "queue":
        if len(segments) == 1:
            action = {"PUT": "write", "GET": "read", "DELETE": "delete"}[method]
            return Need(f"queue {action}", "app", one(f"{QUEUE}/{action}"), "rg/data")
        messages = f"{QUEUE}/messages"
        if method == "POST":
            return Need("put message", "app", ((f"{messages}/add/action",), (f"{messages}/write",)), "rg/data", data=True)
        if method == "GET" and query.get("peekonly") == "true":
            return Need("peek messages", "app", one(f"{messages}/read"), "rg/data", data=True)
        if method == "GET":
            return Need("get messages", "app", ((f"{messages}/process/action",), (f"{messages}/delete", f"{messages}/read")),
                        "rg/data", data=True)
        if method == "DELETE":
            return Need("delete message", "app", ((f"{messages}/process/action",), (f"{messages}/delete",)), "rg/data",
                        data=True)
        if method == "PUT":
            return Need("update message", "app", one(f"{messages}/write"), "rg/data", data=True)
    if service == "table":
        if segments and segments[0] == "Tables":
            return Need("table create", "app", one(f"{TABLE}/write"), "rg/data")
        entities = f"{TABLE}/entities"
        if method == "GET":
            return Need("query entities", "app", one(f"{entities}/read"), "rg/data", data=True)
        if method == "POST":
            return Need("insert entity", "app", ((f"{entities}/write",), (f"{entities}/add/action",)), "rg/data", data=True)
        if method in ("PUT", "PATCH", "MERGE"):
            return Need("update entity", "app", ((f"{entities}/write",), (f"{entities}/add/action", f"{entities}/update/action")),
                        "rg/data", data=True)
        if method == "DELETE":
            return Need("delete entity", "app", one(f"{entities}/delete"), "rg/data", data=True)
    return None


# ---- what the platform does with the app's identity (not capturable here) ----------------------------------

PLATFORM = [
    # AzureWebJobsStorage: "The Storage Blob Data Owner role covers the basic needs of Functions host storage"
    # (Microsoft's functions-reference, "Connecting to host storage with an identity").
    Need("host keys, timer locks, blob receipts (AzureWebJobsStorage)", "app",
         one(f"{BLOB}/blobs/read", f"{BLOB}/blobs/write", f"{BLOB}/blobs/delete"), "rg/host/azure-webjobs-hosts", data=True),
    Need("host containers (AzureWebJobsStorage)", "app", one(f"{BLOB}/write"), "rg/host"),
    Need("Flex Consumption deployment package", "app", one(f"{BLOB}/blobs/read"), "rg/host/app-package", data=True),
    # The blob trigger with source EventGrid: its webhook writes each event to the queue
    # azure-webjobs-blobtrigger-<hostId> in AzureWebJobsStorage (creating it), then a listener takes it
    # (Azure/azure-sdk-for-net BlobTriggerQueueWriter); Microsoft's table for the blob trigger asks for
    # Storage Blob Data Owner and Storage Queue Data Contributor (defect 1: without it the webhook answers 403).
    Need("blob trigger queue: create", "app", one(f"{QUEUE}/write"), "rg/host"),
    Need("blob trigger queue: put event", "app", ((f"{QUEUE}/messages/add/action",), (f"{QUEUE}/messages/write",)),
         "rg/host", data=True),
    Need("blob trigger queue: take event", "app", one(f"{QUEUE}/messages/process/action"), "rg/host", data=True),
    Need("blob trigger queue: done", "app", ((f"{QUEUE}/messages/process/action",), (f"{QUEUE}/messages/delete",)),
         "rg/host", data=True),
    # The trigger's blob, read with the TUNEDROP_STORAGE connection, and its poison queue on that account.
    Need("blob trigger: read the dataset", "app", one(f"{BLOB}/blobs/read"), "rg/data/training-data", data=True),
    Need("blob trigger: poison queue", "app", ((f"{QUEUE}/messages/add/action",), (f"{QUEUE}/messages/write",)),
         "rg/data", data=True),
    # Queue triggers (webhooks, job-events): take, retry later (update), delete, park in <queue>-poison.
    Need("queue triggers: take", "app", one(f"{QUEUE}/messages/process/action"), "rg/data", data=True),
    Need("queue triggers: retry later", "app", one(f"{QUEUE}/messages/write"), "rg/data", data=True),
    Need("queue triggers: poison queue", "app", one(f"{QUEUE}/write"), "rg/data"),
    Need("Key Vault reference (webhook secret)", "app", one("Microsoft.KeyVault/vaults/secrets/getSecret/action"),
         "rg/keyvault", data=True),
    Need("telemetry with Entra ID", "app", one("Microsoft.Insights/Telemetry/Write"), "rg/appinsights", data=True),
    # The fine-tune job reads the split through the credential-less datastore with the compute cluster's
    # identity (infra/modules/workspace-datastore.bicep says why).
    Need("fine-tune job reads its data", "gpu-cluster", one(f"{BLOB}/blobs/read"), "rg/data/finetune-data", data=True),
]


def uncovered(needs, granted: list[Grant]) -> list[str]:
    roles = builtin_roles()
    missing = []
    for need in needs:
        if need.no_grant:
            continue
        held = [roles[g.role] for g in granted if g.principal == need.principal and covers(g.scope, need.scope)]
        if not any(all(any(role.allows(action, need.data) for role in held) for action in option)
                   for option in need.actions):
            missing.append(f"{need.name}: {need.principal} needs {' or '.join(' + '.join(o) for o in need.actions)} "
                           f"at {need.scope}")
    return missing


# ---- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("need", PLATFORM, ids=[n.name for n in PLATFORM])
def test_what_the_platform_does_with_the_apps_identity_is_granted(need):
    assert uncovered([need], grants()) == []


def test_every_call_of_a_whole_run_on_azure_is_in_the_matrix_and_granted(captured):
    arm, storage, services = captured
    classified = [(f"{m} {u}", arm_need(m, u)) for m, u in arm] + \
                 [(f"{m} {u}", storage_need(m, u, services)) for m, u in storage]
    needs = [need for _, need in classified if need is not None]
    unknown = [call for call, need in classified if need is None]
    assert not unknown, f"calls the matrix does not know: add a rule to tests/test_permissions.py: {unknown}"
    names = {n.name for n in needs}
    # The run really went through every step (a matrix over half a run would prove little).
    assert {"pipeline job submit", "model version register", "endpoint create / traffic", "deployment create",
            "endpoint keys", "endpoint delete", "job metrics (MLflow)", "job error (run history)", "datastore read",
            "blob write", "blob delete", "put message", "get messages", "insert entity", "update entity",
            "table create", "queue write", "container write"} <= names, sorted(names)
    missing = sorted(set(uncovered(needs, grants())))
    assert not missing, "roles infra/ does not grant:\n" + "\n".join(missing)

    # Least privilege: every role infra/ hands the app serves a call.
    roles = builtin_roles()
    for grant in (g for g in grants() if g.principal == "app"):
        role = roles[grant.role]
        assert any(covers(grant.scope, n.scope) and any(role.allows(a, n.data) for o in n.actions for a in o)
                   for n in [*needs, *PLATFORM] if n.principal == "app"), \
            f"{grant.where}: {role.name} at {grant.scope} serves no call"


# ---- the captured run ------------------------------------------------------------------------------



@pytest.fixture
def captured(backend, transport, settings, monkeypatch):
    """Every HTTP request of one run through Azure, from the dataset's drop to its endpoint's teardown."""
    import dataclasses
    import json

    from azure.core.pipeline.transport import RequestsTransport

    from shared import runs
    from shared.backends.base import endpoint_name_for
    from shared.event_queue import RunEventQueue
    from shared.events import RUN_ID_TAG, RunEvent, run_event
    from shared.pipeline import Pipeline
    from shared.storage import default_storage
    from shared.webhooks import new_secret

    storage_calls = []
    send = RequestsTransport.send

    def recording_send(self, request, **kwargs):
        storage_calls.append((request.method, request.url, dict(request.headers)))
        return send(self, request, **kwargs)

    monkeypatch.setattr(RequestsTransport, "send", recording_send)
    settings = dataclasses.replace(settings, webhook_urls=("https://hooks.example.com/tunedrop",),
                                   webhook_secret=new_secret())
    backend.settings = settings
    pipeline = Pipeline(settings, backend=backend)
    container = default_storage().ensure_container(settings.training_container)
    container.upload_blob("bad.jsonl", b'{"messages": 5}\n', overwrite=True)
    assert pipeline.ingest(container.get_blob_client("bad.jsonl")).state == runs.REJECTED  # quarantined
    container.upload_blob("chat.jsonl", dataset(), overwrite=True)
    run = pipeline.ingest(container.get_blob_client("chat.jsonl"))
    assert run.state == runs.SUBMITTED, run.error

    # The job completes: Event Grid -> job_events (queued) -> job_event_worker.
    job_name, ep = run.job_name, endpoint_name_for(run.run_id)
    transport.on("GET", rf"{ARM}/jobs/{job_name}\?", job(job_name, "Completed"))
    mlflow_routes(transport, job_name)
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "PUT", 201,
                                                                 rename={RECORDED_ENDPOINT: ep}))
    raw = run_event(status="Completed", topic=settings.workspace_id, job_name=job_name, experiment_name="x",
                    run_tags={RUN_ID_TAG: run.run_id})
    RunEventQueue(settings).put(RunEvent.from_json(json.dumps(raw)))
    queue = default_storage().queue(settings.job_events_queue)
    (message,) = queue.receive_messages(max_messages=1, visibility_timeout=60)
    assert pipeline.on_run_event(RunEvent.from_json(message.content)).state == runs.DEPLOYING
    queue.delete_message(message)

    # The sweeper: the deployment starts, becomes ready, takes traffic; the endpoint is scored, then torn down.
    tags = {RUN_ID_TAG: run.run_id, "model_name": "m", "model_version": "1"}
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, "Succeeded", tags))
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", recorded_deployment_put(ep))
    backend.get_deployment(ep)
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", deployment(ep, "Failed"))
    backend.get_deployment(ep)  # a failed deployment: its error from the operation status
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", deployment(ep, "Succeeded"))
    backend.get_deployment(ep)
    backend.activate(ep)
    transport.on("POST", rf"{ARM}/onlineEndpoints/{ep}/listKeys\?", recorded("online_endpoint", "POST", 200, r"/listKeys$"))
    backend.scoring_target(ep)
    transport.on("DELETE", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "DELETE", 202,
                                                                    rename={RECORDED_ENDPOINT: ep}))
    backend.delete_endpoint(ep)
    transport.on("GET", r"/history/v1\.0/", {"runId": job_name, "status": "Failed", "error": {}})
    backend.job_error(job_name, "Failed")
    pipeline.store.update(run.run_id, last_scored_at=runs.utcnow().isoformat())
    arm = [(method, url) for method, url, _ in transport.requests]
    storage = default_storage()
    services = {urlsplit(storage.blob_service.url).port: "blob", urlsplit(storage.queue_service.url).port: "queue",
                urlsplit(storage.table_service.url).port: "table"}
    local = [(m, u) for m, u, _ in storage_calls if urlsplit(u).port in services]
    return arm, local, services


def test_the_seeds_list_sizes_call_is_one_no_role_of_the_app_reaches():
    """Why GPUs per node come from a table: the seed's compute.list_sizes() is a subscription-scope read."""
    url = ("https://management.azure.com/subscriptions/00000000-0000-0000-0000-000000000/providers/"
           "Microsoft.MachineLearningServices/locations/westus/vmSizes?api-version=2024-10-01")
    need = arm_need("GET", url)
    assert need is not None and need.scope == "subscription"
    assert uncovered([need], grants()) == [
        "VM sizes list: app needs Microsoft.MachineLearningServices/locations/vmsizes/read at subscription"]
