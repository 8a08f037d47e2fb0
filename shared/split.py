"""The train/test split of a single dropped file, the same on every backend.

An example goes to test when a hash of (seed, its index) falls under ``test_fraction``: the same
dataset, ``test_fraction`` and ``seed`` give the same split locally and on Azure ML, in one pass,
holding one example per side (a file of any size streams through). The share is ``test_fraction``
on average, not exactly. When the file has two or more examples and ``test_fraction`` > 0, neither
side ends empty: the last example of the fuller side moves over.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
TRAIN, TEST = "train", "test"


def side_of(index: int, test_fraction: float, seed: int) -> str:
    """Where example ``index`` (0-based, in file order) goes."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return TEST if int.from_bytes(digest[:4], "big") < int(test_fraction * 2**32) else TRAIN


def split_stream(examples: Iterable[T], test_fraction: float, seed: int) -> Iterator[tuple[str, T]]:
    """(side, example) for every example, in file order but for each side's last, which comes at the end."""
    held: dict[str, T] = {}
    counts = {TRAIN: 0, TEST: 0}
    for index, example in enumerate(examples):
        side = side_of(index, test_fraction, seed) if test_fraction > 0 else TRAIN
        if side in held:
            yield side, held[side]
        held[side] = example
        counts[side] += 1
    if test_fraction > 0:
        for empty, full in ((TEST, TRAIN), (TRAIN, TEST)):
            if counts[empty] == 0 and counts[full] >= 2:
                held[empty] = held.pop(full)
    for side in (TRAIN, TEST):
        if side in held:
            yield side, held[side]


def split_examples(examples: Sequence[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """:func:`split_stream` gathered into (train, test) lists."""
    sides: dict[str, list[T]] = {TRAIN: [], TEST: []}
    for side, example in split_stream(examples, test_fraction, seed):
        sides[side].append(example)
    return sides[TRAIN], sides[TEST]
