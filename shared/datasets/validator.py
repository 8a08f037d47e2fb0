"""The streaming engine: a dataset's byte chunks in, one :class:`Report` out, in bounded memory.

    chunks -> reader (formats: gunzip, Parquet) -> lines -> strict JSON -> rows (typed or general)
           -> rules -> counted (stats, duplicates, tokens) -> report

Every module it drives does one of those jobs; this one keeps the per-file state (line numbers,
blank runs, counts) and turns the readers' faults into issues.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from shared.datasets import limits
from shared.datasets.formats import FORMATS, GzipReader, ParquetReader, detect_format, read_chunks
from shared.datasets.limits import READING_CODES, DatasetLimitError, bound
from shared.datasets.lines import LineSplitter
from shared.datasets.report import FileFault, IssueLog, LineFault, Report, plural
from shared.datasets.rows import RowReader, typed_loads
from shared.datasets.rules import ROLES
from shared.datasets.stats import DEDUP_CAP, HashTable, Sizes
from shared.datasets.strict_json import parse_line
from shared.datasets.token_count import TokenCounter


class Validator:
    """One file's check. ``track=False`` skips statistics (reading rows for training);
    ``collect=True`` keeps each valid conversation in ``out`` for the caller to drain;
    ``typed=False`` sends every row through the general path (the tests compare the two);
    ``train`` is the validator of a pair's train file, when this one reads its test file.
    The ``max_*`` limits (:mod:`limits`; None or 0: none) stop the reading at the first piece past
    them, but for the duplicate share, which is a verdict on the whole file."""

    def __init__(
        self,
        *,
        min_examples: int = 10,
        max_errors: int = 50,
        max_warnings: int | None = None,
        max_line_bytes: int = 1_048_576,
        max_depth: int = 32,
        collect: bool = False,
        track: bool = True,
        typed: bool = True,
        tokenizer=None,
        max_seq_length: int | None = None,
        train: Validator | None = None,
        max_bytes: int | None = None,
        max_ratio: float | None = None,
        max_examples: int | None = None,
        max_tokens: int | None = None,
        max_duplicate_share: float | None = None,
    ) -> None:
        self.min_examples = min_examples
        self.max_bytes, self.max_ratio = bound(max_bytes), bound(max_ratio)
        self.max_examples, self.max_tokens = bound(max_examples), bound(max_tokens)
        self.max_duplicate_share = bound(max_duplicate_share) if track else None
        # Past this many duplicates the share is over the limit however the file goes on (or it is over
        # max_examples): reading may stop there.
        self.max_duplicates = (int(self.max_duplicate_share * self.max_examples)
                               if self.max_duplicate_share is not None and self.max_examples is not None else None)
        self.max_depth = max(1, max_depth)
        self.collect = collect
        self.track = track
        self.typed = typed
        self.train = train
        self.log = IssueLog(max_errors, max_warnings)
        self.rows = RowReader(self.log, track)
        self.lines = LineSplitter(max_line_bytes, self._line, self._too_long)
        self.tokens = TokenCounter(tokenizer, max_seq_length) if tokenizer is not None and track else None
        self.out: list[list[dict]] = []

        self.format = "jsonl"
        self.reader: GzipReader | ParquetReader | None = None
        self.fatal = False
        self.fault: FileFault | None = None
        self.lineno = 0
        self.blank_lines = 0
        self.blank_run: tuple[int, int] | None = None  # (first line, count) of blank lines not yet followed
        self.examples = 0
        self.invalid = 0
        self.role_counts = dict.fromkeys(ROLES, 0)
        self.chars = Sizes()  # characters per example
        self.duplicates = 0
        self.in_train = 0
        self.seen = HashTable(DEDUP_CAP) if track else None

    # -- reading ---------------------------------------------------------------------------------

    def drive(self, chunks: Iterable[bytes], format: str) -> Iterator[None]:
        """Read ``chunks`` of ``format``; yields after each piece, so that a caller can drain ``out``."""
        if format not in FORMATS:
            raise ValueError(f"format {format!r}: use one of {', '.join(FORMATS)}")
        self.format = format
        check = (self.max_examples, self.max_tokens, self.max_duplicates) != (None, None, None)
        try:
            if format == "parquet":
                self.reader = ParquetReader(chunks, max_bytes=self.max_bytes, max_ratio=self.max_ratio,
                                            max_rows=self.max_examples)
                for batch in self.reader:
                    for row in batch:
                        self.lineno += 1
                        self._counted(self.lineno, self.rows.general(row, self.lineno, False))
                    if check:
                        self._within_limits()
                    yield
            else:
                if format == "jsonl.gz":
                    self.reader = GzipReader(chunks, self.max_ratio)
                    chunks = self.reader
                max_bytes, lines = self.max_bytes, self.lines
                for chunk in chunks:
                    if max_bytes is not None and lines.read + len(chunk) > max_bytes:
                        raise limits.too_large(max_bytes, lines.read + len(chunk), format == "jsonl.gz")
                    lines.feed(chunk)
                    if check:
                        self._within_limits()
                    yield
                lines.finish()
                if check:
                    self._within_limits()
        except FileFault as fault:
            self.stop(fault)

    def _within_limits(self) -> None:
        """The limits checked while reading, after each piece: FileFault past one."""
        if self.max_examples is not None and self.examples > self.max_examples:
            raise limits.too_many_examples(self.max_examples, self.examples)
        if self.max_tokens is not None and self.tokens is not None and self.tokens.total > self.max_tokens:
            raise limits.too_many_tokens(self.max_tokens, self.tokens.total)
        if self.max_duplicates is not None and self.duplicates > self.max_duplicates:
            raise limits.too_many_duplicates(self.max_duplicate_share, self.duplicates, self.examples, self.max_examples)

    def stop(self, fault: FileFault) -> None:
        """A file-level error: reading stops, nothing after it would mean anything."""
        self.log.first(fault.code, fault.message, fault.line)
        self.fatal = True
        self.fault = fault

    def _too_long(self, length: int, newline: bool) -> None:
        """A line over the limit, seen only as a length: it was never held whole."""
        self.lineno += 1
        self._flush_blank_run()
        self._line_too_long(length, self.lineno)

    def _line_too_long(self, length: int, ln: int) -> None:
        self.invalid += 1
        self.log.error("line_too_long", f"line is {length:,} bytes, over the {self.lines.max_line:,}-byte limit: "
                       "split or shorten the conversation (or check that the file really has one JSON object "
                       "per line)", ln)

    def _flush_blank_run(self) -> None:
        run = self.blank_run
        if run is not None:
            self.blank_run = None
            first, count = run
            where = f"line {first}" if count == 1 else f"lines {first}-{first + count - 1}"
            self.log.warning("blank_line", f"{plural(count, 'blank line')} in the middle of the file ({where}): "
                             f"remove {'it' if count == 1 else 'them'}", first)

    def _line(self, buf: bytes, start: int, end: int, newline: bool) -> None:
        """The line ``buf[start:end]`` (without its newline)."""
        self.lineno += 1
        ln = self.lineno
        if end > start and buf[end - 1] == 13:  # \r
            end -= 1
        if self.typed and end - start <= self.lines.max_line:
            try:
                row = typed_loads(memoryview(buf)[start:end])
            except Exception:  # not the documented shape, or not valid: the general path says which
                row = None
            if row is not None:
                if self.blank_run is not None:
                    self._flush_blank_run()
                conversation = self.rows.typed(row, buf, start, end, ln)
                if conversation is not None:
                    self._counted(ln, conversation)
                    return
        raw = buf[start:end]
        if not raw or raw.isspace():
            self.blank_lines += 1
            self.blank_run = (ln, 1) if self.blank_run is None else (self.blank_run[0], self.blank_run[1] + 1)
            return
        if self.blank_run is not None:
            self._flush_blank_run()
        if len(raw) > self.lines.max_line:
            self._line_too_long(len(raw), ln)
            return
        try:
            obj, escapes = parse_line(raw, self.max_depth)
        except LineFault as fault:
            self.invalid += 1
            self.log.error(fault.code, fault.message, ln, fault.field)
            return
        except FileFault as fault:  # the line says the whole file is not text
            fault.line = ln
            raise
        self._counted(ln, self.rows.general(obj, ln, escapes))

    # -- a valid example -------------------------------------------------------------------------

    def _counted(self, ln: int, conversation: tuple) -> None:
        """Count one row's verdict: an invalid row, or a valid example's stats, tokens and duplicates."""
        if not conversation:
            self.invalid += 1
            return
        roles, contents = conversation
        self.examples += 1
        if roles[-1] != "assistant":
            self.log.warning("last_message_not_assistant", f"conversation ends with a {roles[-1]} message, which "
                             "teaches nothing: end with the assistant's reply or drop the trailing turns",
                             ln, f"messages[{len(roles) - 1}].role")
        if self.collect:
            self.out.append([{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)])
        if not self.track:
            return
        rc = self.role_counts
        for r in ROLES:
            rc[r] += roles.count(r)
        self.chars.add(sum(map(len, contents)))
        if self.tokens is not None:
            self.tokens.add(ln, contents)
        h = hash((tuple(roles), tuple(contents))) & 0xFFFFFFFFFFFFFFFF or 1
        first = self.seen.add(h, ln)
        if first:
            self.duplicates += 1
            self.log.warning("duplicate_conversation", f"same conversation as line {first}: remove one copy",
                             ln, "messages")
        if self.train is not None and self.train.seen is not None:
            first = self.train.seen.get(h)
            if first:
                self.in_train += 1
                self.log.warning("test_in_train", f"same conversation as line {first} of the train file: the test "
                                 "loss would reward memorising it; remove it from one of the two files", ln, "messages")

    # -- the verdict -----------------------------------------------------------------------------

    def report(self, source: str) -> Report:
        log = self.log
        tokens = self.tokens.stats(log) if self.tokens is not None and not self.fatal else None
        if self.tokens is not None and self.fatal:
            self.tokens.close()  # batches still being counted on other threads: dropped
        read = self.reader.bytes if isinstance(self.reader, ParquetReader) else self.lines.read
        if not self.fatal:
            if tokens is not None and self.max_tokens is not None and tokens["total"] > self.max_tokens:
                log.first("too_many_tokens", limits.too_many_tokens(self.max_tokens, tokens["total"], False).message)
            share = self.max_duplicate_share
            if share is not None and self.examples and self.duplicates > share * self.examples:
                log.first("too_many_duplicates", limits.too_many_duplicates(share, self.duplicates, self.examples).message)
            if self.lineno - self.blank_lines == 0:
                what = ("file is empty" if read == 0 else "file has no rows" if self.format == "parquet"
                        else "file holds only blank lines")
                log.first("empty_file", f"{what}: upload a dataset with one conversation per line (row)")
            elif self.examples < self.min_examples:
                log.first("too_few_examples", f"only {plural(self.examples, 'valid example')} found "
                          f"({self.invalid:,} invalid); at least {self.min_examples:,} are needed"
                          + (": fix the errors listed" if self.invalid else ": add more conversations"))
        rows = self.rows
        stats = {
            "bytes": read if not self.fatal else self._bytes_done(),
            "lines": self.lineno,
            "blank_lines": self.blank_lines,
            "examples": self.examples,
            "invalid_examples": self.invalid,
            "messages": dict(self.role_counts),
            "chars_per_example": {
                "min": self.chars.min,
                "median": self.chars.median_p95()[0],
                "max": self.chars.max,
                "median_exact": self.chars.exact,
            },
            "duplicates": self.duplicates,
            **({"in_train": self.in_train} if self.train is not None else {}),
            "duplicate_check_complete": not (self.seen is not None and self.seen.full),
            "unknown_message_keys": dict(rows.unknown_keys, **(
                {"(other)": rows.unknown_keys_other} if rows.unknown_keys_other else {})),
            "errors_by_code": dict(log.errors_by_code),
            "warnings_by_code": dict(log.warnings_by_code),
            "stopped_early": self.fatal,
        }
        if tokens is not None:
            stats["tokens"] = tokens
        if self.format != "jsonl":
            stats["format"] = self.format
            if isinstance(self.reader, GzipReader):
                stats["compressed_bytes"] = self.reader.compressed_bytes
            elif isinstance(self.reader, ParquetReader) and self.reader.decoded:
                stats["decoded_bytes"] = self.reader.decoded
        return Report(accepted=log.error_count == 0, errors=list(log.errors), warnings=list(log.warnings), stats=stats,
                      error_count=log.error_count, warning_count=log.warning_count, source=source)

    def _bytes_done(self) -> int:
        """Bytes up to the last row read, when reading stopped early."""
        if isinstance(self.reader, ParquetReader):
            return self.reader.bytes if self.reader.rows else 0
        return self.lines.done


# --------------------------------------------------------------------------------------------
# Public entry points


def validate_chunks(
    chunks: Iterable[bytes],
    *,
    source: str = "dataset",
    format: str = "jsonl",
    min_examples: int = 10,
    max_errors: int = 50,
    max_line_bytes: int = 1_048_576,
    max_depth: int = 32,
    max_warnings: int | None = None,
    tokenizer=None,
    max_seq_length: int | None = None,
    **limit_options,
) -> Report:
    """Validate a chat dataset given as byte chunks of any size; memory stays bounded.

    ``format`` is one of :data:`FORMATS` (see :func:`detect_format`). ``max_warnings`` defaults
    to ``max_errors``. The counts in the report are true totals even where the lists are capped.
    Stops reading early only on a file-level error (compressed, UTF-16 or binary file, damaged
    gzip or Parquet, a limit passed). With a ``tokenizer`` (see :mod:`shared.tokens`), tokens per
    example are counted in batches and examples over ``max_seq_length`` draw one ``too_long`` warning.
    ``limit_options``: the dataset limits, :data:`limits.OPTIONS` (``max_bytes``, ``max_ratio``,
    ``max_examples``, ``max_tokens``, ``max_duplicate_share``); none by default, check_dataset's
    come from the settings.
    """
    unknown = set(limit_options) - set(limits.OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}")
    return check_file(chunks, source, format, dict(
        min_examples=min_examples, max_errors=max_errors, max_warnings=max_warnings, max_line_bytes=max_line_bytes,
        max_depth=max_depth, tokenizer=tokenizer, max_seq_length=max_seq_length, **limit_options))[1]


def check_file(chunks, source: str, format: str, options: dict, train: Validator | None = None):
    """(the validator, its report) of one file; ``train`` is the validator of a pair's train file."""
    v = Validator(train=train, **options)
    for _ in v.drive(chunks, format):
        pass
    return v, v.report(source)


