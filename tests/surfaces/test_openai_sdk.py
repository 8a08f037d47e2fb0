"""The OpenAI-compatible API with the official `openai` Python client, as a user holds it: one base URL
(`/api/v1`), the client's own `api_key=`, its types and its exceptions, over real HTTP to the local host
and a real model server."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from shared import runs
from shared.openai_api import model_id
from tests.surfaces.conftest import state_of
from tests.waiting import wait_for

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]
#: tiny-random, lightly trained, answers greedily with its end token at once: sampled with a seed, it says
#: something, and the same thing every time (the seed goes through the Function to the model server).
SAMPLED = {"temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base_url}/api/v1", api_key=served.key, max_retries=0, timeout=60)


def test_models_are_listed_as_openai_models_with_the_run_beside(client, deployed_run):
    models = list(client.models.list())
    assert all(isinstance(m, Model) and m.object == "model" and m.owned_by == "tunedrop" for m in models)
    mine = next(m for m in models if m.id == model_id(deployed_run))
    assert mine.run_id == deployed_run.run_id and mine.state == "deployed" and mine.serving == "ready"
    assert mine.base_model == "tiny-random" and mine.metrics["eval_loss"] > 0 and mine.created > 0
    assert client.models.retrieve(mine.id).run_id == deployed_run.run_id


def test_a_completion_by_model_id_or_run_id_and_the_same_text_streamed(client, deployed_run):
    by_model = client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=12, **SAMPLED)
    assert isinstance(by_model, ChatCompletion) and by_model.object == "chat.completion"
    text = by_model.choices[0].message.content
    assert isinstance(text, str) and len(text) > 5 and by_model.choices[0].finish_reason in ("stop", "length")
    assert by_model.usage.completion_tokens <= 12 and by_model.usage.total_tokens == (
        by_model.usage.prompt_tokens + by_model.usage.completion_tokens)
    by_run = client.chat.completions.create(model=deployed_run.run_id, messages=QUESTION, max_tokens=12, **SAMPLED)
    assert by_run.choices[0].message.content == text  # the same model, the same seed: the same answer
    by_name = client.chat.completions.create(model=deployed_run.model_name, messages=QUESTION, max_tokens=12, **SAMPLED)
    assert by_name.choices[0].message.content == text  # a bare model name: its newest version

    chunks = list(client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}, **SAMPLED))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == by_model.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == by_model.choices[0].finish_reason


def test_stop_sequences_and_developer_messages_are_honoured(client, deployed_run):
    whole = client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=12,
                                           **SAMPLED).choices[0].message.content
    assert len(whole) >= 4, whole
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=12,
                                         stop=[stop], **SAMPLED)
    assert cut.choices[0].message.content == whole[:whole.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    parts = client.chat.completions.create(model=model_id(deployed_run), temperature=0, max_tokens=4, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2 plus 2?"}]}])
    assert isinstance(parts.choices[0].message.content, str)


def test_errors_are_the_sdks_own_exceptions_with_message_param_and_code(client, served, deployed_run):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model:1", messages=QUESTION)
    assert missing.value.code == "model_not_found" and "GET /v1/models" in missing.value.message
    wrong = openai.OpenAI(base_url=f"{served.base_url}/api/v1", api_key="td_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.code == "invalid_api_key"
    for bad, param in [({"temperature": 5}, "temperature"), ({"logprobs": True}, "logprobs"),
                       ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                       ({"n": 3}, "n"), ({"response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, **bad)
        assert caught.value.param == param and caught.value.message, bad
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, extra_body={"best_of": 2})
    assert unknown.value.param == "best_of" and "Unrecognized request argument" in unknown.value.message


def test_a_sleeping_model_wakes_on_a_request_that_gets_a_503_saying_so(client, served, deployed_run):
    answer = httpx.post(f"{served.base_url}/api/runs/{deployed_run.run_id}/undeploy",
                        headers={"x-functions-key": served.key}, timeout=60)
    assert answer.status_code == 200 and answer.json()["state"] == runs.TORN_DOWN
    listed = {m.id: m for m in client.models.list()}
    assert listed[model_id(deployed_run)].serving == "asleep"
    with pytest.raises(openai.InternalServerError) as waking:
        client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=4)
    assert waking.value.status_code == 503 and waking.value.code == "model_waking"
    assert waking.value.response.headers["Retry-After"]
    wait_for(lambda: state_of(served, deployed_run.run_id, runs.DEPLOYED), 120, "woken")
    again = client.chat.completions.create(model=model_id(deployed_run), messages=QUESTION, max_tokens=4)
    assert again.choices[0].message.content is not None
