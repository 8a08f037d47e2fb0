"""HTTP: read runs and move them (function key): status, progress, list, retry, cancel, deploy (wake, or force
past the quality gate), undeploy. Every answer is JSON (functions/web.py); a step the run's state does not allow
is 409 with the step's own message."""

import hashlib

import azure.functions as func

from functions.web import Request, Response, answers_json, json_answer, param, run_core
from shared.coerce import to_bool

bp = func.Blueprint()


def _pipeline():
    from shared.pipeline import get_pipeline

    return get_pipeline()


@bp.route(route="runs/{run_id}", methods=["GET"])
@answers_json
async def run_status(req: Request) -> Response:
    run_id = param(req, "run_id")
    run = await run_core(lambda: _pipeline().store.find(run_id))
    if run is None:
        return json_answer(404, {"error": f"No run {run_id}.", "field": "run_id"})
    return json_answer(200, run.public())


@bp.route(route="runs/{run_id}/progress", methods=["GET"])
@answers_json
async def run_progress(req: Request) -> Response:
    """Where the run is: validation's bytes, the job's step, loss curve and time left, the deployment, webhooks."""
    from shared.pipeline.progress import run_progress as progress_of

    run_id = param(req, "run_id")

    def call():
        pipeline = _pipeline()
        run = pipeline.store.find(run_id)
        if run is None:
            return json_answer(404, {"error": f"No run {run_id}.", "field": "run_id"})
        return json_answer(200, progress_of(pipeline, run))

    return await run_core(call)


@bp.route(route="runs", methods=["GET"])
@answers_json
async def list_runs(req: Request) -> Response:
    runs = await run_core(lambda: _pipeline().store.list())
    return json_answer(200, {"runs": [r.public() for r in runs]})


@bp.route(route="runs/{run_id}/retry", methods=["POST"])
@answers_json
async def retry_run(req: Request) -> Response:
    return await _run_step(req, lambda pipeline, run_id: pipeline.retry(run_id), 202)


@bp.route(route="runs/{run_id}/cancel", methods=["POST"])
@answers_json
async def cancel_run(req: Request) -> Response:
    return await _run_step(req, lambda pipeline, run_id: pipeline.cancel(run_id), 200)


@bp.route(route="runs/{run_id}/deploy", methods=["POST"])
@answers_json
async def deploy_run(req: Request) -> Response:
    """Wake a sleeping run, or (``?force=true``) deploy one the quality gate held back."""
    try:
        force = to_bool(req.query_params.get("force") or "false")
    except ValueError as exc:
        return json_answer(400, {"error": f"force: {exc}", "field": "force"})
    by = _caller(req)
    return await _run_step(req, lambda pipeline, run_id: pipeline.deploy(run_id, force=force, by=by))


@bp.route(route="runs/{run_id}/undeploy", methods=["POST"])
@answers_json
async def undeploy_run(req: Request) -> Response:
    return await _run_step(req, lambda pipeline, run_id: pipeline.undeploy(run_id))


async def _run_step(req: Request, step, status: int | None = None) -> Response:
    """One step asked of a run: 404 for no such run, 409 (the step's own message) where the run's state
    does not allow it; else the run, with ``status``, or 202 while it deploys and 200 otherwise."""
    from shared.pipeline import CancelError, LifecycleError, RetryError

    run_id = param(req, "run_id")

    def call():
        pipeline = _pipeline()
        if pipeline.store.find(run_id) is None:
            return json_answer(404, {"error": f"No run {run_id}.", "field": "run_id"})
        try:
            run = step(pipeline, run_id)
        except (RetryError, CancelError, LifecycleError) as exc:
            return json_answer(409, {"error": str(exc)})
        return json_answer(status or (202 if run.state == "deploying" else 200), run.public())

    return await run_core(call)


def _caller(req: Request) -> str:
    """Who asked, for the record: an API key's name (TUNEDROP_API_KEYS), else the function key's fingerprint (the
    Python worker sees the function key, never its name; the fingerprint tells keys apart without holding one)."""
    from shared.api_keys import caller, parse, presented

    named = caller(presented(req.headers), parse(_pipeline().settings.api_keys))
    if named:
        return f"api key {named}"
    key = req.headers.get("x-functions-key") or req.query_params.get("code") or ""
    return f"key sha256:{hashlib.sha256(key.encode()).hexdigest()[:12]}" if key else "anonymous"