def validate_path(path, *, chunk_size: int = 1 << 20, **kw) -> Report:
    """Validate a file on disk, read in ``chunk_size`` pieces. Takes validate_chunks' keywords;
    the format defaults to the one the file name says (:func:`detect_format`)."""
    kw.setdefault("source", os.path.basename(os.fspath(path)) or "dataset")
    kw.setdefault("format", detect_format(os.fspath(path)))
    return validate_chunks(read_chunks(path, chunk_size), **kw)


def iter_conversations(
    chunks: Iterable[bytes], *, format: str = "jsonl", max_line_bytes: int = 1_048_576, max_depth: int = 32,
    max_bytes: int | None = None, max_ratio: float | None = None, max_examples: int | None = None,
) -> Iterator[list[dict]]:
    """Yield the normalized messages ``[{"role", "content"}, ...]`` of each valid row, in order.

    Rows that validation would reject are skipped (validate first); ``weight`` and other message
    keys are dropped. Memory is bounded by the chunk size (a Parquet row group). Past a limit
    (size, compression ratio, examples: :mod:`shared.datasets.limits`) it raises
    :class:`DatasetLimitError`, having yielded no row of the piece that passed it.
    """
    v = Validator(min_examples=0, max_errors=0, max_warnings=0, max_line_bytes=max_line_bytes,
                  max_depth=max_depth, collect=True, track=False, max_bytes=max_bytes, max_ratio=max_ratio,
                  max_examples=max_examples)
    for _ in v.drive(chunks, format):
        if v.out:
            out, v.out = v.out, []
            yield from out
    if v.fault is not None and v.fault.code in READING_CODES:
        raise DatasetLimitError(v.fault.code, v.fault.message)
    if v.out:
        yield from v.out
