"""HTTP: score against a run's endpoint (seed format and OpenAI chat completions); read and retry runs."""

import json

import azure.functions as func

from shared.pipeline import RetryError, get_pipeline
from shared.scoring import OPENAI_FORMAT, SEED_FORMAT, get_scorer

bp = func.Blueprint()


def _json(status: int, body: dict, headers: dict | None = None) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=status, headers=headers or {}, mimetype="application/json")


def _score(req: func.HttpRequest, fmt: str) -> func.HttpResponse:
    pipeline = get_pipeline()
    result = get_scorer(pipeline).score(req.route_params["run_id"], req.get_body(), fmt)
    return _json(result.status, result.body, result.headers)


@bp.route(route="runs/{run_id}/score", methods=["POST"])
def score(req: func.HttpRequest) -> func.HttpResponse:
    return _score(req, SEED_FORMAT)


@bp.route(route="runs/{run_id}/v1/chat/completions", methods=["POST"])
def chat_completions(req: func.HttpRequest) -> func.HttpResponse:
    return _score(req, OPENAI_FORMAT)


@bp.route(route="runs/{run_id}", methods=["GET"])
def run_status(req: func.HttpRequest) -> func.HttpResponse:
    run = get_pipeline().store.find(req.route_params["run_id"])
    if run is None:
        return _json(404, {"error": f"No run {req.route_params['run_id']}."})
    return _json(200, run.public())


@bp.route(route="runs/{run_id}/retry", methods=["POST"])
def retry_run(req: func.HttpRequest) -> func.HttpResponse:
    pipeline = get_pipeline()
    run_id = req.route_params["run_id"]
    if pipeline.store.find(run_id) is None:
        return _json(404, {"error": f"No run {run_id}."})
    try:
        run = pipeline.retry(run_id)
    except RetryError as exc:
        return _json(409, {"error": str(exc)})
    return _json(202, run.public())


@bp.route(route="runs", methods=["GET"])
def list_runs(req: func.HttpRequest) -> func.HttpResponse:
    runs = get_pipeline().store.list()
    return _json(200, {"runs": [r.public() for r in runs]})
