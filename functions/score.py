"""HTTP: score against one run's endpoint, by its run id (function key): the seed's Azure ML request, and
OpenAI chat completions (the per-run alias of ``/api/v1/chat/completions``, functions/openai_api.py).

Whatever a client sends gets a JSON answer (functions/web.py): a run id of a shape no run has is 404
before any storage call, a malformed body 400 (413 over TUNEDROP_MAX_REQUEST_BYTES) naming what and
where (shared/scoring.py, shared/request_json.py), storage trouble 503 with Retry-After.
"""

import azure.functions as func

from functions.web import Request, Response, answers_json, answers_openai, body_of, param, run_core, scored

bp = func.Blueprint()


def _scorer():
    from shared.pipeline import get_pipeline
    from shared.scoring import get_scorer

    return get_scorer(get_pipeline())


@bp.route(route="runs/{run_id}/score", methods=["POST"])
@answers_json
async def score(req: Request) -> Response:
    body = await body_of(req)
    return scored(await run_core(lambda: _scorer().score(param(req, "run_id"), body)))


@bp.route(route="runs/{run_id}/v1/chat/completions", methods=["POST"])
@answers_openai
async def chat_completions(req: Request) -> Response:
    body = await body_of(req)
    return scored(await run_core(lambda: _scorer().chat(body, param(req, "run_id"))))
