"""The model server's limits (issue 15): no prompt, length, slow generation, gone client or crowd of
requests can wedge it. In this process, on tiny-random (weights re-drawn so that greedy decoding says
something other than one token over and over), made slow where a test needs a long generation by a
hook that sleeps in each forward pass; the HTTP server is the real one (make_server) on a free port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from types import SimpleNamespace

import pytest

from shared.backends.local.batching import PREFILL_CHUNK_TOKENS
from shared.backends.local.generation import Limits, Refused, Scheduler
from shared.backends.local.server import Generator, make_server

KEY = "limits-key"


@pytest.fixture(scope="module")
def generator(model_cache):
    import torch

    from shared.backends.local.models import TINY_RANDOM, load_for_inference, resolve_base_model

    model, tokenizer = load_for_inference(resolve_base_model(TINY_RANDOM, model_cache))
    draw = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.copy_(torch.randn(weight.shape, generator=draw) * 0.2)
    return Generator(model, tokenizer, "tiny")


class Slow:
    """Sleeps ``seconds`` in every forward pass of the model and counts them."""

    def __init__(self, model, seconds: float):
        self.seconds, self.forwards = seconds, 0
        self._hook = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.forwards += 1
        time.sleep(self.seconds)

    def remove(self):
        self._hook.remove()


@contextlib.contextmanager
def serving(generator, limits: Limits, slow_s: float = 0.0):
    server = make_server(generator, KEY.encode(), limits)
    slow = Slow(generator.model, slow_s)  # after the scheduler's hook: the sleep is inside a turn, as compute is
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(port=server.server_address[1], scheduler=server.scheduler, slow=slow)
    finally:
        slow.remove()
        server.shutdown()
        server.server_close()
        server.scheduler.close()


def seed(text: str, **parameters) -> dict:
    return {"input_data": {"input_string": [{"role": "user", "content": text}], "parameters": parameters}}


def post(port, body, path="/score", timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def open_request(port, body) -> socket.socket:
    """A request sent on a raw socket, left waiting for its answer (close the socket to hang up)."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        time.sleep(0.01)


def test_greedy_output_is_model_generates_even_when_requests_are_batched(generator, monkeypatch):
    import torch

    prompts = ["What is 2 plus 3?", "Tell me a story about a dragon.",
               "Count the words: " + "one two three four five " * (PREFILL_CHUNK_TOKENS // 4)]  # chunked prefill
    expected = []
    for text in prompts:
        inputs = generator.encode([{"role": "user", "content": text}])
        assert (inputs["input_ids"].shape[1] > PREFILL_CHUNK_TOKENS) == (text is prompts[-1])
        with torch.inference_mode():
            output = generator.model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=2)
        expected.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    assert len({tuple(e) for e in expected}) == 3 and all(len(set(e)) > 5 for e in expected)  # not degenerate
    monkeypatch.setattr(generator, "answer", lambda new_ids, prompt_len, sampling: new_ids)
    scheduler = Scheduler(generator, Limits(concurrency=3))
    try:
        got = [None] * 3

        def ask(i):
            got[i] = scheduler.serve([{"role": "user", "content": prompts[i]}],
                                     {"max_new_tokens": 24, "do_sample": False, "temperature": 0})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        scheduler.close()
    assert got == expected


def test_concurrent_requests_share_forward_passes(generator):
    """Eight requests of 12 tokens at once: batched, they take about 12 passes plus their prompts' reading, where
    one at a time they took 8 x 12; each still gets its own answer (the one it gets alone)."""
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    with serving(generator, Limits(concurrency=8)) as server:
        alone = [post(server.port, seed(p, max_new_tokens=12, do_sample=False))[1]["output"] for p in prompts[:2]]
        before = server.slow.forwards
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda p: post(server.port, seed(p, max_new_tokens=12, do_sample=False)), prompts))
        passes = server.slow.forwards - before
    assert all(status == 200 for status, _, _ in replies)
    assert [body["output"] for _, body, _ in replies[:2]] == alone
    assert len({body["output"] for _, body, _ in replies}) > 1
    assert passes <= 40, f"{passes} forward passes for 8 x 12 tokens: not batched"


