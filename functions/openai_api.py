"""HTTP: the OpenAI-compatible API, one base URL for every fine-tuned model (``/api/v1``).

``GET /api/v1/models`` lists them as OpenAI model objects (with the run, state and figures beside the
standard fields); ``POST /api/v1/chat/completions`` routes by ``model`` (shared/openai_api.py). The
routes are anonymous to the Functions host, which only knows its own keys, and check the client's
``Authorization: Bearer`` (or ``api-key``) against TUNEDROP_API_KEYS here (shared/api_keys.py).
Every error is in OpenAI's shape.
"""

import azure.functions as func

from functions.web import Request, Response, answers_openai, body_of, json_answer, run_core, scored
from shared.openai_api import OpenAIError

bp = func.Blueprint()


def _pipeline():
    from shared.pipeline import get_pipeline

    return get_pipeline()


def _authorize(req: Request, pipeline) -> str:
    """The name of the API key the request presents; OpenAIError 401 without a known one."""
    from shared.api_keys import caller, parse, presented

    entries = parse(pipeline.settings.api_keys)
    if not entries:
        raise OpenAIError(401, "No API keys are configured for /api/v1: set TUNEDROP_API_KEYS (make a key with "
                          "`tunedrop keys new NAME`).", code="no_api_keys")
    key = presented(req.headers)
    if key is None:
        raise OpenAIError(401, "No API key provided: send it as `Authorization: Bearer <key>` (the OpenAI clients' "
                          "api_key).", code="missing_api_key")
    name = caller(key, entries)
    if name is None:
        raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return name


@bp.route(route="v1/models", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@answers_openai
async def list_models(req: Request) -> Response:
    from shared.openai_api import listed, model_object

    def call():
        pipeline = _pipeline()
        _authorize(req, pipeline)
        return {"object": "list", "data": [model_object(run) for run in listed(pipeline.store.list())]}

    return json_answer(200, await run_core(call))


@bp.route(route="v1/models/{model}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@answers_openai
async def get_model(req: Request) -> Response:
    from shared.openai_api import listed, model_id, model_object

    wanted = req.path_params.get("model", "")

    def call():
        pipeline = _pipeline()
        _authorize(req, pipeline)
        for run in listed(pipeline.store.list()):
            if wanted in (model_id(run), run.run_id):
                return model_object(run)
        raise OpenAIError(404, f"The model {wanted[:80]!r} does not exist.", param="model", code="model_not_found")

    return json_answer(200, await run_core(call))


@bp.route(route="v1/chat/completions", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@answers_openai
async def v1_chat_completions(req: Request) -> Response:
    from shared.scoring import get_scorer

    body = await body_of(req)

    def call():
        pipeline = _pipeline()
        _authorize(req, pipeline)
        return get_scorer(pipeline).chat(body)

    return scored(await run_core(call))
