"""HTTP: score against a run's endpoint (seed format and OpenAI chat completions); read and retry runs.

Whatever a client sends gets a JSON answer: a run id of a shape no run has is 404 before any storage
call, a malformed body 400 (413 over TUNEDROP_MAX_REQUEST_BYTES) naming what and where
(shared/scoring.py, shared/request_json.py), storage trouble 503 with Retry-After, and anything
unforeseen 500 with a JSON error (logged), never an empty body.
"""

import functools
import hashlib
import json
import logging

import azure.functions as func

from shared.coerce import to_bool
from shared.pipeline import CancelError, LifecycleError, RetryError, get_pipeline
from shared.scoring import OPENAI_FORMAT, SEED_FORMAT, ScoreRequestError, check_run_id, get_scorer

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.score")


def _json(status: int, body: dict, headers: dict | None = None) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=status, headers=headers or {}, mimetype="application/json")


def _answers_json(handler):
    """Every answer JSON: a bad run id is 404; storage or an unforeseen error 503/500 with a JSON error."""

    @functools.wraps(handler)
    def wrapper(req: func.HttpRequest) -> func.HttpResponse:
        from azure.core.exceptions import AzureError

        from shared.backends.base import BackendError
        from shared.runs import RunStoreError

        try:
            if "run_id" in req.route_params:
                check_run_id(req.route_params["run_id"])
            return handler(req)
        except ScoreRequestError as exc:
            return _json(exc.status, exc.body())
        except BackendError as exc:  # the backend (Azure ML) refused or did not answer a step asked for
            log.warning("%s: backend: %s (%s)", handler.__name__, exc, exc.code)
            return _json(503 if exc.retryable else 502, {"error": str(exc), "code": exc.code},
                         {"Retry-After": "30"} if exc.retryable else {})
        except (AzureError, RunStoreError) as exc:
            log.warning("%s: storage unavailable: %s", handler.__name__, type(exc).__name__)
            return _json(503, {"error": "The run store is unavailable; try again."}, {"Retry-After": "10"})
        except Exception:
            log.exception("%s failed", handler.__name__)
            return _json(500, {"error": "Internal error; it is in the function's log."})

    return wrapper


def _score(req: func.HttpRequest, fmt: str) -> func.HttpResponse:
    pipeline = get_pipeline()
    result = get_scorer(pipeline).score(req.route_params["run_id"], req.get_body(), fmt)
    return _json(result.status, result.body, result.headers)


@bp.route(route="runs/{run_id}/score", methods=["POST"])
@_answers_json
def score(req: func.HttpRequest) -> func.HttpResponse:
    return _score(req, SEED_FORMAT)


@bp.route(route="runs/{run_id}/v1/chat/completions", methods=["POST"])
@_answers_json
def chat_completions(req: func.HttpRequest) -> func.HttpResponse:
    return _score(req, OPENAI_FORMAT)


@bp.route(route="runs/{run_id}", methods=["GET"])
@_answers_json
def run_status(req: func.HttpRequest) -> func.HttpResponse:
    run = get_pipeline().store.find(req.route_params["run_id"])
    if run is None:
        return _json(404, {"error": f"No run {req.route_params['run_id']}.", "field": "run_id"})
    return _json(200, run.public())


@bp.route(route="runs/{run_id}/retry", methods=["POST"])
@_answers_json
def retry_run(req: func.HttpRequest) -> func.HttpResponse:
    return _run_step(req, lambda pipeline, run_id: pipeline.retry(run_id), 202)


@bp.route(route="runs/{run_id}/cancel", methods=["POST"])
@_answers_json
def cancel_run(req: func.HttpRequest) -> func.HttpResponse:
    return _run_step(req, lambda pipeline, run_id: pipeline.cancel(run_id), 200)


@bp.route(route="runs/{run_id}/deploy", methods=["POST"])
@_answers_json
def deploy_run(req: func.HttpRequest) -> func.HttpResponse:
    """Wake a sleeping run, or (``?force=true``) deploy one the quality gate held back."""
    try:
        force = to_bool(req.params.get("force") or "false")
    except ValueError as exc:
        return _json(400, {"error": f"force: {exc}", "field": "force"})
    return _run_step(req, lambda pipeline, run_id: pipeline.deploy(run_id, force=force, by=_caller(req)))


@bp.route(route="runs/{run_id}/undeploy", methods=["POST"])
@_answers_json
def undeploy_run(req: func.HttpRequest) -> func.HttpResponse:
    return _run_step(req, lambda pipeline, run_id: pipeline.undeploy(run_id))


def _run_step(req: func.HttpRequest, step, status: int | None = None) -> func.HttpResponse:
    """One step asked of a run: 404 for no such run, 409 (the step's own message) where the run's state
    does not allow it; else the run, with ``status``, or 202 while it deploys and 200 otherwise."""
    pipeline = get_pipeline()
    run_id = req.route_params["run_id"]
    if pipeline.store.find(run_id) is None:
        return _json(404, {"error": f"No run {run_id}.", "field": "run_id"})
    try:
        run = step(pipeline, run_id)
    except (RetryError, CancelError, LifecycleError) as exc:
        return _json(409, {"error": str(exc)})
    return _json(status or (202 if run.state == "deploying" else 200), run.public())


def _caller(req: func.HttpRequest) -> str:
    """Who asked, for the record: the function key's fingerprint (the Python worker sees the key, never its
    name; the fingerprint tells keys apart without holding one)."""
    key = req.headers.get("x-functions-key") or req.params.get("code") or ""
    return f"key sha256:{hashlib.sha256(key.encode()).hexdigest()[:12]}" if key else "anonymous"


@bp.route(route="runs", methods=["GET"])
@_answers_json
def list_runs(req: func.HttpRequest) -> func.HttpResponse:
    runs = get_pipeline().store.list()
    return _json(200, {"runs": [r.public() for r in runs]})
