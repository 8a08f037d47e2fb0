"""Training examples: conversations in, token ids out.

Parses a validated dataset file into conversations, renders each with the tokenizer's chat
template into (input_ids, labels) whose labels are masked (``IGNORE_INDEX``) everywhere but the
assistant's tokens, and pads them into batches of similar lengths. torch loads only when a batch
is built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

IGNORE_INDEX = -100


# -- data --------------------------------------------------------------------------------------


def read_dataset(path: Path, format: str = "jsonl", **limits) -> Iterator[list[dict[str, str]]]:
    """Conversations of a validated dataset file (jsonl, jsonl.gz or parquet), one at a time, parsed the
    way the validator reads them; ``limits`` (:func:`shared.datasets.training_limits`) raise
    DatasetLimitError past them."""
    from shared.datasets import iter_conversations

    def chunks():
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return iter_conversations(chunks(), format=format, **limits)


def parse_dataset(path: Path, format: str = "jsonl", **limits) -> list[list[dict[str, str]]]:
    """:func:`read_dataset` as a list."""
    return list(read_dataset(path, format, **limits))


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered conversation) the model is trained to produce.

    Each span is an assistant message's content followed by the end-of-turn token when the
    template puts it right after the content.
    """
    eos = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if prefix and text.startswith(prefix) and text.startswith(content, len(prefix)):
            start = len(prefix)
        else:  # a template that renders prefixes differently: find the content in order
            start = text.find(content, cursor)
            if start < 0:
                continue
        end = start + len(content)
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], max_length: int):
    """(input_ids, labels) with labels -100 everywhere but the assistant spans; None if nothing to learn."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])[:max_length]
    offsets = list(encoded["offset_mapping"])[: len(ids)]
    spans = assistant_spans(tokenizer, messages, text)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (a, b) in enumerate(offsets):
        if any(a < end and b > start for start, end in spans):
            labels[k] = ids[k]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return ids, labels


# -- batching ----------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: Any
    attention_mask: Any
    labels: Any
    tokens: int  # real (non-padding) tokens
    targets: int  # tokens the loss is computed on


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return Batch(input_ids, attention, labels, int(attention.sum()), int((labels[:, 1:] != IGNORE_INDEX).sum()))


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths (little padding)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches
