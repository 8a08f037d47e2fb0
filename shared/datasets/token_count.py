"""Tokens per example, counted in batches with the target model's tokenizer (:mod:`shared.tokens`),
and the one ``too_long`` warning for examples over ``max_seq_length``."""

from __future__ import annotations

from shared.datasets.report import IssueLog, plural
from shared.datasets.stats import Sizes

#: Message texts per tokenizer call (a fast tokenizer encodes a batch in parallel).
TOKEN_BATCH = 2048


def _message_overhead() -> int:
    from shared.tokens import MESSAGE_OVERHEAD

    return MESSAGE_OVERHEAD


class TokenCounter:
    def __init__(self, tokenizer, max_seq_length: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pending: list[tuple[int, list[str]]] = []  # (line, contents) not yet counted
        self.pending_texts = 0
        self.sizes = Sizes()
        self.total = 0
        self.kept = 0  # after truncation to max_seq_length
        self.over = 0
        self.first_over: int | None = None

    def add(self, ln: int, contents: list[str]) -> None:
        self.pending.append((ln, contents))
        self.pending_texts += len(contents)
        if self.pending_texts >= TOKEN_BATCH:
            self._count()

    def kept_so_far(self) -> int:
        """Tokens of every example added, each cut to max_seq_length (what an epoch trains, as counted here)."""
        if self.pending:
            self._count()
        return self.kept

    def _count(self) -> None:
        pending, self.pending, self.pending_texts = self.pending, [], 0
        counts = self.tokenizer.count([t for _, contents in pending for t in contents])
        overhead = _message_overhead()
        limit = self.max_seq_length
        i = 0
        for ln, contents in pending:
            k = len(contents)
            n = sum(counts[i:i + k]) + overhead * k
            i += k
            self.total += n
            self.sizes.add(n)
            if limit and n > limit:
                self.over += 1
                if self.first_over is None:
                    self.first_over = ln
                n = limit
            self.kept += n

    def stats(self, log: IssueLog) -> dict:
        """The token statistics of every example added; warns ``too_long`` into ``log``."""
        if self.pending:
            self._count()
        tok = self.sizes
        if self.over:
            one = self.over == 1
            log.warning(
                "too_long",
                f"{plural(self.over, 'example')} (the first on line {self.first_over}) {'is' if one else 'are'} "
                f"longer than max_seq_length={self.max_seq_length:,} tokens (longest: {tok.max:,}): "
                f"{'it' if one else 'they'} will be truncated; shorten or split {'it' if one else 'them'}, "
                "or raise max_seq_length",
                self.first_over, "messages",
            )
        median, p95 = tok.median_p95()
        return {
            "method": self.tokenizer.method,
            "exact": bool(getattr(self.tokenizer, "exact", False)),
            "examples": tok.seen,
            "min": tok.min,
            "median": median,
            "p95": p95,
            "max": tok.max,
            "total": self.total,
            "total_kept": self.kept,
            "max_seq_length": self.max_seq_length,
            "over_max_seq_length": self.over,
            "sampled": not tok.exact,
        }
