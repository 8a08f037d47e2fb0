"""The train/test split of a single dropped file, the same on every backend.

An example goes to test when a hash of (seed, its index) falls under ``test_fraction``: the same
dataset, ``test_fraction`` and ``seed`` give the same split locally and on Azure ML, in one pass,
holding one example per side (a file of any size streams through). The share is ``test_fraction``
on average, not exactly. When the file has two or more examples and ``test_fraction`` > 0, neither
side ends empty: the last example of the fuller side moves over.

Evaluation is bounded: of the held-out examples (the test side, or a pair's test file), at most
``max_eval_examples`` are evaluated, a seeded sample that is again the same on every backend
(:class:`SeededSample`: the examples whose hash of (seed, position among the held-out) is smallest,
kept in held-out order, found in one pass holding only the sample).
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Generic, Iterable, Iterator, Sequence, TypeVar

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


def held_out_count(n: int, test_fraction: float, seed: int) -> int:
    """How many of ``n`` examples :func:`split_stream` holds out (the test side), without the examples."""
    if test_fraction <= 0:
        return 0
    threshold, prefix, sha256 = int(test_fraction * 2**32), f"{seed}:".encode(), hashlib.sha256
    test = sum(1 for index in range(n)  # side_of(index) == TEST, inlined: a million in about a second
               if int.from_bytes(sha256(prefix + str(index).encode()).digest()[:4], "big") < threshold)
    return min(max(test, 1), n - 1) if n >= 2 else test


class SeededSample(Generic[T]):
    """A sample of a stream, fed one example at a time: all of them while there are at most ``cap``
    (0: no cap), else the ``cap`` whose key, a hash of (``salt``, ``seed``, position in the stream), is
    smallest: the same examples wherever the same stream is sampled. Holds ``cap`` examples at most;
    :meth:`examples` gives them in stream order. ``salt`` "eval" samples the held-out examples."""

    def __init__(self, cap: int, seed: int, salt: str = "eval") -> None:
        self.cap = max(0, cap)
        self.prefix = f"{salt}:{seed}:".encode()
        self.seen = 0  # examples fed
        self._kept: list[tuple[int, int, T]] = []  # (-key, position, example): a max-heap of the smallest keys

    def add(self, example: T) -> T | None:
        """Feed the next example; returns the example it pushed out of the sample (or itself), if any."""
        position, self.seen = self.seen, self.seen + 1
        if not self.cap:
            self._kept.append((0, position, example))
            return None
        key = int.from_bytes(hashlib.sha256(self.prefix + str(position).encode()).digest()[:8], "big")
        item = (-key, position, example)
        if len(self._kept) < self.cap:
            heapq.heappush(self._kept, item)
            return None
        if item[0] > self._kept[0][0]:  # a smaller key than the largest kept
            return heapq.heapreplace(self._kept, item)[2]
        return example

    @property
    def sampled(self) -> bool:
        """True when some examples were left out."""
        return len(self._kept) < self.seen

    def examples(self) -> list[T]:
        return [example for _, _, example in sorted(self._kept, key=lambda item: item[1])]


def eval_sample(held_out: Iterable[T], cap: int, seed: int) -> list[T]:
    """The examples of ``held_out`` that are evaluated (:class:`SeededSample`), in held-out order."""
    sample: SeededSample[T] = SeededSample(cap, seed)
    for example in held_out:
        sample.add(example)
    return sample.examples()
