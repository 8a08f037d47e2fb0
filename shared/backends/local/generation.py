"""What the local model server does with a checked request: limits first, then generations batched together.

Before any work a request is held to the server's limits (each a setting, passed to the server as an
argument): its generation length (``TUNEDROP_MAX_NEW_TOKENS``, refused, never clamped) and its prompt,
counted in tokens after the chat template, against the model's context window less that length and
against ``TUNEDROP_MAX_PROMPT_TOKENS``. A prompt longer in characters than the limit times the longest
token of the vocabulary is refused without being tokenised (a 1 MB prompt costs microseconds).

Admitted requests are generated together, up to ``TUNEDROP_SERVER_CONCURRENCY`` at once, by one thread that
runs a continuous batch (shared/backends/local/batching.py): each step reads waiting prompts into the KV cache
(a long prompt a chunk at a time; a prompt that starts like a recent one, such as a shared system prompt, reads
only the rest, ``TUNEDROP_SERVER_PREFIX_CACHE_TOKENS``) and gives every sequence in the batch its next token in
one forward pass. A request joins the batch as soon as its prompt is read and leaves it when it is done, so a
short request finishes while a long one is still running, and concurrent requests share each pass instead of
queueing for it. Between steps, a generation that has run past ``TUNEDROP_GENERATION_TIMEOUT_S`` (from the
request's arrival) or whose client has gone is taken out. Greedy output is what ``model.generate`` gives for the
prompt alone (tested). Up to ``TUNEDROP_SERVER_QUEUE`` more requests wait; past that the server answers 429 with
``Retry-After``.

A request may be streamed (:meth:`Scheduler.stream`): its tokens are handed over as they are made, decoded into
text pieces that never split a character or a stop sequence, with the same limits and stops as above. A stop
sequence ends its generation and is cut from the text, as OpenAI does; a ``seed`` gives the request its own
random generator, so its sampling repeats whatever else is generated beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from shared.openai_api import cut_at_stop

#: Generation length when a request asks for none (capped by TUNEDROP_MAX_NEW_TOKENS).
DEFAULT_NEW_TOKENS = 200
#: Context window assumed for a model whose config names none.
FALLBACK_CONTEXT = 2048
#: A tokenizer's model_max_length at or above this is transformers' "unset" sentinel, not a limit.
_UNSET_LENGTH = 10**9
#: Seconds a 429 asks the client to wait.
RETRY_AFTER_S = 5
#: How often a waiting request looks at its client and its deadline.
POLL_S = 0.05


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Refused(Exception):
    """A request the server will not (or could no longer) serve: an HTTP status, a message naming the
    limit and its setting, and a machine-readable code."""

    def __init__(self, status: int, message: str, *, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": str(self), "code": self.code}


@dataclass(frozen=True)
class Limits:
    """The server's bounds; the defaults are the settings' (shared/settings.py)."""

    max_new_tokens: int = 512
    max_prompt_tokens: int = 0  # 0: the context window is the only bound
    generation_timeout_s: float = 80.0
    concurrency: int = 16
    queue: int = 64
    prefix_cache_tokens: int = 4096

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 0 or not self.generation_timeout_s > 0 \
                or self.concurrency < 1 or self.queue < 0 \
                or self.prefix_cache_tokens < 0:
            raise ValueError(f"limits out of range: {self}")

    #: The setting (shared/settings.py) behind each field, and so its option's default and help.
    SETTINGS = {"max_new_tokens": "max_new_tokens", "max_prompt_tokens": "max_prompt_tokens",
                "generation_timeout_s": "generation_timeout_s", "concurrency": "server_concurrency",
                "queue": "server_queue", "prefix_cache_tokens": "server_prefix_cache_tokens"}

    @classmethod
    def add_arguments(cls, parser) -> None:
        """The model server's options, ``--max-new-tokens`` ... ``--prefix-cache-tokens``, defaulting to the settings'."""
        from shared.settings import Settings

        settings = {f.name: f for f in dataclasses.fields(Settings)}
        for f in dataclasses.fields(cls):
            setting = settings[cls.SETTINGS[f.name]]
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=setting.default,
                                help=f"{setting.metadata['env']}: {setting.metadata['help']}")

    @classmethod
    def from_arguments(cls, args) -> "Limits":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def context_window(model, tokenizer) -> int:
    """Tokens the model attends over: its config's position limit, or the tokenizer's, whichever is smaller."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            found.append(value)
            break
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNSET_LENGTH:
        found.append(length)
    return min(found) if found else FALLBACK_CONTEXT