def test_a_prompt_that_starts_like_a_recent_one_reads_only_the_rest(generator):
    """A long system prompt repeated by every request is read once: the next request's prompt pass reads only
    what follows it, and its answer is the one the model gives that prompt read whole."""
    system = {"role": "system", "content": "You answer in one short sentence, politely. " * 30}
    asks = [[system, {"role": "user", "content": text}] for text in ("What is 2 plus 3?", "Name a colour.")]
    greedy = {"max_new_tokens": 10, "do_sample": False}
    whole = [generator.generate(messages, greedy) for messages in asks]
    passes: list[list[int]] = []  # per request, the tokens each forward pass reads
    hook = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: passes[-1].append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    scheduler = Scheduler(generator, Limits(concurrency=2))
    answers = []
    try:
        for messages in asks:
            passes.append([])
            answers.append(scheduler.serve(messages, dict(greedy)))
    finally:
        scheduler.close()
        hook.remove()
    prompt = [int(generator.encode(messages)["input_ids"].shape[1]) for messages in asks]
    assert answers == whole
    first, second = (sum(n for n in p if n > 1) for p in passes)  # prompt passes; then one token a pass
    assert first == prompt[0] and prompt[1] > 250
    assert second < 30, f"of the second prompt's {prompt[1]} tokens, {second} were read: its prefix was read again"


def test_a_short_request_is_answered_while_a_long_one_runs(generator):
    with serving(generator, Limits(concurrency=2), slow_s=0.005) as server:
        long = open_request(server.port, seed("Write a long story.", max_new_tokens=400))  # >= 2 s of forwards
        wait_for(lambda: server.slow.forwards > 5, 10, "started")
        started = time.monotonic()
        status, body, _ = post(server.port, seed("2+2?", max_new_tokens=3))
        short_s = time.monotonic() - started
        assert status == 200 and set(body) == {"output"}
        assert server.scheduler.stats()["running"] == 1  # the long one is still generating
        assert short_s < 5, f"the short request waited {short_s:.2f} s behind the long one"  # a hang guard
        long.close()  # hang up: the long generation stops (next test)
        wait_for(lambda: server.scheduler.stats()["admitted"] == 0, 5, "stopped")


def test_a_client_that_hangs_up_stops_its_generation(generator):
    with serving(generator, Limits(), slow_s=0.005) as server:
        sock = open_request(server.port, seed("Write a long story.", max_new_tokens=500))
        wait_for(lambda: server.slow.forwards > 10, 10, "started")
        sock.close()
        wait_for(lambda: server.scheduler.stats()["running"] == 0, 2, "stopped after the client hung up")
        stopped_at = server.slow.forwards
        time.sleep(0.2)
        assert server.slow.forwards == stopped_at < 300  # stopped, not left running in a thread


def test_a_generation_past_its_time_is_stopped_with_504(generator):
    with serving(generator, Limits(generation_timeout_s=0.5), slow_s=0.005) as server:
        started = time.monotonic()
        status, body, _ = post(server.port, seed("Write a long story.", max_new_tokens=500))
        took = time.monotonic() - started
        assert status == 504 and body["code"] == "generation_timeout"
        assert "TUNEDROP_GENERATION_TIMEOUT_S" in body["error"] and "0.5 s" in body["error"]
        assert 0.5 <= took < 2.0
        stopped_at = server.slow.forwards
        time.sleep(0.2)
        assert server.slow.forwards == stopped_at and server.scheduler.stats() == {"admitted": 0, "running": 0,
                                                                                     "waiting": 0}
        assert post(server.port, seed("2+2?", max_new_tokens=2))[0] == 200  # and the next one is served


def test_a_full_queue_answers_429_with_retry_after(generator):
    with serving(generator, Limits(concurrency=1, queue=1), slow_s=0.005) as server:
        held = [open_request(server.port, seed("Write a long story.", max_new_tokens=400)) for _ in range(2)]
        wait_for(lambda: server.scheduler.stats() == {"admitted": 2, "running": 1, "waiting": 1}, 10, "both admitted")
        status, body, headers = post(server.port, seed("2+2?", max_new_tokens=2))
        assert status == 429 and body["code"] == "server_busy" and int(headers["Retry-After"]) > 0
        assert "TUNEDROP_SERVER_CONCURRENCY" in body["error"] and "TUNEDROP_SERVER_QUEUE" in body["error"]
        for sock in held:
            sock.close()
        wait_for(lambda: server.scheduler.stats()["admitted"] == 0, 5, "freed")
        assert post(server.port, seed("2+2?", max_new_tokens=2))[0] == 200


