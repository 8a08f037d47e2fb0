"""Continuous batching for the local model server: the sequences being generated share one forward pass a step.

A :class:`Batch` holds the sequences whose prompts are in its KV cache, one row each. Each :meth:`Batch.step`
makes at most two forward passes: one that reads new prompts into the cache (short prompts together, left-padded
to the longest; a long prompt alone, :data:`PREFILL_CHUNK_TOKENS` at a time, so it never holds the others up for
long), and one that gives every row in the batch its next token. A sequence joins the batch as soon as its
prompt is read (its cache is padded on the left to the batch's length, or the batch's to its) and leaves it the
moment it is done, so a short request is answered while a long one runs, and sixteen requests cost about what a
few cost one at a time: on a small model on CPUs, a step's time is mostly reading the weights, shared by every
row.

Left padding is masked (the attention mask), and each row has its own positions, so a row's tokens are the ones
it would get alone, up to the rounding of batched arithmetic. Sampling is per row: greedy, or temperature and
top-p with the row's own random generator (a request's ``seed`` makes its sampling repeat whatever else is in the
batch). What ends a sequence (end of text, length, stop sequences, time, a client gone) is the caller's rule: it
reads each step's tokens and calls :meth:`Batch.remove`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

#: A prompt longer than this is read in chunks of this many tokens, one chunk a step.
PREFILL_CHUNK_TOKENS = 256
#: Short prompts read together in one pass: at most this many tokens, padding included.
PREFILL_BATCH_TOKENS = 2048


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt, how to sample, and the tokens made so far."""

    prompt: torch.Tensor  # [1, n] token ids
    sampling: dict[str, Any]
    owner: Any = None  # the caller's request
    new_ids: list[int] = field(default_factory=list)
    read: int = 0  # prompt tokens in its own cache so far (a reused prefix, then chunks of a long prompt)
    cache: Any = None  # that cache, until it joins the batch's
    rng: torch.Generator | None = None

    def __post_init__(self):
        seed = self.sampling.get("seed")
        if seed is not None:
            self.rng = torch.Generator().manual_seed(int(seed) % 2**63)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt.shape[1])


class PrefixCache:
    """The KV of recent prompts (least recently used out first, at most ``max_tokens`` tokens in all), so that a
    prompt that starts like one of them reads only the rest: a system prompt every request repeats, the chat
    template's opening, the earlier turns of a conversation that goes on. A prefix is reused at the same
    positions it was computed at, so what a prompt gets is what reading it whole gives, up to rounding."""

    #: Shorter common prefixes are read again (looking them up would cost more than it saves).
    MIN_TOKENS = 8

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], list] = collections.OrderedDict()
        self._tokens = 0

    def seed(self, sequence: Sequence) -> None:
        """Starts ``sequence`` from the longest cached prefix of its prompt (leaving at least its last token to
        read: its logits give the first new token)."""
        ids = sequence.prompt[0].tolist()
        best, found = 0, None
        for key in self._entries:
            common = _common_prefix(key, ids, len(ids) - 1)
            if common > best:
                best, found = common, key
        if best >= self.MIN_TOKENS:
            self._entries.move_to_end(found)
            sequence.cache = DynamicCache(ddp_cache_data=[(k[:, :, :best], v[:, :, :best])
                                                          for k, v in self._entries[found]])
            sequence.read = best

    def add(self, prompt: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = tuple(prompt[0].tolist())
        if len(key) < self.MIN_TOKENS or len(key) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = layers
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)


def _common_prefix(a: tuple[int, ...], b: list[int], most: int) -> int:
    n = min(len(a), len(b), most)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers, config=config)