def longest_token_chars(tokenizer) -> int:
    """Characters in the vocabulary's longest token: no prompt has fewer tokens than characters / this.
    (A byte-level token's string has one character per byte, so this bounds the characters it decodes to.)"""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max([len(t) for t in tokens if isinstance(t, str)] or [1]) or 1


class Generator:
    """The merged model and its tokenizer: prompts, generation arguments and answers."""

    def __init__(self, model, tokenizer, name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_window = context_window(model, tokenizer)
        self.max_chars_per_token = longest_token_chars(tokenizer)
        self.lock = threading.Lock()  # the synchronous path (generate) only
        self._eos = self.eos_ids()

    def encode(self, messages: list[dict[str, str]]):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    def finished(self, sequence) -> bool:
        """Whether a sequence is done: the end of its text, its length, or one of its stop sequences in its newest
        tokens (a stop may span tokens; it is cut from the text later)."""
        ids = sequence.new_ids
        if not ids or ids[-1] in self._eos or len(ids) >= sequence.sampling["max_new_tokens"]:
            return bool(ids)
        stops = sequence.sampling.get("stop")
        if not stops:
            return False
        tail = self.tokenizer.decode(ids[-(max(map(len, stops)) + 8):], skip_special_tokens=True)
        return any(stop in tail for stop in stops)

    def finish_reason(self, ids: list[int], cut: bool, max_new_tokens: int) -> str:
        ended = bool(ids) and ids[-1] in self._eos
        return "stop" if ended or cut or len(ids) < max_new_tokens else "length"

    def answer(self, new_ids: list[int], prompt_len: int, sampling: dict[str, Any]) -> dict[str, Any]:
        """The text of one generation (cut at the request's first stop sequence), its token counts and why it ended."""
        text, cut = cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True),
                                tuple(sampling.get("stop") or ()))
        return {"text": text.strip(), "prompt_tokens": int(prompt_len), "completion_tokens": len(new_ids),
                "finish_reason": self.finish_reason(new_ids, cut, sampling["max_new_tokens"])}

    def generate(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> dict[str, Any]:
        """One generation, here and now, with no limits (the demo's and the tests' direct path): a batch of one."""
        import torch

        from shared.backends.local.batching import Batch, Sequence

        prompt = self.encode(messages)["input_ids"]
        sequence = Sequence(prompt, {**sampling, "max_new_tokens": sampling.get("max_new_tokens") or DEFAULT_NEW_TOKENS})
        batch = Batch(self.model)
        batch.add(sequence)
        with self.lock, torch.inference_mode():
            while not self.finished(sequence):
                for _, token in batch.step():
                    sequence.new_ids.append(token)
        return self.answer(sequence.new_ids, sequence.prompt_len, sequence.sampling)


@dataclass(eq=False)
class _Job:
    """One admitted request: its encoded prompt and sampling, when it must end, and how it ended."""

    inputs: Any
    sampling: dict[str, Any]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    stop_reason: str | None = None  # set from outside: gone, timeout, done (a stream cut at a stop sequence)
    new_ids: list[int] = field(default_factory=list)
    error: str | None = None  # timeout | gone | done | failed
    tokens: queue.SimpleQueue | None = None  # a streamed request's new tokens, as they are made

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def why_stop(self) -> str | None:
        if self.stop_reason:
            return self.stop_reason
        return "timeout" if time.monotonic() >= self.deadline else None


class Scheduler:
    """Admits, checks and generates requests under :class:`Limits`, together (see the module's docstring)."""

    def __init__(self, generator: Generator, limits: Limits = Limits()):
        self.generator = generator
        self.limits = limits
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._admitted = 0
        self._running = 0
        self._closed = False
        self._loop = threading.Thread(target=self._generate, name="generate", daemon=True)
        self._loop.start()

    # -- the limits, before any work ----------------------------------------------------------------

    def new_tokens(self, sampling: dict[str, Any]) -> int:
        """The request's generation length, or Refused (400) past TUNEDROP_MAX_NEW_TOKENS."""
        most = min(self.limits.max_new_tokens, self.generator.context_window - 1)
        asked = sampling.get("max_new_tokens")
        if asked is None:
            return min(DEFAULT_NEW_TOKENS, most)
        if asked > most:
            why = (f"TUNEDROP_MAX_NEW_TOKENS is {self.limits.max_new_tokens}"
                   if most == self.limits.max_new_tokens else
                   f"the model's context window is {self.generator.context_window} tokens, prompt included")
            raise Refused(400, f"{sampling.get('tokens_field', 'max_new_tokens')} is {asked}, over the most this "
                          f"endpoint generates, {most} ({why}); ask for fewer", code="max_tokens_too_large")
        return asked

    def prompt_limit(self, max_new_tokens: int) -> tuple[int, str]:
        """The most prompt tokens a request of this length may send, and why."""
        room = self.generator.context_window - max_new_tokens
        why = (f"the model's context window of {self.generator.context_window} tokens less the {max_new_tokens} "
               "to generate (TUNEDROP_MAX_PROMPT_TOKENS can only lower it)")
        if 0 < self.limits.max_prompt_tokens < room:
            return self.limits.max_prompt_tokens, f"TUNEDROP_MAX_PROMPT_TOKENS is {self.limits.max_prompt_tokens}"
        return room, why

    def _too_long(self, tokens: str, limit: int, why: str) -> Refused:
        return Refused(400, f"prompt is {tokens} tokens after the chat template, over the limit of {limit} "
                       f"prompt tokens: {why}; send a shorter conversation", code="prompt_too_long")

    def check_length(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> int:
        """Refuses (400) a request over a length limit that can be seen without tokenising; its length."""
        max_new = self.new_tokens(sampling)
        limit, why = self.prompt_limit(max_new)
        chars = sum(len(m["content"]) for m in messages)
        if chars > limit * self.generator.max_chars_per_token:
            raise self._too_long(f"at least {math.ceil(chars / self.generator.max_chars_per_token)}", limit, why)
        return max_new

    def encode(self, messages: list[dict[str, str]], max_new: int):
        """The prompt, tokenised, or Refused (400) when it is over its limit."""
        inputs = self.generator.encode(messages)
        tokens = int(inputs["input_ids"].shape[1])
        limit, why = self.prompt_limit(max_new)
        if tokens > limit:
            raise self._too_long(str(tokens), limit, why)
        return inputs

    # -- serving ---------------------------------------------------------------------------------------

    def serve(self, messages: list[dict[str, str]], sampling: dict[str, Any],
              gone: Callable[[], bool] = lambda: False, arrived: float | None = None) -> dict[str, Any]:
        """The answer to one request, or Refused. ``gone()`` says whether the client has disconnected."""
        job = self._admit(messages, sampling, arrived)
        try:
            while not job.done.wait(POLL_S):
                self._watch(job, gone)
        finally:
            self._release()
        self._raise_for(job)
        return self.generator.answer(job.new_ids, job.prompt_len, job.sampling)

    def stream(self, messages: list[dict[str, str]], sampling: dict[str, Any],
               gone: Callable[[], bool] = lambda: False, arrived: float | None = None) -> "TextStream":
        """One request streamed: Refused now if it is refused before any work, else the :class:`TextStream`
        of its text pieces (which raises Refused if the generation is stopped part-way)."""
        return TextStream(self, self._admit(messages, sampling, arrived, streamed=True), gone)

    def _admit(self, messages, sampling, arrived, streamed: bool = False) -> _Job:
        """The request, checked against the limits and queued for the batch; Refused (400, 429) if it is not."""
        deadline = (arrived or time.monotonic()) + self.limits.generation_timeout_s
        max_new = self.check_length(messages, sampling)
        with self._cond:
            if self._admitted >= self.limits.concurrency + self.limits.queue:
                raise Refused(429, f"the endpoint is busy: {self.limits.concurrency} requests generating and "
                              f"{self.limits.queue} waiting (TUNEDROP_SERVER_CONCURRENCY, TUNEDROP_SERVER_QUEUE); "
                              f"try again in {RETRY_AFTER_S} s", code="server_busy",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
            self._admitted += 1
        try:
            job = _Job(self.encode(messages, max_new), {**sampling, "max_new_tokens": max_new}, deadline,
                       tokens=queue.SimpleQueue() if streamed else None)
        except BaseException:
            self._release()
            raise
        with self._cond:
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def _release(self) -> None:
        with self._cond:
            self._admitted -= 1

    def _watch(self, job: _Job, gone: Callable[[], bool]) -> None:
        if gone():
            self._stop(job, "gone")
        elif time.monotonic() >= job.deadline:
            self._stop(job, "timeout")

    def _raise_for(self, job: _Job) -> None:
        if job.error == "timeout":
            raise Refused(504, f"generation stopped after {self.limits.generation_timeout_s:g} s "
                          "(TUNEDROP_GENERATION_TIMEOUT_S, counted from the request's arrival); ask for fewer tokens "
                          "or send a shorter prompt", code="generation_timeout")
        if job.error == "gone":
            raise Refused(499, "the client disconnected; generation stopped", code="client_gone")
        if job.error:
            raise Refused(500, "generation failed", code="generation_failed")

    def close(self) -> None:
        """The generating thread ends once the requests it has are done (tests make several schedulers)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"admitted": self._admitted, "running": self._running, "waiting": len(self._waiting)}

    def _stop(self, job: _Job, reason: str) -> None:
        with self._cond:
            if job.done.is_set():
                return
            if not job.started:  # still waiting: it never runs
                self._waiting.remove(job)
                job.error = reason
                job.done.set()
                return
            job.stop_reason = job.stop_reason or reason  # in the batch: taken out before its next step

    def _generate(self) -> None:
        """The one thread that generates: admits waiting requests into the batch while it has room, takes out
        those stopped from outside or past their time, and steps the batch."""
        import torch

        from shared.backends.local.batching import Batch, PrefixCache, Sequence

        prefixes = PrefixCache(self.limits.prefix_cache_tokens) if self.limits.prefix_cache_tokens else None
        batch = Batch(self.generator.model, prefixes)
        while True:
            with self._cond:
                while not self._waiting and not len(batch) and not self._closed:
                    self._cond.wait()
                if self._closed and not self._waiting and not len(batch):
                    return
                while self._waiting and len(batch) < self.limits.concurrency:
                    job = self._waiting.popleft()
                    job.started = True
                    self._running += 1
                    batch.add(Sequence(job.inputs["input_ids"], job.sampling, owner=job))
            for sequence in batch.sequences():
                reason = sequence.owner.why_stop()
                if reason:
                    self._end(batch, sequence, reason)
            if not len(batch):
                continue
            try:
                with torch.inference_mode():
                    made = batch.step()
            except Exception as exc:  # noqa: BLE001 - never a trace in a response; the log says what
                log(f"generation failed: {type(exc).__name__}: {exc}")
                for sequence in batch.sequences():
                    self._end(batch, sequence, "failed")
                batch = Batch(self.generator.model, prefixes)
                continue
            for sequence, token in made:
                sequence.new_ids.append(token)
                if sequence.owner.tokens is not None:
                    sequence.owner.tokens.put(token)
                if self.generator.finished(sequence):
                    self._end(batch, sequence, None)

    def _end(self, batch, sequence, error: str | None) -> None:
        batch.remove(sequence)
        job = sequence.owner
        job.new_ids, job.error = sequence.new_ids, error
        with self._cond:
            self._running -= 1
        if error in ("timeout", "gone"):
            log(f"generation stopped: {'past TUNEDROP_GENERATION_TIMEOUT_S' if error == 'timeout' else 'its client is gone'}")
        job.done.set()


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop sequence, so not sent yet."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class TextStream:
    """The text of one streamed generation, piece by piece, then :attr:`result` (token counts, finish reason).

    Pieces never split a character or a stop sequence; leading and trailing whitespace is dropped as in the
    whole answer, so the pieces joined are exactly :meth:`Generator.answer`'s text. :meth:`close` (also on
    a disconnect) stops the generation and gives its admission back, once."""

    def __init__(self, scheduler: Scheduler, job: _Job, gone: Callable[[], bool]):
        self.scheduler, self.job, self.gone = scheduler, job, gone
        self.result: dict[str, Any] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        job, tok = self.job, self.scheduler.generator.tokenizer
        stops = tuple(job.sampling.get("stop") or ())
        ids: list[int] = []
        sent = 0
        cut = False
        try:
            while not cut:
                try:
                    ids.append(job.tokens.get(timeout=POLL_S))
                except queue.Empty:
                    if job.done.is_set() and job.tokens.empty():
                        break
                    self.scheduler._watch(job, self.gone)
                    continue
                text = tok.decode(ids, skip_special_tokens=True).lstrip()
                if text.endswith("\ufffd"):  # a character still coming in its next token
                    continue
                text, cut = cut_at_stop(text, stops)
                ready = len(text) if cut else len(text.rstrip()) - _held_back(text.rstrip(), stops)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
            if cut:
                self.scheduler._stop(job, "done")
                job.done.wait()
            if job.error != "done":  # "done": stopped here, at a stop sequence
                self.scheduler._raise_for(job)
            text = tok.decode(ids, skip_special_tokens=True).strip()
            text = cut_at_stop(text, stops)[0].strip()
            if len(text) > sent:
                yield text[sent:]
            self.result = {"prompt_tokens": job.prompt_len, "completion_tokens": len(ids),
                           "finish_reason": self.scheduler.generator.finish_reason(ids, cut,
                                                                                  job.sampling["max_new_tokens"])}
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.job.done.is_set():
            self.scheduler._stop(self.job, "gone")
        self.scheduler._release()
