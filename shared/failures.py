"""Why a run failed or was refused: every `code` a run can end with, beside the dataset fault codes.

A rejected dataset's report carries the dataset codes (shared/validation.py, docs/dataset-faults.md)
or one of the rejection codes here; a failed run's `error_code` and its `run.failed` webhook's `code`
carry one of the failure codes here. `docs/run-failures.md` is generated from this module, and a test
finds every code the code raises (`code=`, `error_code=`, `_fail(...)`) in :data:`ALL_CODES`.

Two families pass Azure's own words through and are listed by pattern: Azure ML's deployment error
codes (`OutOfQuota`, `OutOfCapacity`, `ResourceNotReady`, `BadArgument`, ...; the fix for the known
ones is in shared/backends/azureml/errors.py) and `http_<status>` for an Azure answer without a code.
"""

from __future__ import annotations

from shared.status import ENDED_BADLY

#: Codes that refuse a dataset whose content is fine (its report says which).
REJECTIONS: dict[str, str] = {
    "duplicate_dataset": "The same bytes with the same training parameters as an earlier run that did not fail: "
                         "nothing new to train. Set blob metadata `tunedrop_force=true` to train it again.",
    "bad_blob_name": "The blob's name has a control or invisible character, a backslash or a `.`/`..` path segment, or is "
                     "over TUNEDROP_MAX_BLOB_NAME_CHARS: it is not read, only quarantined under a safe name. Upload "
                     "the dataset again under a plain name.",
}

#: Codes a run fails with, by where it was.
FAILURES: dict[str, str] = {
    # while validating
    "superseded": "The dataset was overwritten or deleted before validation finished; its new version is a new run.",
    "missing_test_file": "A train half waited an hour for its test half: upload it (the pair's run starts then), or "
                         "upload the dataset as one file to have it split.",
    # the job
    "job_failed": "The fine-tune job failed; the run's error has the job's own reason.",
    "job_canceled": "The fine-tune job was canceled.",
    "job_notfound": "The fine-tune job no longer exists in the workspace.",
    "job_timeout": "The job was still queued or running after TUNEDROP_JOB_TIMEOUT_MINUTES; it was canceled.",
    "job_not_completed": "Local backend: registration was asked of a job that did not complete.",
    # checks before a job is submitted (Azure ML)
    "compute_failed": "The fine-tune cluster is in state Failed: recreate it or set TUNEDROP_AZUREML_FINETUNE_COMPUTE.",
    "compute_not_allowed": "The cluster's VM size is not in the model's finetune_compute_allow_list.",
    "compute_not_supported": "The cluster's VM size is one the seed refuses for fine-tuning (NC, NC12, NC24, NC24r).",
    "compute_no_gpus": "The cluster's VM size is not in tunedrop's GPU size table: set TUNEDROP_AZUREML_GPUS_PER_NODE.",
    "instance_type_not_allowed": "TUNEDROP_AZUREML_INSTANCE_TYPE is not in the model's inference_compute_allow_list "
                                 "(the error names the allowed sizes).",
    "datastore_missing": "The datastore the job reads through (TUNEDROP_AZUREML_DATASTORE) does not exist: run "
                         "`azd provision`.",
    "bad_model_tag": "A tag of the foundation model (an allow list, model_specific_defaults) cannot be read.",
    "unknown_base_model": "base_model names no model of the registry (Azure ML) or no local model.",
    "not_found": "An Azure ML resource the step needs does not exist (the message names it).",
    # registration and deployment
    "model_version_conflict": "The model version this run registers already belongs to another run: set "
                              "TUNEDROP_MODEL_NAME.",
    "foreign_endpoint": "The run's endpoint exists but was not made by tunedrop (it has no model_name tag).",
    "endpoint_failed": "The online endpoint ended Failed or Canceled.",
    "endpoint_missing": "The run's endpoint no longer exists.",
    "endpoint_auth": "The endpoint does not use key auth, so tunedrop cannot score it.",
    "deployment_failed": "The deployment failed without a code of Azure's.",
    "deploy_timeout": "The deployment was not ready after TUNEDROP_DEPLOY_TIMEOUT_MINUTES; its endpoint was deleted.",
    "ServerFailed": "Local backend: the model server could not load the model (its error is in the run).",
    "ServerExited": "Local backend: the model server exited; see its server.log.",
    # Azure refusing or not answering
    "auth_failed": "Azure refused the app's credential (the message says which role to grant).",
    "forbidden": "Azure refused the call: the app's identity lacks a role (see infra/README.md, Roles).",
    "throttled": "Azure answered 429; the step is retried.",
    "azure_unavailable": "Azure answered 5xx; the step is retried.",
    "unreachable": "Azure did not answer; the step is retried.",
    "bad_setting": "A setting has a value tunedrop cannot use (the message names it).",
}

