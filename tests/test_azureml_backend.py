"""The azureml backend against Azure ML's REST shapes: the real azure-ai-ml SDK over a recorded-shape transport.

No Azure account is needed: `AzureMLTransport` (an azure.core transport) answers each ARM / registry /
MLflow call with JSON shaped like the service's, and keeps every request so the tests assert what would
have been sent. Storage (the train/test split, the deployment record, the run store) is a real Azurite.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from shared import runs
from shared.backends.azureml import AzureMLBackend, finetune_parameters, seed_display_name
from shared.backends.base import (
    DEPLOY_CREATING,
    DEPLOY_FAILED,
    DEPLOY_READY,
    BackendError,
    ModelRef,
    endpoint_name_for,
)
from shared.events import RUN_ID_TAG, RunEvent, run_event
from shared.pipeline import Pipeline
from shared.runs import Run
from shared.settings import Settings
from shared.storage import default_storage
from shared.training import TrainingConfig
from tests.azureml_transport import error
from tests.azureml_world import (  # noqa: F401 - the world the tests run in
    ARM,
    MODEL,
    PHI3_FINETUNE,
    PHI3_INFERENCE,
    PHI3_TAGS,
    RECORDED_ENDPOINT,
    RECORDED_MODEL,
    TRACKING,
    WSID,
    compute,
    dataset,
    deployment,
    endpoint,
    job,
    mlflow_routes,
    put_echo,
    recorded,
    recorded_deployment_put,
    recorded_not_found,
    registry_model,
    stored_run,
)

# ---- ingest -> submit ---------------------------------------------------------------------------------


def test_submit_builds_the_seed_pipeline_job(backend, transport, settings):
    run = stored_run(settings)
    assert backend.submit_finetune(run, TrainingConfig()) == f"tunedrop-{run.run_id}"

    ((_, url, body),) = transport.calls("PUT", r"/jobs/")
    assert url.split("?")[0].endswith(f"/workspaces/00000/jobs/tunedrop-{run.run_id}")
    props = body["properties"]
    assert props["experimentName"] == f"chat_completion_{MODEL}"
    assert props["displayName"] == f"{MODEL}-ultrachat-bs1-cosine-ds2-lora-save_limit1-seqlen-1"
    assert props["tags"][RUN_ID_TAG] == run.run_id
    assert props["settings"]["force_rerun"] is True and props["settings"]["continue_on_step_failure"] is False
    assert props["outputs"] == {"trained_model": {"mode": "ReadWriteMount", "jobOutputType": "mlflow_model"}}
    (node,) = props["jobs"].values()
    assert node["componentId"] == "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.57"
    assert node["outputs"]["mlflow_model_folder"]["value"] == "${{parent.outputs.trained_model}}"
    inputs = {k: v.get("value", v.get("uri")) for k, v in node["inputs"].items()}
    store = f"azureml://datastores/tunedrop/paths/{run.run_id}"
    assert inputs == {
        "mlflow_model_path": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15",
        "compute_model_import": "gpu-a100", "compute_preprocess": "gpu-a100", "compute_finetune": "gpu-a100",
        "compute_model_evaluation": "gpu-a100",
        "train_file_path": f"{store}/train.jsonl", "test_file_path": f"{store}/test.jsonl",
        "number_of_gpu_to_use_finetuning": "1",
        # The seed's parameters, then Phi-3's model_specific_defaults (num_train_epochs 1, save_total_limit 1,
        # ...); the defaults the component takes no input for (precision, logging_steps, ...) are left out.
        "num_train_epochs": "1", "per_device_train_batch_size": "1", "per_device_eval_batch_size": "1",
        "learning_rate": "5e-06", "lr_scheduler_type": "cosine", "gradient_accumulation_steps": "1",
        "save_total_limit": "1", "apply_lora": "true", "apply_deepspeed": "true", "deepspeed_stage": "2",
    }
    # The split: every example once, deterministic, in the data container the datastore points at.
    data = default_storage().blob_service.get_container_client(settings.azureml_data_container)
    train = data.download_blob(f"{run.run_id}/train.jsonl").readall().splitlines()
    test = data.download_blob(f"{run.run_id}/test.jsonl").readall().splitlines()
    assert test and sorted(train + test) == sorted(dataset().splitlines())


@pytest.mark.parametrize("n, test_fraction, seed", [(50, 0.1, 42), (7, 0.5, 3), (2, 0.01, 1), (1, 0.3, 9)])
def test_both_backends_split_a_dataset_identically(backend, transport, settings, tmp_path, n, test_fraction, seed):
    from shared.backends.local.examples import parse_dataset
    from shared.split import split_examples

    run = stored_run(settings)
    container = default_storage().blob_service.get_container_client(settings.training_container)
    etag = container.upload_blob("chat.jsonl", dataset(n), overwrite=True).get_blob_properties().etag
    run = Run(run.run_id, dataset_container=run.dataset_container, dataset_blob="chat.jsonl", dataset_etag=etag,
              base_model=MODEL, created_at=run.created_at)
    config = TrainingConfig().with_overrides({"test_fraction": test_fraction, "seed": seed})
    backend.write_split(run, config)
    data = default_storage().blob_service.get_container_client(settings.azureml_data_container)

    def written(side):
        try:
            return [json.loads(line)["messages"] for line in data.download_blob(f"{run.run_id}/{side}.jsonl").readall()
                    .splitlines()]
        except Exception:  # noqa: BLE001 - an empty side is not written
            return []
    on_azure = (written("train"), written("test"))
    (tmp_path / "chat.jsonl").write_bytes(dataset(n))
    local = split_examples(parse_dataset(tmp_path / "chat.jsonl", "jsonl"), test_fraction, seed)
    assert on_azure == local
    assert sorted(map(json.dumps, local[0] + local[1])) == sorted(
        json.dumps(json.loads(line)["messages"]) for line in dataset(n).splitlines())
    assert (len(local[1]) > 0) == (n >= 2)  # a test example whenever there are two or more


def test_a_repeated_submit_finds_the_job_instead_of_making_a_second(backend, transport, settings):
    run = stored_run(settings)
    transport.on("GET", rf"{ARM}/jobs/tunedrop-{run.run_id}\?", job(f"tunedrop-{run.run_id}", "Running"))
    assert backend.submit_finetune(run, TrainingConfig()) == f"tunedrop-{run.run_id}"
    assert transport.calls("PUT", r"/jobs/") == []


def test_parameters_merge_seed_then_model_defaults_then_run_overrides():
    tags = {"model_specific_defaults": "{'apply_deepspeed': 'false', 'learning_rate': 1e-4, 'precision': '16'}"}
    params = finetune_parameters(TrainingConfig().with_overrides({"num_train_epochs": 1, "learning_rate": 2e-5}), tags)
    assert params == {"num_train_epochs": 1, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
                      "learning_rate": 2e-5, "lr_scheduler_type": "cosine", "apply_lora": "true",
                      "apply_deepspeed": "false", "deepspeed_stage": 2, "precision": "16"}
    assert seed_display_name(MODEL, {**params, "max_seq_length": 512}, 4) == \
        f"{MODEL}-ultrachat-bs4-cosine-nods-lora-save_limit-1-seqlen512"


@pytest.mark.parametrize("tags, size, state, code", [
    (None, "STANDARD_NC24ADS_A100_V4", "Succeeded", None),                       # allowed by the tag
    (None, "Standard_NC6s_v3", "Succeeded", "compute_not_allowed"),              # not in the allow list
    (None, "STANDARD_NC24ADS_A100_V4", "Failed", "compute_failed"),              # failed cluster
    ({"task": "chat-completion"}, "Standard_NC6", "Succeeded", "compute_not_supported"),  # no tag: deny list
    ({"task": "chat-completion"}, "Standard_NC6s_v3", "Succeeded", None),        # no tag, not denied
    ({"task": "chat-completion"}, "Standard_D4s_v3", "Succeeded", "compute_no_gpus"),
])
def test_compute_checks_as_the_seed(backend, transport, tags, size, state, code):
    transport.on("GET", rf"/models/{MODEL}/versions/15\?", registry_model(tags))
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", compute(size, state))
    model = backend.foundation_model()
    if code is None:
        assert backend.check_compute(model) == ("gpu-a100", 1)
        return
    with pytest.raises(BackendError) as caught:
        backend.check_compute(model)
    assert caught.value.code == code and not caught.value.retryable
    assert "TUNEDROP_AZUREML_FINETUNE_COMPUTE" in str(caught.value)


@pytest.mark.parametrize("size, setting, gpus", [
    ("STANDARD_NC96ADS_A100_V4", 0, 4),  # from the table, whatever the casing
    ("Standard_ND96amsr_A100_v4", 0, 8),
    ("Standard_NC48ads_A100_v4", 3, 3),  # the setting wins
])
def test_gpus_per_node_come_from_the_size_table_never_from_a_subscription_wide_call(backend, transport, settings,
                                                                                     size, setting, gpus):
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", compute(size))
    backend.settings = dataclasses.replace(settings, azureml_gpus_per_node=setting)
    assert backend.check_compute(backend.foundation_model()) == ("gpu-a100", gpus)
    # The seed's compute.list_sizes() reads /subscriptions/{id}/providers/.../locations/{region}/vmSizes,
    # which the app's workspace-scoped roles do not reach (tests/test_permissions.py).
    assert transport.calls("GET", r"/vmSizes") == []


def test_a_size_the_table_lacks_names_the_setting_that_fixes_it(backend, transport):
    transport.on("GET", rf"/models/{MODEL}/versions/15\?", registry_model({"task": "chat-completion"}))
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", compute("Standard_NC999_future_v9"))
    with pytest.raises(BackendError) as caught:
        backend.check_compute(backend.foundation_model())
    assert caught.value.code == "compute_no_gpus" and "TUNEDROP_AZUREML_GPUS_PER_NODE" in str(caught.value)


def test_the_default_deployment_size_is_current_and_allowed_for_phi3(settings):
    from shared.backends.gpu_sizes import gpus_per_node

    default = Settings().azureml_instance_type
    assert default in PHI3_INFERENCE and gpus_per_node(default) >= 1
    retired = ("standard_nc6s_v3", "standard_nc12s_v3", "standard_nc24s_v3", "standard_nc24rs_v3")  # NCv3, 2025-09-30
    assert default.lower() not in retired


def test_a_deployment_size_the_model_does_not_allow_fails_the_dataset_before_any_job(backend, transport, settings):
    backend.settings = dataclasses.replace(settings, azureml_instance_type="Standard_NC4as_T4_v3")
    run = stored_run(settings)
    with pytest.raises(BackendError) as caught:
        backend.submit_finetune(run, TrainingConfig())
    assert caught.value.code == "instance_type_not_allowed" and not caught.value.retryable
    message = str(caught.value)
    assert "Standard_NC4as_T4_v3" in message and all(size in message for size in PHI3_INFERENCE)
    assert transport.calls("PUT", r"/jobs/") == []  # no GPU time spent
    # The registry moved the lists to system metadata (azureml-assets #5150): read there too.
    from azure.ai.ml.entities import Model

    as_entity = Model(name=MODEL, version="15", path="azureml://x", system_metadata={
        "supportedComputes": {"inferenceComputes": PHI3_INFERENCE, "finetuneComputes": PHI3_FINETUNE}})
    with pytest.raises(BackendError) as moved:
        backend.check_instance_type(as_entity)
    assert moved.value.code == "instance_type_not_allowed"
    backend.check_instance_type(Model(name=MODEL, version="15", path="azureml://x"))  # no list anywhere: as the seed


def test_a_missing_datastore_fails_the_dataset_at_once_with_the_fix(backend, transport, settings):
    transport.on("GET", rf"{ARM}/datastores/tunedrop\?", recorded_not_found())
    with pytest.raises(BackendError) as caught:
        backend.submit_finetune(stored_run(settings), TrainingConfig())
    assert caught.value.code == "datastore_missing" and "azd provision" in str(caught.value)
    assert transport.calls("PUT", r"/jobs/") == []


def test_a_missing_cluster_and_throttling_are_told_apart(backend, transport):
    model = backend.foundation_model()
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", error(404, "ResourceNotFound"))
    with pytest.raises(BackendError) as missing:
        backend.check_compute(model)
    assert missing.value.code == "not_found" and not missing.value.retryable
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", (429, {"error": {"code": "TooManyRequests", "message": "slow"}},
                                                         {"Retry-After": "0"}))
    with pytest.raises(BackendError) as throttled:
        backend.check_compute(model)
    assert throttled.value.retryable


def test_ingest_fails_the_run_with_the_compute_fix_instead_of_raising(backend, transport, settings):
    transport.on("GET", rf"{ARM}/computes/gpu-a100\?", compute(state="Failed"))
    container = default_storage().blob_service.get_container_client(settings.training_container)
    container.create_container()
    container.upload_blob("chat.jsonl", dataset())
    pipeline = Pipeline(settings, backend=backend)
    run = pipeline.ingest(container.get_blob_client("chat.jsonl"))
    assert run.state == runs.FAILED and "Cluster gpu-a100 is in state Failed" in run.error
    assert transport.calls("PUT", r"/jobs/") == []


# ---- job events -> register -> begin deploy -------------------------------------------------------------


def grid(status: str, job_name: str, run_id: str, topic: str = WSID) -> RunEvent:
    raw = run_event(status=status, topic=topic, job_name=job_name, experiment_name=f"chat_completion_{MODEL}",
                    run_tags={RUN_ID_TAG: run_id})
    return RunEvent(raw["id"], raw["eventType"], raw["topic"], raw["subject"], raw["data"])


def submitted(pipeline: Pipeline, settings) -> Run:
    run, _ = pipeline.store.create(stored_run(settings, job_name="tunedrop-chat-0123456789ab"))
    pipeline.store.transition(run.run_id, runs.VALIDATING)
    return pipeline.store.transition(run.run_id, runs.SUBMITTED)


def test_completion_event_registers_once_and_starts_the_endpoint(backend, transport, settings):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    job_name = run.job_name
    transport.on("GET", rf"{ARM}/jobs/{job_name}\?", job(job_name, "Completed"))
    mlflow_routes(transport, job_name)
    ep = endpoint_name_for(run.run_id)
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "PUT", 201,
                                                                 rename={RECORDED_ENDPOINT: ep}))

    # A child step's completion and an unrelated job's change nothing.
    assert pipeline.on_run_event(grid("Completed", "ft-step", run.run_id)) is None
    assert pipeline.on_run_event(grid("Completed", "someone-elses-job", "not-a-run")) is None
    assert transport.calls("PUT", r"/models/") == []

    done = pipeline.on_run_event(grid("Completed", job_name, run.run_id))
    assert done.state == runs.DEPLOYING and done.endpoint_name == ep
    assert done.metrics == {"finetune/train_loss": 1.25, "model_evaluation/perplexity": 3.5}
    ((_, url, body),) = transport.calls("PUT", r"/models/")
    assert url.split("?")[0].endswith(f"/models/{MODEL}-ultrachat-200k/versions/20240501100000123456")
    assert body["properties"]["modelType"] == "mlflow_model"
    assert body["properties"]["modelUri"] == f"azureml://jobs/{job_name}/outputs/trained_model"
    assert body["properties"]["tags"][RUN_ID_TAG] == run.run_id and job_name in body["properties"]["description"]
    ((_, _, ep_body),) = transport.calls("PUT", r"/onlineEndpoints/")
    assert ep_body["properties"]["authMode"] == "Key"
    assert ep_body["tags"]["model_version"] == "20240501100000123456"

    # The same event again (Event Grid: at least once): the version is found, nothing new is made.
    transport.on("GET", rf"{ARM}/models/{MODEL}-ultrachat-200k/versions/20240501100000123456\?", put_echo()(
        type("R", (), {"url": "https://management.azure.com" + WSID +
                              f"/models/{MODEL}-ultrachat-200k/versions/20240501100000123456"})(),
        json.loads(json.dumps(body)))[1])
    assert backend.register_model(done) == ModelRef(f"{MODEL}-ultrachat-200k", "20240501100000123456")
    assert len(transport.calls("PUT", r"/models/")) == 1
    assert pipeline.on_run_event(grid("Completed", job_name, run.run_id)).state == runs.DEPLOYING


def test_failed_job_fails_the_run_with_the_reason_from_the_job(backend, transport, settings):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    transport.on("GET", rf"{ARM}/jobs/{run.job_name}\?", job(run.job_name, "Failed"))
    transport.on("GET", rf"/history/v1.0/.*/runs/{run.job_name}$", {"runId": run.job_name, "status": "Failed", "error": {
        "error": {"code": "UserError", "message": "CUDA out of memory in finetune"}}})
    failed = pipeline.on_run_event(grid("Failed", run.job_name, run.run_id))
    assert failed.state == runs.FAILED and "CUDA out of memory in finetune" in failed.error


# ---- sweeper: deployment state, errors, traffic, delete ---------------------------------------------------


def test_the_deployment_starts_when_the_endpoint_is_ready_and_traffic_follows(backend, transport):
    ep = "td-chat-0123456789"
    tags = {RUN_ID_TAG: "r", "model_name": "m", "model_version": "1"}
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, "Creating", tags))
    assert backend.get_deployment(ep).state == DEPLOY_CREATING
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, "Succeeded", tags))
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments\?", {"value": []})
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", recorded_deployment_put(ep))
    assert backend.get_deployment(ep).state == DEPLOY_CREATING
    ((_, _, body),) = transport.calls("PUT", r"/deployments/demo")
    props = body["properties"]
    assert props["instanceType"] == "Standard_NC24ads_A100_v4" and body["sku"]["capacity"] == 1
    assert props["model"] == f"{WSID}/models/m/versions/1"
    assert props["livenessProbe"]["initialDelay"] == "PT10M" and props["requestSettings"]["requestTimeout"] == "PT1M30S"
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", deployment(ep, "Succeeded"))
    assert backend.get_deployment(ep).state == DEPLOY_READY
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "PUT", 201,
                                                                 rename={RECORDED_ENDPOINT: ep}))
    backend.activate(ep)
    assert transport.calls("PUT", rf"/onlineEndpoints/{ep}\?")[-1][2]["properties"]["traffic"] == {"demo": 100}
    transport.on("DELETE", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "DELETE", 202,
                                                                    rename={RECORDED_ENDPOINT: ep}))
    backend.delete_endpoint(ep)
    assert transport.calls("DELETE", rf"/onlineEndpoints/{ep}\?")
    transport.on("DELETE", rf"{ARM}/onlineEndpoints/{ep}\?", recorded_not_found())
    backend.delete_endpoint(ep)  # already gone: not an error


@pytest.mark.parametrize("code, fix", [
    ("OutOfQuota", "request more quota"),
    ("BadArgument", "TUNEDROP_AZUREML_INSTANCE_TYPE"),
    ("OutOfCapacity", "retry the run later"),
    ("ResourceNotReady", "get-logs"),
])
@pytest.mark.parametrize("when", ["at_put", "while_provisioning"])
def test_each_deployment_error_is_mapped_to_its_fix(backend, transport, code, fix, when):
    ep = "td-chat-0123456789"
    tags = {RUN_ID_TAG: "r", "model_name": "m", "model_version": "1"}
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, "Succeeded", tags))
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments\?", {"value": []})
    message = f"{code}: details from Azure ML"
    if when == "at_put":
        transport.on("PUT", r"/deployments/demo\?", error(400, code, message))
    else:
        # The recorded PUT's Azure-AsyncOperation URL is where the operation's error will be.
        transport.on("PUT", r"/deployments/demo\?", recorded_deployment_put(ep))
        status = r"/mfeOperationsStatus/odidp:5881e5dc"
        transport.on("GET", status, recorded("online_deployment", "GET", 200, status))  # "Updating"
        assert backend.get_deployment(ep).state == DEPLOY_CREATING
        transport.on("GET", status, recorded("online_deployment", "GET", 200, status, edit=lambda b: b.update(
            status="Failed", error={"code": code, "message": message})))
        transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", deployment(ep, "Failed"))
    info = backend.get_deployment(ep)
    assert info.state == DEPLOY_FAILED and info.error_code == code
    assert fix in info.error and message in info.error


def test_a_forbidden_operation_status_still_fails_the_deployment_clearly(backend, transport):
    """The async-operation URL sits at subscription scope, which the app's roles may not reach
    (tests/test_permissions.py): its error text is a bonus, never a condition."""
    ep = "td-chat-0123456789"
    tags = {RUN_ID_TAG: "r", "model_name": "m", "model_version": "1"}
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep, "Succeeded", tags))
    transport.on("PUT", r"/deployments/demo\?", recorded_deployment_put(ep))
    assert backend.get_deployment(ep).state == DEPLOY_CREATING
    transport.on("GET", r"/mfeOperationsStatus/", error(403, "AuthorizationFailed", "no access at subscription scope"))
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments/demo\?", deployment(ep, "Failed"))
    info = backend.get_deployment(ep)
    assert info.state == DEPLOY_FAILED and info.error_code == "deployment_failed"
    assert info.error.startswith(f"Deployment demo on endpoint {ep} failed (unknown error)")


# ---- score ----------------------------------------------------------------------------------------------


def test_scoring_target_uses_the_key_cached_with_an_expiry(backend, transport):
    ep = "td-chat-0123456789"
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep))
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}/deployments\?", {"value": []})
    transport.on("POST", rf"{ARM}/onlineEndpoints/{ep}/listKeys\?", recorded("online_endpoint", "POST", 200, r"/listKeys$",
                                                                            edit=lambda b: b.update(primaryKey="k-primary")))
    target = backend.scoring_target(ep)
    assert target.url == f"https://{ep}.westus.inference.ml.azure.com/score" and target.key == "k-primary"
    assert target.headers == {"azureml-model-deployment": "demo"} and "k-primary" not in repr(target)
    backend.scoring_target(ep)
    assert len(transport.calls("POST", r"/listKeys")) == 1
    backend._keys[ep] = (0.0, target)  # expired
    backend.scoring_target(ep)
    assert len(transport.calls("POST", r"/listKeys")) == 2


def test_score_sends_the_seed_request_with_the_key_and_maps_endpoint_failures(backend, transport, settings):
    import httpx

    from shared.scoring import Scorer

    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    for state in (runs.SUCCEEDED, runs.REGISTERED):
        pipeline.store.transition(run.run_id, state)
    ep = endpoint_name_for(run.run_id)
    pipeline.store.transition(run.run_id, runs.DEPLOYING, endpoint_name=ep)
    pipeline.store.transition(run.run_id, runs.DEPLOYED)
    transport.on("GET", rf"{ARM}/onlineEndpoints/{ep}\?", endpoint(ep))
    transport.on("POST", rf"{ARM}/onlineEndpoints/{ep}/listKeys\?", recorded("online_endpoint", "POST", 200, r"/listKeys$",
                                                                            edit=lambda b: b.update(primaryKey="k-primary")))
    seen, answers = [], [httpx.Response(200, json={"output": "Oslo."})]

    def endpoint_app(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    scorer = Scorer(pipeline)
    scorer._client = httpx.Client(transport=httpx.MockTransport(endpoint_app))
    body = json.dumps({"messages": [{"role": "user", "content": "Capital of Norway?"}], "max_tokens": 50}).encode()
    reply = scorer.chat(body, run.run_id)
    assert reply.status == 200 and reply.body["choices"][0]["message"]["content"] == "Oslo."
    (request,) = seen
    assert str(request.url) == f"https://{ep}.westus.inference.ml.azure.com/score"
    assert request.headers["authorization"] == "Bearer k-primary"
    assert request.headers["azureml-model-deployment"] == "demo"
    assert json.loads(request.content) == {"input_data": {
        "input_string": [[{"role": "user", "content": "Capital of Norway?"}]],
        "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 50}}, "params": {}}
    # An Azure ML endpoint answers whole: a stream is that answer as one chunk; a stop sequence is cut here;
    # a seed it cannot take is refused by name, before any call.
    answers[:] = [httpx.Response(200, json={"output": "Oslo. It is in Norway."})]
    streamed = scorer.chat(json.dumps({**json.loads(body), "stream": True, "stop": ". It"}).encode(), run.run_id)
    events = b"".join(streamed).decode().split("\n\n")
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert events[-2:] == ["data: [DONE]", ""] and [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Oslo", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    seeded = scorer.chat(json.dumps({**json.loads(body), "seed": 1}).encode(), run.run_id)
    assert seeded.status == 400 and seeded.body["error"]["param"] == "seed" and len(seen) == 2
    answers[:] = [httpx.Response(429, headers={"Retry-After": "7"}), httpx.Response(503),
                  httpx.ReadTimeout("slow"), httpx.Response(500)]
    got = [scorer.chat(body, run.run_id) for _ in range(4)]
    assert [(r.status, r.headers.get("Retry-After")) for r in got] == [(429, "7"), (503, "10"), (504, "10"), (502, "10")]
    assert [r.body["error"]["type"] for r in got] == ["rate_limit_error"] + ["server_error"] * 3  # OpenAI's shape
    assert len(transport.calls("POST", r"/listKeys")) == 1  # the key is cached
    # A connection that breaks before any answer (a stale keep-alive) is tried once more; twice is 503.
    answers[:] = [httpx.ReadError("connection reset"), httpx.Response(200, json={"output": "Oslo."}),
                  httpx.ConnectError("refused"), httpx.ConnectError("refused")]
    assert scorer.chat(body, run.run_id).status == 200
    assert scorer.chat(body, run.run_id).status == 503 and answers == []


# ---- the real thing (opt-in) -----------------------------------------------------------------------------

LIVE = (os.environ.get("TUNEDROP_AZUREML_LIVE") == "1"
        and os.environ.get("TUNEDROP_WORKSPACE_ID", "").startswith("/subscriptions/"))


@pytest.mark.skipif(not LIVE, reason="live Azure ML test: set TUNEDROP_AZUREML_LIVE=1, TUNEDROP_WORKSPACE_ID, "
                    "TUNEDROP_AZUREML_FINETUNE_COMPUTE and TUNEDROP_STORAGE__* of a real workspace (costs GPU hours)")
def test_live_whole_chain_on_a_real_workspace(storage_env):  # pragma: no cover - needs Azure
    import time

    settings = Settings.from_env({**os.environ, "TUNEDROP_BACKEND": "azureml"})
    pipeline = Pipeline(settings)
    container = default_storage().ensure_container(settings.training_container)
    container.upload_blob("live.jsonl", dataset(40), overwrite=True,
                          metadata={"tunedrop_num_train_epochs": "1", "tunedrop_max_steps": "5"})
    run = pipeline.ingest(container.get_blob_client("live.jsonl"))
    assert run.state == runs.SUBMITTED, run.error
    deadline = time.time() + 4 * 3600
    while time.time() < deadline:
        run = pipeline.store.get(run.run_id)
        if run.state in (runs.DEPLOYED, runs.FAILED):
            break
        pipeline.sweep()  # finds the job's end without Event Grid, then registers, deploys, activates
        time.sleep(60)
    assert run.state == runs.DEPLOYED, run.error
    from shared.scoring import Scorer

    body = json.dumps({"input_data": {"input_string": [{"role": "user", "content": "What is the capital of Norway?"}],
                                      "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                                                     "max_new_tokens": 200}}, "params": {}}).encode()
    answer = Scorer(pipeline).score(run.run_id, body)
    pipeline.backend.delete_endpoint(run.endpoint_name)
    assert answer.status == 200, answer.body


def test_the_handlers_get_the_azureml_backend_from_the_settings_without_touching_azure(storage_env, monkeypatch):
    from shared.pipeline import get_pipeline

    monkeypatch.setenv("TUNEDROP_BACKEND", "azureml")
    monkeypatch.setenv("TUNEDROP_WORKSPACE_ID", WSID)
    backend = get_pipeline().backend
    assert isinstance(backend, AzureMLBackend) and backend.name == "azureml"
    assert (backend.subscription_id, backend.resource_group, backend.workspace_name) == \
        ("00000000-0000-0000-0000-000000000", "00000", "00000")
    assert backend._clients == {}  # clients are made on first use, never at start-up
    monkeypatch.setenv("TUNEDROP_WORKSPACE_ID", "/subscriptions/x/resourceGroups/y")
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="TUNEDROP_WORKSPACE_ID"):
        Settings.from_env()


def test_a_pair_is_copied_as_given_and_any_format_reaches_the_pipeline_as_chat_jsonl(backend, transport, settings):
    import gzip

    run = stored_run(settings)
    container = default_storage().blob_service.get_container_client(settings.training_container)
    test_etag = container.upload_blob("chat.test.jsonl.gz", gzip.compress(dataset(3)), overwrite=True) \
        .get_blob_properties().etag
    paired = Run(run.run_id, dataset_container=run.dataset_container, dataset_blob=run.dataset_blob,
                 dataset_etag=run.dataset_etag, test_blob="chat.test.jsonl.gz", test_etag=test_etag,
                 base_model=MODEL, created_at=run.created_at)
    backend.submit_finetune(paired, TrainingConfig())
    data = default_storage().blob_service.get_container_client(settings.azureml_data_container)
    train = data.download_blob(f"{run.run_id}/train.jsonl").readall()
    test = data.download_blob(f"{run.run_id}/test.jsonl").readall()
    assert train.splitlines() == dataset().splitlines()  # all of it, in order: nothing split off
    assert test.splitlines() == dataset(3).splitlines()  # decompressed, one chat row per line


def test_a_per_run_base_model_is_looked_up_in_the_registry(backend, transport):
    backend.check_base_model(MODEL)  # in the registry: fine
    transport.on("GET", r"/registries/azureml/models/Phi-9\b", error(404, "ResourceNotFound"))
    with pytest.raises(BackendError) as caught:
        backend.check_base_model("Phi-9")
    assert caught.value.code == "unknown_base_model" and not caught.value.retryable
    assert "Phi-9" in str(caught.value) and "set base_model" in str(caught.value)


# ---- Microsoft's published run events (tests/data/eventgrid/, as published) ------------------------------

EVENTS = Path(__file__).parent / "data" / "eventgrid"


def published(sample: str, job_name: str, pascal_case: bool = False) -> RunEvent:
    """Microsoft's sample event as published, sent by this workspace about ``job_name``: only the
    topic's placeholders and the job's name are filled in; runTags stays as published ({})."""
    (event,) = json.loads((EVENTS / f"{sample}.eventgrid.json").read_text())
    event["topic"] = WSID
    recorded_job = event["data"]["runId"]
    event["subject"] = event["subject"].replace(recorded_job, job_name)
    event["data"]["runId"] = job_name
    if pascal_case:  # as Microsoft's Azure/aml-function fixture spells them (RunTags, RunStatus, ...)
        event["data"] = {key[0].upper() + key[1:]: value for key, value in event["data"].items()}
    return RunEvent.from_json(json.dumps(event))


@pytest.mark.parametrize("pascal_case", [False, True])
def test_microsofts_published_failed_event_fails_the_run_without_tags_or_capitals(backend, transport, settings,
                                                                                   pascal_case):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    event = published("run-status-changed", run.job_name, pascal_case)
    assert event.run_tags == {} and event.data.get("runStatus", event.data.get("RunStatus")) == "failed"
    transport.on("GET", rf"{ARM}/jobs/{run.job_name}\?", job(run.job_name, "Failed"))
    failed = pipeline.on_run_event(event)
    assert failed is not None and failed.state == runs.FAILED and failed.error
    pipeline.on_run_event(event)  # delivered again: nothing changes
    assert pipeline.store.get(run.run_id).updated_at == failed.updated_at


def test_microsofts_published_completed_event_finds_its_run_by_the_job_name(backend, transport, settings):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    transport.on("GET", rf"{ARM}/jobs/{run.job_name}\?", job(run.job_name, "Completed"))
    mlflow_routes(transport, run.job_name)
    ep = endpoint_name_for(run.run_id)
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "PUT", 201,
                                                                 rename={RECORDED_ENDPOINT: ep}))
    done = pipeline.on_run_event(published("run-completed", run.job_name))
    assert done.state == runs.DEPLOYING and done.model_version


def test_published_events_of_child_steps_other_tries_and_lookalike_jobs_change_nothing(backend, transport, settings):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    transport.on("GET", rf"{ARM}/jobs/", job("x", "Failed"))
    child = published("run-status-changed", "AutoML_ad912b2d-6467-4f32-a616-dbe4af6dd8fc_5")
    tagged_child = RunEvent(child.id, child.event_type, child.topic, child.subject,
                            {**child.data, "runTags": {RUN_ID_TAG: run.run_id}})  # a step carrying its parent's tag
    lookalikes = [f"{run.job_name}-r1", f"{run.job_name}-r01", f"{run.job_name}x", f"x{run.job_name}",
                  run.job_name.upper(), "tunedrop-"]
    for event in [child, tagged_child, *(published("run-status-changed", name) for name in lookalikes)]:
        assert pipeline.on_run_event(event) is None, event.run_id
    assert pipeline.store.get(run.run_id).state == runs.SUBMITTED
    assert transport.calls("GET", r"/jobs/") == []


def test_a_retried_run_takes_events_of_its_new_job_only(backend, transport, settings):
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    retried = pipeline.store.update(run.run_id, job_name=f"{run.job_name}-r2")
    transport.on("GET", rf"{ARM}/jobs/", job(retried.job_name, "Failed"))
    assert pipeline.on_run_event(published("run-status-changed", run.job_name)) is None  # the first try's job
    assert pipeline.on_run_event(published("run-status-changed", retried.job_name)).state == runs.FAILED


def test_a_sleeping_run_wakes_into_a_new_endpoint_of_its_own(backend, transport, settings):
    """A torn-down run is woken (a score, `deploy`): a new cycle, under an endpoint name of its own, as Azure ML's
    recorded endpoint creation answers; a second wake of the same cycle makes nothing more."""
    pipeline = Pipeline(settings, backend=backend)
    run = submitted(pipeline, settings)
    for step in (runs.SUCCEEDED, runs.REGISTERED, runs.DEPLOYING, runs.DEPLOYED, runs.TORN_DOWN):
        pipeline.store.transition(run.run_id, step, model_name=f"{MODEL}-ultrachat-200k", model_version="1",
                                  endpoint_name=endpoint_name_for(run.run_id))
    ep = endpoint_name_for(run.run_id, 1)
    assert ep != endpoint_name_for(run.run_id) and len(ep) <= 32
    transport.on("PUT", rf"{ARM}/onlineEndpoints/{ep}\?", recorded("online_endpoint", "PUT", 201,
                                                                 rename={RECORDED_ENDPOINT: ep}))
    woken = pipeline.wake(run.run_id, "score")
    assert (woken.state, woken.cycle, woken.endpoint_name) == (runs.DEPLOYING, 1, ep)
    ((_, url, body),) = transport.calls("PUT", r"/onlineEndpoints/")
    assert f"/onlineEndpoints/{ep}?" in url and body["tags"]["model_version"] == "1"
    assert pipeline.wake(run.run_id, "score").cycle == 1  # deploying already: no second endpoint
    assert len(transport.calls("PUT", r"/onlineEndpoints/")) == 1
