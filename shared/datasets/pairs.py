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

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from shared.datasets.report import Report
from shared.datasets.validator import check_file

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


def validate_pair(train: Iterable[bytes], test: Iterable[bytes], *, train_source: str = "train",
                  test_source: str = "test", train_format: str = "jsonl", test_format: str = "jsonl",
                  min_examples: int = 10, **options) -> Report:
    """Validate a train/test pair (used as given): the train file as :func:`validate_chunks` does,
    the test file needing one example (the duplicate share is the train file's), and each test
    conversation looked up among the train file's (``test_in_train``). One report: its issues name
    their file, its stats are the train file's with the test file's under ``stats["test"]``."""
    options = {"max_errors": 50, **options}
    train_v, train_report = check_file(train, train_source, train_format, {**options, "min_examples": min_examples})
    # The test file needs one example, and may repeat itself: what is trained on is the train file's.
    _, test_report = check_file(test, test_source, test_format, {**options, "min_examples": 1,
                                                                 "max_duplicate_share": None}, train=train_v)
    cap = max(0, options["max_errors"])
    cap_warnings = cap if options.get("max_warnings") is None else max(0, options["max_warnings"])

    def named(issues, file):
        return [dataclasses.replace(i, file=file) for i in issues]

    by_code = {}
    for kind in ("errors_by_code", "warnings_by_code"):
        merged = dict(train_report.stats.get(kind) or {})
        for code, n in (test_report.stats.get(kind) or {}).items():
            merged[code] = merged.get(code, 0) + n
        by_code[kind] = merged
    test_stats = {k: test_report.stats[k] for k in ("bytes", "lines", "examples", "invalid_examples", "messages",
                                                    "duplicates", "in_train") if k in test_report.stats}
    if "tokens" in test_report.stats:
        test_stats["tokens"] = test_report.stats["tokens"]
    return Report(
        accepted=train_report.accepted and test_report.accepted,
        errors=(named(train_report.errors, train_source) + named(test_report.errors, test_source))[:cap],
        warnings=(named(train_report.warnings, train_source) + named(test_report.warnings, test_source))[:cap_warnings],
        stats={**train_report.stats, **by_code, "test": {"file": test_source, **test_stats}},
        error_count=train_report.error_count + test_report.error_count,
        warning_count=train_report.warning_count + test_report.warning_count,
        source=f"{train_source} + {test_source}",
    )
