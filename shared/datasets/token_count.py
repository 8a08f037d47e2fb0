"""Tokens per example, counted in batches with the target model's tokenizer (:mod:`shared.tokens`),
and the one ``too_long`` warning for examples over ``max_seq_length``."""

from __future__ import annotations

import os
from collections import deque

from shared.datasets.report import IssueLog, plural
from shared.datasets.stats import Sizes

#: Message texts being encoded at once, split between the counting threads (see :func:`counting_threads`):
#: 512 a call on 2 cores. The encodings of a batch are what counting holds in memory (about 10 MB per 1,000
#: texts of the benchmark's rows, each thread's own malloc arena keeping its peak), so this bounds it;
#: batches of 512 count as fast as batches of 8,192.
TOKEN_BATCH = 1024


def counting_threads() -> int:
    """Threads that count at once with a tokenizer whose ``count`` releases the GIL: one per core this
    process may run on (1: the validator's own thread counts, as it parses)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _message_overhead() -> int:
    from shared.tokens import MESSAGE_OVERHEAD

    return MESSAGE_OVERHEAD


class TokenCounter:
    """Tokens per example, in batches of about :data:`TOKEN_BATCH` message texts.

    With a tokenizer that counts outside the GIL (``tokenizer.threads``, the fast tokenizer) and more
    than one core, batches of ``TOKEN_BATCH / cores`` texts are counted on a pool of one thread per
    core while the caller goes on parsing, at most two batches per thread in flight (their texts; the
    encodings of one batch per thread, TOKEN_BATCH texts' in all, as one serial batch). Results are taken in
    order, so every figure (and the first line over max_seq_length) is what serial counting gives;
    only ``total`` lags by the batches in flight until :meth:`stats` or :meth:`kept_so_far`.
    """

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
        self.threads = counting_threads() if getattr(tokenizer, "threads", False) else 1
        self.batch = max(1, TOKEN_BATCH // self.threads)
        self._pool = None  # a ThreadPoolExecutor while batches are in flight
        self._inflight: deque = deque()  # (pending, future of its counts), oldest first

    def add(self, ln: int, contents: list[str]) -> None:
        self.pending.append((ln, contents))
        self.pending_texts += len(contents)
        if self.pending_texts >= self.batch:
            self._count()

    def kept_so_far(self) -> int:
        """Tokens of every example added, each cut to max_seq_length (what an epoch trains, as counted here)."""
        self._finish()
        return self.kept

    def close(self) -> None:
        """Drop the batches not yet counted and end the counting threads (once the batches they are on are
        done, a fraction of a second): none outlives the validation."""
        pool, self._pool = self._pool, None
        self._inflight.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self) -> None:
        """Count what is pending, wait for every batch in flight, stop the threads."""
        if self.pending:
            self._count()
        inflight = self._inflight
        try:
            while inflight:
                pending, future = inflight.popleft()
                self._tally(pending, future.result())
        finally:
            self.close()

    def _count(self) -> None:
        pending, self.pending, self.pending_texts = self.pending, [], 0
        texts = [t for _, contents in pending for t in contents]
        if self.threads == 1:
            self._tally(pending, self.tokenizer.count(texts))
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tunedrop-tokens")
        inflight = self._inflight
        inflight.append((pending, self._pool.submit(self.tokenizer.count, texts)))
        while len(inflight) > 2 * self.threads:
            pending, future = inflight.popleft()
            self._tally(pending, future.result())

    def _tally(self, pending: list[tuple[int, list[str]]], counts: list[int]) -> None:
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
        self._finish()
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
