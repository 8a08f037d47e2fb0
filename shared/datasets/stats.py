"""Bounded-memory statistics of a stream of examples: a set of conversation hashes for duplicates,
and size distributions (exact median and p95 up to a cap, a uniform sample beyond)."""

from __future__ import annotations

import random
from array import array

#: Exact median up to this many examples, a uniform sample beyond.
RESERVOIR = 200_000
#: Conversations remembered for duplicate detection (48 MB of table at most).
DEDUP_CAP = 2_000_000


class HashTable:
    """Open-addressing set of 64-bit hashes with the line each was first seen on.

    12 bytes a slot in two arrays (about 24 bytes per conversation), instead of ~100 for a dict;
    stops taking new entries at ``cap`` (lookups still work) so memory stays bounded.
    """

    __slots__ = ("keys", "lines", "mask", "size", "cap", "full")

    def __init__(self, cap: int) -> None:
        self.keys = array("Q", bytes(8 * 1024))
        self.lines = array("I", bytes(4 * 1024))
        self.mask = 1023
        self.size = 0
        self.cap = cap
        self.full = False

    def get(self, h: int) -> int:
        """The line h was first seen on, or 0."""
        keys, mask = self.keys, self.mask
        i = h & mask
        while True:
            k = keys[i]
            if k == 0:
                return 0
            if k == h:
                return self.lines[i]
            i = (i + 1) & mask

    def add(self, h: int, line: int) -> int:
        """Insert h; return 0 if new, else the line it was first seen on."""
        keys, mask = self.keys, self.mask
        i = h & mask
        while True:
            k = keys[i]
            if k == 0:
                break
            if k == h:
                return self.lines[i]
            i = (i + 1) & mask
        if self.size >= self.cap:
            self.full = True
            return 0
        keys[i] = h
        self.lines[i] = line
        self.size += 1
        if self.size * 2 > mask:
            self._grow()
        return 0

    def _grow(self) -> None:
        old_keys, old_lines = self.keys, self.lines
        n = (self.mask + 1) * 2
        mask = n - 1
        keys = array("Q", bytes(8 * n))
        lines = array("I", bytes(4 * n))
        for j, k in enumerate(old_keys):
            if k:
                i = k & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                lines[i] = old_lines[j]
        self.keys, self.lines, self.mask = keys, lines, mask


class Sizes:
    """Per-example sizes (characters, tokens): count, min and max exact; median and p95 exact up
    to ``capacity`` examples, then from a uniform sample of that many (reservoir sampling, seeded),
    so memory stays flat however long the file."""

    __slots__ = ("sample", "seen", "min", "max", "capacity", "_rng")

    def __init__(self, capacity: int = RESERVOIR) -> None:
        self.sample = array("I")
        self.seen = 0
        self.min: int | None = None
        self.max: int | None = None
        self.capacity = capacity
        self._rng = random.Random(0x7D)

    def add(self, n: int) -> None:
        if not self.seen:
            self.min = self.max = n
        elif n < self.min:
            self.min = n
        elif n > self.max:
            self.max = n
        self.seen += 1
        n = min(n, 0xFFFFFFFF)
        if len(self.sample) < self.capacity:
            self.sample.append(n)
        else:
            k = self._rng.randrange(self.seen)
            if k < self.capacity:
                self.sample[k] = n

    @property
    def exact(self) -> bool:
        """True while every size is in the sample (the median and p95 are exact)."""
        return self.seen <= self.capacity

    def median_p95(self) -> tuple[int | float | None, int | None]:
        s = sorted(self.sample)
        n = len(s)
        if not n:
            return None, None
        mid = n // 2
        median = s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2
        if isinstance(median, float) and median.is_integer():
            median = int(median)
        return median, s[min(n - 1, int(0.95 * n))]