#: Codes a local model server answers a scoring request with, in `{"error": ..., "code": ...}` (a request
#: refused or stopped; the run is unaffected). shared/backends/local/server.py.
SERVER_ANSWERS: dict[str, str] = {
    "bad_request": "400: the body is not JSON, or a field is wrong (the error names it).",
    "max_tokens_too_large": "400: max_new_tokens / max_tokens / max_completion_tokens asks for more than "
                            "TUNEDROP_MAX_NEW_TOKENS; it is refused, never clamped.",
    "prompt_too_long": "400: the prompt, in tokens after the chat template, is over the model's context window less "
                       "the tokens asked for, or over TUNEDROP_MAX_PROMPT_TOKENS (the error names both figures); "
                       "refused before any generation.",
    "unauthorized": "401: no or the wrong bearer key.",
    "unknown_route": "404: no such route.",
    "length_required": "411: the request has no Content-Length.",
    "body_too_large": "413: the body is over 1 MB.",
    "server_busy": "429, with Retry-After: TUNEDROP_SERVER_CONCURRENCY requests are generating and "
                   "TUNEDROP_SERVER_QUEUE more waiting.",
    "generation_failed": "500: the model failed (the server log says why).",
    "generation_timeout": "504: the generation ran past TUNEDROP_GENERATION_TIMEOUT_S and was stopped.",
    "client_gone": "Nothing is sent: the client disconnected, so its generation was stopped.",
}

#: The `code` of an error from the OpenAI-compatible API (`/api/v1`, and the per-run alias), in OpenAI's shape
#: `{"error": {"message", "type", "param", "code"}}`; the model server's codes above pass through as they are.
API_ANSWERS: dict[str, str] = {
    "invalid_request": "400: a field of the request is wrong or is not supported (`param` names it; a field "
                       "OpenAI defines but tunedrop cannot honour is refused unless it asks for nothing).",
    "invalid_body": "400 (413 over TUNEDROP_MAX_REQUEST_BYTES): the body is not strict JSON, or nests too deep.",
    "unsupported_parameter": "400: the model's endpoint cannot honour the field (`param`), e.g. `seed` on an Azure "
                             "ML endpoint.",
    "no_api_keys": "401: TUNEDROP_API_KEYS is empty, so no key is accepted; make one with `tunedrop keys new`.",
    "missing_api_key": "401: no `Authorization: Bearer <key>` (or `api-key`) header.",
    "invalid_api_key": "401: the key is not one TUNEDROP_API_KEYS admits.",
    "model_not_found": "404: no fine-tuned model has that id (GET /v1/models lists them) and no run that name.",
    "model_waking": "503, with Retry-After: the model was asleep (its idle endpoint torn down); this request woke "
                    "it and a new endpoint is deploying.",
    "stream_broken": "In a stream, as its last event: the endpoint's stream broke off part-way.",
}

#: Every code this module documents.
ALL_CODES: dict[str, str] = {**REJECTIONS, **FAILURES, **SERVER_ANSWERS, **API_ANSWERS}

#: The job-status failures are named after the status (pipeline: `job_<status>`).
JOB_STATUS_CODES = tuple(f"job_{status.lower()}" for status in ENDED_BADLY)