def _pad_left(tensor: torch.Tensor, dim: int, to: int) -> torch.Tensor:
    missing = to - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Batch:
    """The rows being generated, their shared KV cache and attention mask, and the prompts still to read."""

    def __init__(self, model, prefixes: PrefixCache | None = None):
        self.model = model
        self.config = model.config
        self.prefixes = prefixes
        self.rows: list[Sequence] = []
        self.reading: list[Sequence] = []  # prompts not (fully) in the cache yet
        self._long_turn = False
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 0 on the left padding
        self._last: torch.Tensor | None = None  # [rows, 1], each row's newest token, fed at the next step

    def __len__(self) -> int:
        return len(self.rows) + len(self.reading)

    def sequences(self) -> list[Sequence]:
        return [*self.rows, *self.reading]

    def add(self, sequence: Sequence) -> None:
        if self.prefixes is not None:
            self.prefixes.seed(sequence)
        self.reading.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        if sequence in self.reading:
            self.reading.remove(sequence)
            return
        keep = [i for i, row in enumerate(self.rows) if row is not sequence]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._last = None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every row left: drop them
        layers = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                  for k, v in _layers(self._cache)]
        self._cache, self._mask = _cache_of(layers, self.config), mask[:, first:]
        self._last = self._last.index_select(0, index)

    def step(self) -> list[tuple[Sequence, int]]:
        """One step: a prompt pass if any prompt waits, then one token for every row already in the batch; the
        sequences whose prompts are now read join the rows. Returns each new token with its sequence (a sequence
        that just joined gets its first)."""
        joined = self._read_prompts() if self.reading else []
        made = self._decode() if self.rows else []
        if joined:
            self._join(joined)
        return made + [(sequence, int(token)) for sequence, token, _, _ in joined]

    # -- reading prompts ---------------------------------------------------------------------------------

    def _read_prompts(self) -> list[tuple]:
        """Reads the rest of short prompts together, or the next chunk of a long one; returns the sequences now
        fully read, each as (sequence, first token, its cache's layers, its mask)."""
        short = [s for s in self.reading if s.prompt_len - s.read <= PREFILL_CHUNK_TOKENS]
        long = [s for s in self.reading if s.prompt_len - s.read > PREFILL_CHUNK_TOKENS]
        if long and (not short or self._long_turn):  # every other pass while both wait: neither starves
            self._long_turn = False
            return self._read_chunk(long[0])
        self._long_turn = bool(long)
        picked, widest = [], 0
        for sequence in short:
            if picked and max(widest, sequence.prompt_len) * (len(picked) + 1) > PREFILL_BATCH_TOKENS:
                break
            picked.append(sequence)
            widest = max(widest, sequence.prompt_len)
        return self._read_together(picked)

    def _read_together(self, picked: list[Sequence]) -> list[tuple]:
        """One pass over the unread part of each prompt, rows side by side: what each has read already (a reused
        prefix) is padded on the left to the longest such, and so is its unread part."""
        past = max(s.read for s in picked)
        rest = max(s.prompt_len - s.read for s in picked)
        ids = torch.cat([_pad_left(s.prompt[:, s.read:], 1, rest) for s in picked])
        mask = torch.cat([torch.cat([_pad_left(torch.ones(1, s.read, dtype=torch.long), 1, past),
                                     _pad_left(torch.ones(1, s.prompt_len - s.read, dtype=torch.long), 1, rest)], 1)
                          for s in picked])
        cache = DynamicCache(config=self.config)
        if past:
            template = next(_layers(s.cache) for s in picked if s.cache is not None)
            cache = _cache_of([tuple(torch.cat([_pad_left(_layers(s.cache)[i][kv] if s.cache is not None else
                                                          template[i][kv][:, :, :0], 2, past) for s in picked])
                                     for kv in (0, 1)) for i in range(len(template))], self.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, past:],
                         cache=cache, use_cache=True, logits_to_keep=1)
        padding = (mask == 0)[:, None, :, None]  # whatever was computed there is never attended to: zeros
        layers = [(k.masked_fill(padding, 0.0), v.masked_fill(padding, 0.0)) for k, v in _layers(cache)]
        tokens = self._sample(out.logits[:, -1], picked)
        joined = []
        for i, sequence in enumerate(picked):
            self.reading.remove(sequence)
            own = [(k[i:i + 1], v[i:i + 1]) for k, v in layers]
            if self.prefixes is not None:
                real = mask[i].bool()
                self.prefixes.add(sequence.prompt, [(k[:, :, real], v[:, :, real]) for k, v in own])
            sequence.read, sequence.cache = sequence.prompt_len, None
            joined.append((sequence, tokens[i, 0], own, mask[i:i + 1]))
        return joined

    def _read_chunk(self, sequence: Sequence) -> list[tuple]:
        """The next :data:`PREFILL_CHUNK_TOKENS` of a long prompt, alone, into its own cache."""
        if sequence.cache is None:
            sequence.cache = DynamicCache(config=self.config)
        end = sequence.read + PREFILL_CHUNK_TOKENS
        self.model(input_ids=sequence.prompt[:, sequence.read:end], attention_mask=torch.ones(1, end, dtype=torch.long),
                   position_ids=torch.arange(sequence.read, end).unsqueeze(0), cache=sequence.cache, use_cache=True,
                   logits_to_keep=1)
        sequence.read = end  # its last chunk (at most PREFILL_CHUNK_TOKENS) is read with the short prompts
        return []

    def _join(self, joined: list[tuple]) -> None:
        """Sequences whose prompts are read join the rows, every cache padded on the left to the longest."""
        parts = [(self._mask, _layers(self._cache), self._last)] if self.rows else []
        parts += [(mask, layers, token.view(1, 1)) for _, token, layers, mask in joined]
        length = max(mask.shape[1] for mask, _, _ in parts)
        self._mask = torch.cat([_pad_left(mask, 1, length) for mask, _, _ in parts])
        self._last = torch.cat([last for _, _, last in parts])
        layers = []
        for i in range(len(parts[0][1])):
            layers.append((torch.cat([_pad_left(p[1][i][0], 2, length) for p in parts]),
                           torch.cat([_pad_left(p[1][i][1], 2, length) for p in parts])))
        self._cache = _cache_of(layers, self.config)
        self.rows += [sequence for sequence, *_ in joined]

    # -- generating ---------------------------------------------------------------------------------------

    def _decode(self) -> list[tuple[Sequence, int]]:
        """Every row's next token from its newest, at its own next position (its real tokens so far)."""
        positions = self._mask.sum(1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        out = self.model(input_ids=self._last, attention_mask=self._mask, position_ids=positions,
                         cache=self._cache, use_cache=True, logits_to_keep=1)
        self._last = self._sample(out.logits[:, -1], self.rows)
        return [(row, int(self._last[i, 0])) for i, row in enumerate(self.rows)]

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """The next token of each row, [rows, 1]: greedy, or sampled with the row's temperature and top-p."""
        chosen = logits.argmax(-1, keepdim=True)
        for i, sequence in enumerate(sequences):
            sampling = sequence.sampling
            if not sampling.get("do_sample"):
                continue
            scaled = logits[i].float() / max(float(sampling.get("temperature") or 1.0), 1e-5)
            probs = torch.softmax(scaled, -1)
            top_p = float(sampling.get("top_p") or 1.0)
            if top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered >= top_p  # the smallest set reaching top_p stays
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            chosen[i, 0] = torch.multinomial(probs, 1, generator=sequence.rng)[0]
        return chosen