def test_prompts_are_held_to_the_context_window_and_the_setting(generator, monkeypatch):
    scheduler = Scheduler(generator, Limits(max_prompt_tokens=60, concurrency=1))
    try:
        def refused(text, max_new_tokens=None):
            messages = [{"role": "user", "content": text}]
            with pytest.raises(Refused) as caught:
                scheduler.encode(messages, scheduler.check_length(messages, {"max_new_tokens": max_new_tokens}))
            return caught.value

        ok = [{"role": "user", "content": "What is 2 plus 3?"}]
        assert scheduler.encode(ok, scheduler.check_length(ok, {"max_new_tokens": None}))["input_ids"].shape[1] <= 60
        too_long = refused("word " * 40)
        tokens = generator.encode([{"role": "user", "content": "word " * 40}])["input_ids"].shape[1]
        assert (too_long.status, too_long.code) == (400, "prompt_too_long")
        assert f"prompt is {tokens} tokens" in str(too_long) and "limit of 60" in str(too_long)
        assert "TUNEDROP_MAX_PROMPT_TOKENS is 60" in str(too_long)
    finally:
        scheduler.close()
    # The context window (2048 for tiny-random) less the generation asked for.
    scheduler = Scheduler(generator, Limits(concurrency=1))
    try:
        text = "word " * 1600
        assert scheduler.encode([{"role": "user", "content": text}], 100) is not None
        refusal = refused(text, 512)
        assert refusal.code == "prompt_too_long" and "limit of 1536" in str(refusal)
        assert "context window of 2048 tokens less the 512" in str(refusal)
        # A prompt of 1 MB is refused on its length in characters, without being tokenised.
        monkeypatch.setattr(generator, "encode", lambda messages: pytest.fail("tokenised"))
        refusal = refused("x" * 1_000_000)
        assert refusal.code == "prompt_too_long" and "at least" in str(refusal) and "limit of 1848" in str(refusal)
    finally:
        scheduler.close()


@pytest.mark.parametrize("sampling, field", [
    ({"max_new_tokens": 100_000, "tokens_field": "input_data.parameters.max_new_tokens"},
     "input_data.parameters.max_new_tokens is 100000"),
    ({"max_new_tokens": 513, "tokens_field": "max_tokens"}, "max_tokens is 513"),
])
def test_a_generation_over_the_limit_is_refused_not_clamped(generator, sampling, field):
    scheduler = Scheduler(generator, Limits(concurrency=1))
    try:
        assert scheduler.new_tokens({"max_new_tokens": 512}) == 512 and scheduler.new_tokens({}) == 200
        with pytest.raises(Refused) as caught:
            scheduler.new_tokens(sampling)
        assert caught.value.status == 400 and caught.value.code == "max_tokens_too_large"
        assert field in str(caught.value) and "TUNEDROP_MAX_NEW_TOKENS is 512" in str(caught.value)
    finally:
        scheduler.close()


def test_the_backend_starts_servers_with_the_settings_limits(tmp_path, monkeypatch):
    import shared.backends.local as local
    from shared.backends.base import ModelRef
    from shared.settings import Settings

    settings = Settings(state_dir=tmp_path, max_new_tokens=64, max_prompt_tokens=1000, generation_timeout_s=5.0,
                        server_concurrency=2, server_queue=3, server_prefix_cache_tokens=100)
    spawned = []
    monkeypatch.setattr(local, "_spawn", lambda module, args, log: spawned.append(args) or 999_999_999)
    local.LocalBackend(settings).begin_deploy(SimpleNamespace(run_id="run-1", cycle=0), ModelRef("m", "1"))
    args = spawned[0]
    given = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    assert {k: given[k] for k in ("--max-new-tokens", "--max-prompt-tokens", "--generation-timeout-s",
                                  "--concurrency", "--queue", "--prefix-cache-tokens")} == {
        "--max-new-tokens": "64", "--max-prompt-tokens": "1000", "--generation-timeout-s": "5.0",
        "--concurrency": "2", "--queue": "3", "--prefix-cache-tokens": "100"}
    # The server's own defaults are the settings' defaults.
    defaults = {f.name: f.default for f in fields(Settings)}
    assert Limits() == Limits(max_new_tokens=defaults["max_new_tokens"], max_prompt_tokens=defaults["max_prompt_tokens"],
                              generation_timeout_s=defaults["generation_timeout_s"],
                              concurrency=defaults["server_concurrency"], queue=defaults["server_queue"],
                              prefix_cache_tokens=defaults["server_prefix_cache_tokens"])
    assert defaults["generation_timeout_s"] < defaults["score_timeout_s"]


