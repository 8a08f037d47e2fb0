"""Which blobs make one dataset: a single file (split into train and test), or a train/test pair
used as given.

A pair is named either way:

    chat.train.jsonl   + chat.test.jsonl        (any folder; the stem is "chat.")
    chat/train.jsonl   + chat/test.jsonl        (a folder holding the two)

Each half may be any dataset format (``.jsonl``, ``.jsonl.gz``, ``.parquet``). The train half
carries the run (its blob version is the run's identity, its sidecar and metadata the overrides);
the test half only completes it, so the two may arrive in either order.
"""

from __future__ import annotations

from dataclasses import dataclass

#: File endings of dataset formats, longest first so that ".jsonl.gz" is not read as ".gz".
DATASET_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet", ".pq", ".gz")
HALVES = ("train", "test")


@dataclass(frozen=True)
class PairHalf:
    """One half of a train/test pair, from its blob name."""

    name: str
    half: str  # "train" or "test"
    stem: str  # what comes before the half: "data/chat." or "data/chat/"
    suffix: str  # ".jsonl", ".jsonl.gz", ...

    @property
    def other(self) -> str:
        return "test" if self.half == "train" else "train"

    def partner_names(self) -> list[str]:
        """Names the other half may have, the same format first."""
        suffixes = [self.suffix] + [s for s in DATASET_SUFFIXES if s != self.suffix.lower()]
        return [f"{self.stem}{self.other}{s}" for s in suffixes]

    @property
    def partner_hint(self) -> str:
        return f"{self.stem}{self.other}{self.suffix}"


def pair_half(name: str) -> PairHalf | None:
    """The pair half that ``name`` is, or None for a single-file dataset."""
    low = name.lower()
    suffix = next((name[len(name) - len(s):] for s in DATASET_SUFFIXES if low.endswith(s)), None)
    if suffix is None:
        return None
    base = name[: len(name) - len(suffix)]
    for half in HALVES:
        if base.lower().endswith("." + half) and len(base) > len(half) + 1 or base.lower().endswith("/" + half):
            return PairHalf(name, half, base[: len(base) - len(half)], suffix)
    return None
