"""What a dataset check says: each :class:`Issue` (code, line, field, message), the :class:`Report`
with its verdict and statistics, and the :class:`IssueLog` that keeps true totals while listing only
the first few of each kind (a million bad lines must not become a million objects)."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    code: str
    message: str
    line: int | None = None
    field: str | None = None
    file: str | None = None  # set where a dataset is two files (a train/test pair)

    def to_dict(self) -> dict:
        out = {"line": self.line, "code": self.code, "message": self.message, "field": self.field}
        if self.file is not None:
            out["file"] = self.file
        return out

    def __str__(self) -> str:
        where = [self.file] if self.file else []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix + ': ' if prefix else ''}{self.message} ({self.code})"


@dataclass
class Report:
    accepted: bool
    errors: list[Issue]
    warnings: list[Issue]
    stats: dict
    error_count: int = 0
    warning_count: int = 0
    source: str = "dataset"

    def __post_init__(self) -> None:
        # The counts are true totals; the lists may be capped but never hold more than counted.
        self.error_count = max(self.error_count, len(self.errors))
        self.warning_count = max(self.warning_count, len(self.warnings))

    def to_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "errors": [i.to_dict() for i in self.errors],
            "warnings": [i.to_dict() for i in self.warnings],
            "stats": self.stats,
            "error_count": self.error_count,
            "warning_count": self.warning_count,
        }

    def reject(self, issue: Issue) -> None:
        """Add an error found outside the file (a bad override): listed first, the verdict rejected."""
        self.errors.insert(0, issue)
        self.error_count += 1
        by_code = self.stats.setdefault("errors_by_code", {})
        by_code[issue.code] = by_code.get(issue.code, 0) + 1
        self.accepted = False

    def summary(self, limit: int = 5) -> str:
        """A few lines for a CLI or a webhook: verdict, counts, the first errors (or warnings)."""
        s = self.stats
        verdict = "accepted" if self.accepted else "REJECTED"
        head = (
            f"{self.source}: {verdict}: {plural(self.error_count, 'error')}, "
            f"{plural(self.warning_count, 'warning')}; "
            f"{plural(s.get('lines', 0), 'line')}, {plural(s.get('examples', 0), 'valid example')}"
        )
        if s.get("invalid_examples"):
            head += f", {s['invalid_examples']:,} invalid"
        out = [head + "."]
        test = s.get("test")
        if test:
            out.append(f"  test file {test['file']}: {plural(test.get('examples', 0), 'valid example')}"
                       + (f", {test['in_train']:,} also in the train file" if test.get("in_train") else ""))
        tok = s.get("tokens")
        if tok and tok.get("examples"):
            line = (f"  tokens per example: min {tok['min']:,} / median {tok['median']:,} / p95 {tok['p95']:,} / "
                    f"max {tok['max']:,}; total {tok['total']:,} ({tok['method']})")
            if tok.get("over_max_seq_length"):
                line += f"; {tok['over_max_seq_length']:,} over max_seq_length={tok['max_seq_length']:,}"
            out.append(line)
        if s.get("training"):
            from shared.tokens import estimate_line

            out.append("  " + estimate_line(s["training"]))
        ev = s.get("evaluation")
        if ev:
            out.append(f"  evaluation: a seeded sample of {ev['evaluated']:,} of the {ev['held_out']:,} held-out "
                       "examples (TUNEDROP_MAX_EVAL_EXAMPLES)" if ev["sampled"] else
                       f"  evaluation: all {plural(ev['held_out'], 'held-out example')}")
        shown, total, kind = (
            (self.errors, self.error_count, "errors") if self.errors or self.error_count
            else (self.warnings, self.warning_count, "warnings")
        )
        limit = max(0, limit)
        for issue in shown[:limit]:
            out.append(f"  {issue}")
        rest = total - min(limit, len(shown))
        if rest > 0:
            left = dict(s.get(f"{kind}_by_code") or {})
            for issue in shown[:limit]:
                if left.get(issue.code):
                    left[issue.code] -= 1
            detail = ", ".join(f"{c}: {n:,}" for c, n in sorted(left.items(), key=lambda kv: -kv[1]) if n > 0)
            out.append(f"  ... and {rest:,} more {kind}" + (f" ({detail})" if detail else ""))
        return "\n".join(out)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class IssueLog:
    """Errors and warnings as they are found: every one counted by code, the first ``max_errors`` /
    ``max_warnings`` kept in full."""

    __slots__ = ("errors", "warnings", "error_count", "warning_count", "errors_by_code", "warnings_by_code",
                 "max_errors", "max_warnings")

    def __init__(self, max_errors: int = 50, max_warnings: int | None = None) -> None:
        self.max_errors = max(0, max_errors)
        self.max_warnings = self.max_errors if max_warnings is None else max(0, max_warnings)
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.error_count = 0
        self.warning_count = 0
        self.errors_by_code: dict[str, int] = {}
        self.warnings_by_code: dict[str, int] = {}

    def error(self, code: str, message: str, line: int | None = None, field: str | None = None) -> None:
        self.error_count += 1
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        if len(self.errors) < self.max_errors:
            self.errors.append(Issue(code, message, line, field))

    def warning(self, code: str, message: str, line: int | None = None, field: str | None = None) -> None:
        self.warning_count += 1
        self.warnings_by_code[code] = self.warnings_by_code.get(code, 0) + 1
        if len(self.warnings) < self.max_warnings:
            self.warnings.append(Issue(code, message, line, field))

    def first(self, code: str, message: str, line: int | None = None) -> None:
        """A file- or dataset-level error: always listed, first, so that the cap never hides it."""
        self.error_count += 1
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        if self.max_errors:
            self.errors.insert(0, Issue(code, message, line))
            del self.errors[self.max_errors:]


class LineFault(Exception):
    """A line that is not a row: it is counted invalid and reading goes on."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


class FileFault(Exception):
    """The file as a whole is not a dataset (compressed, UTF-16, damaged): reading stops."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line = code, message, line


def json_type(v) -> str:
    """What kind of JSON value ``v`` is, as a message says it ("a string", "null", ...)."""
    if v is None:
        return "null"
    if v is True or v is False:
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__  # pragma: no cover


def short(v, n: int = 40) -> str:
    """A value quoted in a message, cut to ``n`` characters."""
    r = repr(v) if isinstance(v, str) else json.dumps(v, default=str)[: n + 10]
    return r if len(r) <= n else r[: n - 3] + "..."