# -- streaming, stop sequences and seeds (issue 17) -------------------------------------------------------


def chat(text: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **fields}


def events(port, body, timeout=30) -> list:
    """The Server-Sent Events of a streamed request, each decoded ("[DONE]" as is)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = response.read().decode().split("\n\n")
    assert lines[-1] == ""
    return [line[len("data: "):] if line.endswith("[DONE]") else json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_a_streamed_answer_is_the_whole_answer_in_pieces_as_openai_sends_them(generator):
    with serving(generator, Limits(concurrency=2)) as server:
        status, whole, _ = post(server.port, chat("Tell me a story about a dragon.", temperature=0, max_tokens=40),
                                path="/v1/chat/completions")
        assert status == 200
        text = whole["choices"][0]["message"]["content"]
        got = events(server.port, chat("Tell me a story about a dragon.", temperature=0, max_tokens=40, stream=True,
                                       stream_options={"include_usage": True}))
        assert server.scheduler.stats()["admitted"] == 0
    assert got[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in got[:-1])
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"]["content"] for e in got[1:-3]]
    assert len(pieces) > 5 and "".join(pieces) == text  # token by token, the same text
    assert got[-3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": whole["choices"][0]["finish_reason"]}
    assert got[-2]["choices"] == [] and got[-2]["usage"] == whole["usage"]
    assert len({e["id"] for e in got[:-1]}) == 1


def test_stop_sequences_end_the_answer_before_them_streamed_or_not(generator):
    with serving(generator, Limits(concurrency=2)) as server:
        _, whole, _ = post(server.port, chat("Tell me a story about a dragon.", temperature=0, max_tokens=40),
                           path="/v1/chat/completions")
        text = whole["choices"][0]["message"]["content"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        expected = text[:text.find(stop)].strip()
        _, cut, _ = post(server.port, chat("Tell me a story about a dragon.", temperature=0, max_tokens=40,
                                           stop=["\u2603never", stop]), path="/v1/chat/completions")
        streamed = events(server.port, chat("Tell me a story about a dragon.", temperature=0, max_tokens=40,
                                            stop=stop, stream=True))
    assert stop and cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 40
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed[:-1]) == expected
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_seed_makes_sampling_repeat_and_refused_fields_are_named(generator):
    with serving(generator, Limits(concurrency=1)) as server:
        answers = [post(server.port, chat("Say something.", temperature=1.0, seed=seed, max_tokens=16),
                        path="/v1/chat/completions")[1]["choices"][0]["message"]["content"] for seed in (7, 7, 8)]
        refused = {name: post(server.port, chat("Hi", **{name: value}), path="/v1/chat/completions")
                   for name, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                       ("logprobs", True), ("n", 2), ("stop", ["a"] * 5), ("best_of", 2)]}
    assert answers[0] == answers[1] != answers[2]
    for name, (status, body, _) in refused.items():
        assert status == 400 and body["field"] == name, (name, body)


def test_hanging_up_on_a_stream_stops_its_generation(generator):
    with serving(generator, Limits(concurrency=1, queue=0), slow_s=0.05) as server:
        raw = json.dumps(chat("Tell me a long story.", temperature=0, max_tokens=400, stream=True)).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
        received = b""
        while b"chat.completion.chunk" not in received:
            received += sock.recv(4096)
        forwards = server.slow.forwards
        sock.close()
        wait_for(lambda: server.scheduler.stats()["admitted"] == 0, 10, "the stream's admission given back")
        assert server.slow.forwards - forwards < 100  # stopped, not run to its 400 tokens
        assert post(server.port, chat("Hi", max_tokens=2), path="/v1/chat/completions")[0] == 200
