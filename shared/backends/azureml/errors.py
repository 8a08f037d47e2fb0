"""Azure's answers as tunedrop's failures: an SDK call's exception as a BackendError with a code
(retryable for throttling, 5xx and no answer), and a failed deployment's Azure ML code as the fix to
make (:data:`DEPLOYMENT_FIXES`), found through the async-operation URL its poller started with.
"""

from __future__ import annotations

from shared.backends.azureml.seed import DEPLOYMENT_NAME
from shared.backends.base import BackendError

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


def call(doing: str, fn, not_found: str | None = None):
    """Run one SDK call; Azure's errors become BackendErrors (retryable: throttling, 5xx, network).

    A ResourceNotFoundError is raised as it is unless ``not_found`` gives the message of its BackendError.
    """
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


def _operation_url(poller) -> str | None:
    """The Azure-AsyncOperation URL of a poller's initial response (where the operation's error will be)."""
    try:
        response = poller.polling_method()._initial_response.http_response  # noqa: SLF001
        headers = response.headers
        return headers.get("Azure-AsyncOperation") or headers.get("Location")
    except Exception:  # noqa: BLE001
        return None
