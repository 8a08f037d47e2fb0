"""Streaming validation of chat fine-tuning datasets (JSONL), in bounded memory.

A dataset is checked before a paid fine-tune is started. Two row shapes are accepted:

* the seed's ultrachat rows: ``{"prompt": str, "prompt_id": str, "messages": [...]}``;
* OpenAI chat fine-tuning rows: ``{"messages": [...]}``, an optional ``system`` message
  first and an optional per-message ``weight`` of 0 or 1.

Each message is ``{"role": "system" | "user" | "assistant", "content": str}``. Other top-level
keys are allowed silently; other keys inside a message draw a warning (they are ignored).

The input is any iterable of byte chunks (a blob download stream, a file read in pieces):
lines may straddle chunks, are split here without joining the whole file, and a line over
``max_line_bytes`` is counted and skipped without being held whole. Every problem is an
:class:`Issue` with a stable snake_case ``code``, the 1-based ``line``, a ``field`` path such as
``messages[2].role`` and a message that says what to do. The dataset is rejected iff there is
any error. :data:`CODES` lists every code with its meaning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from array import array
from dataclasses import dataclass
from itertools import islice, repeat
from operator import eq
from typing import Any, Iterable, Iterator, Literal

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "CODES",
    "FORMATS",
    "detect_format",
    "ERROR_CODES",
    "WARNING_CODES",
    "Issue",
    "Report",
    "iter_conversations",
    "validate_chunks",
    "validate_pair",
    "validate_path",
]

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset(("role", "content", "weight"))

#: Every code an error can carry, with what it means.
ERROR_CODES: dict[str, str] = {
    # file level
    "empty_file": "The file is empty or holds only blank lines.",
    "compressed_file": "The file is compressed (gzip, zip, zstd, bzip2, xz, 7z), not plain JSONL.",
    "utf16_file": "The file starts with a UTF-16/UTF-32 byte-order mark instead of being UTF-8.",
    "binary_file": "The file holds NUL bytes: it is UTF-16 without a byte-order mark, or binary.",
    "corrupt_gzip": "A .jsonl.gz file is not gzip, or its compressed stream is damaged or cut short.",
    "invalid_parquet": "A .parquet file cannot be read as Parquet (damaged, cut short, or another format).",
    "no_messages_column": "A Parquet file has no \"messages\" column.",
    "parquet_unavailable": "Parquet support (pyarrow) is not installed where the validator runs.",
    # line level: syntax
    "line_too_long": "A line is longer than max_line_bytes; it was skipped unread.",
    "invalid_utf8": "A line is not valid UTF-8.",
    "nesting_too_deep": "A line's JSON nests arrays/objects deeper than max_depth.",
    "invalid_json": "A line is not one valid JSON value (RFC 8259).",
    "non_finite_number": "A line uses NaN, Infinity or -Infinity, which JSON does not allow.",
    "duplicate_key": "An object on the line has the same key twice.",
    "lone_surrogate": "A content string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).",
    # line level: row shape
    "not_an_object": "The line's JSON value is not an object.",
    "missing_messages": "The row has no \"messages\" key.",
    "messages_not_list": "\"messages\" is not an array.",
    "empty_messages": "\"messages\" is an empty array.",
    "message_not_object": "A message is not an object.",
    "missing_role": "A message has no \"role\".",
    "role_not_string": "A message's role is not a string.",
    "unknown_role": "A message's role is not system, user or assistant.",
    "missing_content": "A message has no \"content\".",
    "content_not_string": "A message's content is not a string (null, a number, a list of parts...).",
    "tool_calls_unsupported": "An assistant message carries tool/function calls instead of content.",
    "empty_content": "A message's content is empty or only whitespace.",
    "invalid_weight": "A message's weight is not 0 or 1.",
    "prompt_not_string": "The ultrachat \"prompt\" field is present but not a string.",
    "prompt_id_not_string": "The ultrachat \"prompt_id\" field is present but not a string.",
    # line level: conversation
    "system_not_first": "A system message is not the first message.",
    "multiple_system_messages": "A conversation has more than one system message.",
    "consecutive_same_role": "Two user messages or two assistant messages follow each other.",
    "no_assistant_message": "A conversation has no assistant message: nothing to learn.",
    "all_weights_zero": "Every assistant message has weight 0: nothing to learn.",
    # dataset level
    "too_few_examples": "Fewer valid examples than min_examples.",
    "bad_override": "A training-parameter override (blob metadata `tunedrop_<param>`, the sidecar "
    "`<name>.tunedrop.json`, or TUNEDROP_TRAINING_OVERRIDES) is unknown, has a bad value, or the sidecar "
    "is not a JSON object.",
}

#: Every code a warning can carry, with what it means.
WARNING_CODES: dict[str, str] = {
    "blank_line": "Blank line(s) in the middle of the file (blank lines at the end are fine).",
    "unknown_message_key": "A message has a key other than role, content, weight; it is ignored "
    "(warned once per key name, occurrences counted in stats).",
    "last_message_not_assistant": "A conversation does not end with an assistant message; "
    "the trailing turns teach nothing.",
    "duplicate_conversation": "The same conversation (roles and contents) appeared on an earlier line.",
    "test_in_train": "A conversation of a train/test pair's test file is also in its train file: the test "
    "loss would flatter the model on what it was trained on.",
    "too_long": "Examples longer than max_seq_length tokens of the target model: they will be truncated "
    "(one warning, with the count and the first line).",
}

CODES: dict[str, str] = {**ERROR_CODES, **WARNING_CODES}


# --------------------------------------------------------------------------------------------
# Public data types


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
            f"{self.source}: {verdict}: {_plural(self.error_count, 'error')}, "
            f"{_plural(self.warning_count, 'warning')}; "
            f"{_plural(s.get('lines', 0), 'line')}, {_plural(s.get('examples', 0), 'valid example')}"
        )
        if s.get("invalid_examples"):
            head += f", {s['invalid_examples']:,} invalid"
        out = [head + "."]
        test = s.get("test")
        if test:
            out.append(f"  test file {test['file']}: {_plural(test.get('examples', 0), 'valid example')}"
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


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# JSON parsing helpers (strict RFC 8259)


class _DuplicateKey(Exception):
    pass


class _NonFinite(Exception):
    pass


def _strict_pairs(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey()
    return d


def _reject_constant(name):
    raise _NonFinite(name)


_decode = json.JSONDecoder(object_pairs_hook=_strict_pairs, parse_constant=_reject_constant).decode


# msgspec is strict RFC 8259: it refuses NaN/Infinity, lone surrogate escapes, invalid UTF-8,
# control characters in strings, leading zeros and trailing data; what it lets through that we
# refuse (a key written twice) is checked after it. It keeps the last of duplicated keys silently.
_loads = msgspec.json.Decoder().decode
_dumps = msgspec.json.Encoder().encode


class _TypedMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str
    weight: float | UnsetType = UNSET


class _TypedRow(msgspec.Struct, forbid_unknown_fields=True):
    """The two documented row shapes exactly. A row that decodes into this is checked with no
    dicts built and no depth scan (the schema bounds the depth); anything else takes the general
    path, which says what is wrong."""

    messages: list[_TypedMessage]
    prompt: str | UnsetType = UNSET
    prompt_id: str | UnsetType = UNSET


_typed_loads = msgspec.json.Decoder(_TypedRow).decode

_FAILED = object()
_KEYS_AND_STRINGS = bytes(b for b in range(256) if b not in b'":')


def _shape(obj) -> tuple[int, int]:
    """(keys in all objects, nesting depth of arrays/objects) of a parsed value; no recursion."""
    level = [obj]
    depth = 0
    keys = 0
    while level:
        depth += 1
        below: list = []
        push = below.append
        for v in level:
            if type(v) is dict:
                keys += len(v)
                v = v.values()
            for x in v:
                t = type(x)
                if t is dict or t is list:
                    push(x)
        level = below
    return keys, depth


def _has_duplicate_key(raw, obj) -> bool:
    """True if the JSON text writes a key twice in one object (the parser keeps the last silently).

    Outside strings a colon follows each key and nothing else, so the text's colons are its keys
    plus the colons inside its strings. The compact re-serialisation of the parsed value has
    the parsed keys plus the same in-string colons, unless a colon was written as an escape
    (``\\u003a``): when the text may hold one, the colons outside strings are counted on the text
    itself (escaped backslashes, then escaped quotes, dropped first, as in :func:`_too_deep`).
    """
    colons = raw.count(b":")
    if not colons:
        return False
    if b"u003" not in raw:
        try:
            return colons != _dumps(obj).count(b":")
        except Exception:  # pragma: no cover - e.g. deeper than the encoder goes
            pass
    keys, _ = _shape(obj)
    kept = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _KEYS_AND_STRINGS)
    return b"".join(kept.split(b'"')[::2]).count(b":") != keys


class _Marked(dict):
    """A dict from the diagnostic re-parse that remembers a duplicated key."""

    dup: str | None = None


_BAD_CONSTANT = object()


def _marking_pairs(pairs):
    d = _Marked(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                d.dup = k
                break
            seen.add(k)
    return d


_diagnose = json.JSONDecoder(object_pairs_hook=_marking_pairs, parse_constant=lambda _n: _BAD_CONSTANT).decode


def _path_join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _locate(text: str, want: str) -> tuple[str | None, str | None]:
    """Re-parse a line that failed strict parsing; return (field path, detail) of the first culprit.

    Only called on the error path, after the nesting depth was checked, so the walk is shallow.
    """
    try:
        root = _diagnose(text)
    except Exception:  # pragma: no cover - the strict parse reached the hook, so this parses
        return None, None
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if want == "dup" and isinstance(node, _Marked) and node.dup is not None:
            return _path_join(path, node.dup), node.dup
        if isinstance(node, dict):
            items = list(node.items())
            for k, v in reversed(items):
                if want == "nan" and v is _BAD_CONSTANT:
                    # Report the first one in document order: scan forwards.
                    for k2, v2 in items:
                        if v2 is _BAD_CONSTANT:
                            return _path_join(path, k2), None
                stack.append((v, _path_join(path, k)))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                v = node[i]
                if want == "nan" and v is _BAD_CONSTANT:
                    first = next(j for j, x in enumerate(node) if x is _BAD_CONSTANT)
                    return _path_join(path, first), None
                stack.append((v, _path_join(path, i)))
        elif want == "nan" and node is _BAD_CONSTANT:
            return None, None
    return None, None


_STRUCTURE_ONLY = bytes(b for b in range(256) if b not in b'[]{}"')


def _too_deep(raw: bytes, max_depth: int) -> bool:
    """True if the JSON text nests arrays/objects deeper than max_depth. No recursion, no regex.

    Brackets inside strings are not structure: escaped backslashes and then escaped quotes are
    dropped (left to right, as a JSON reader pairs them), every byte but brackets and quotes is
    dropped, and what lies between quote pairs is string text. What is left outside the strings
    is just the brackets, usually a few dozen, walked in a short loop.
    """
    kept = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _STRUCTURE_ONLY)
    depth = 0
    for c in b"".join(kept.split(b'"')[::2]):
        if c == 91 or c == 123:  # [ {
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _jtype(v) -> str:
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


def _short(v, n: int = 40) -> str:
    r = repr(v) if isinstance(v, str) else json.dumps(v, default=str)[: n + 10]
    return r if len(r) <= n else r[: n - 3] + "..."


_ROLE_HINTS = {
    **dict.fromkeys(
        ("bot", "model", "gpt", "ai", "chatbot", "assistent", "asistant", "assisstant", "assitant",
         "response", "answer", "output", "completion", "chatgpt", "agent", "system_response"),
        "assistant",
    ),
    **dict.fromkeys(("human", "usr", "users", "question", "prompter", "input", "customer", "client",
                     "prompt", "instruction", "query"), "user"),
    **dict.fromkeys(("developer", "sys", "system_prompt", "context"), "system"),
}


def _role_message(role: str) -> str:
    allowed = "use one of: system, user, assistant"
    low = role.strip().lower()
    if low in ROLES:
        return f"unknown role {_short(role)}: roles are lowercase without spaces, use {low!r}"
    if low in ("tool", "function", "ipython"):
        return f"unknown role {_short(role)}: tool/function messages are not supported; {allowed}"
    hint = _ROLE_HINTS.get(low)
    if hint:
        return f"unknown role {_short(role)}: {allowed} (did you mean {hint!r}?)"
    return f"unknown role {_short(role)}: {allowed}"


def _json_error_message(err: json.JSONDecodeError, text: str) -> str:
    msg = f"invalid JSON at column {err.colno}: {err.msg}"
    if text.startswith("\ufeff"):
        return msg + "; a byte-order mark in the middle of the file (concatenated files?): remove it"
    stripped = text.strip()
    if stripped in ("{", "[", "}", "]", "},", "],") or stripped.endswith((",", ":")) and len(stripped) < 200:
        return msg + "; this looks like pretty-printed JSON: JSONL needs each row as one object on one line"
    if stripped.startswith("{'") or stripped.startswith("[{'"):
        return msg + "; single-quoted keys look like a Python dict: write rows with json.dumps"
    if "\r" in stripped:
        return msg + "; the line holds a carriage return (\\r): use \\n line endings"
    if err.msg == "Extra data":
        return msg + "; put exactly one JSON object on each line"
    return msg + "; fix the line so that it is one valid JSON object"


# --------------------------------------------------------------------------------------------
# The streaming engine


class _HashTable:
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


_MISSING = object()
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "name it .jsonl.gz (gzip is accepted under that name), or decompress it"),
    (b"PK\x03\x04", "a zip archive", "extract the .jsonl and upload it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d) and upload the .jsonl"),
    (b"BZh", "bzip2-compressed", "decompress it (bunzip2) and upload the .jsonl"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz) and upload the .jsonl"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract the .jsonl and upload it"),
)
_HEAD = 6  # bytes needed to recognise every magic number above
_RESERVOIR = 200_000  # exact median up to this many examples, a uniform sample beyond
_DEDUP_CAP = 2_000_000  # conversations remembered for duplicate detection (48 MB of table at most)
_UNKNOWN_KEYS_CAP = 100
_TOKEN_BATCH = 2048  # message texts per tokenizer call


def _tok_overhead() -> int:
    from shared.tokens import MESSAGE_OVERHEAD

    return MESSAGE_OVERHEAD


class _Validator:
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
        tokenizer=None,
        max_seq_length: int | None = None,
        train: "_Validator | None" = None,
    ) -> None:
        self.min_examples = min_examples
        self.train = train  # validating a pair's test file: its train file's validator
        self.tokenizer = tokenizer if track else None
        self.max_seq_length = max_seq_length
        self.tok_pending: list[tuple[int, list[str]]] = []  # (line, contents) not yet counted
        self.tok_pending_texts = 0
        self.tok = _Sizes()  # tokens per example
        self.tok_total = 0
        self.tok_kept = 0  # after truncation to max_seq_length
        self.tok_over = 0
        self.tok_first_over: int | None = None
        self.max_errors = max(0, max_errors)
        self.max_warnings = self.max_errors if max_warnings is None else max(0, max_warnings)
        self.max_line = max(1, max_line_bytes)
        self.max_depth = max(1, max_depth)
        self.collect = collect
        self.track = track
        self.out: list[list[dict]] = []

        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.error_count = 0
        self.warning_count = 0
        self.errors_by_code: dict[str, int] = {}
        self.warnings_by_code: dict[str, int] = {}

        self.bytes = 0  # bytes read
        self.done_bytes = 0  # offset just past the last line handled
        self.lineno = 0
        self.blank_lines = 0
        self.blank_run: tuple[int, int] | None = None  # (first line, count) of blank lines not yet followed
        self.examples = 0
        self.invalid = 0
        self.role_counts = {"system": 0, "user": 0, "assistant": 0}
        self.duplicates = 0
        self.in_train = 0
        self.unknown_keys: dict[str, int] = {}
        self.unknown_keys_other = 0
        self.chars = _Sizes()  # characters per example
        self.seen = _HashTable(_DEDUP_CAP) if track else None

        self.format = "jsonl"
        self.compressed_bytes = 0
        self.head: bytes | None = b""  # bytes collected before the magic-number sniff, None after
        self.pend = bytearray()  # the current partial line
        self.skip_len = 0  # > 0 while skipping a too-long line
        self.fatal = False

    # -- issues --------------------------------------------------------------------------

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

    def stop(self, code: str, message: str, line: int | None = None) -> None:
        """A file-level error: reading stops, nothing after it would mean anything."""
        self.dataset_error(code, message, line)
        self.fatal = True
        self.pend = bytearray()
        self.skip_len = 0

    # -- bytes -> lines ----------------------------------------------------------------------

    def feed(self, chunk) -> None:
        if self.fatal:
            return
        if not isinstance(chunk, (bytes, bytearray)):
            if isinstance(chunk, memoryview):
                chunk = chunk.tobytes()
            else:
                raise TypeError(f"chunks must be bytes, got {type(chunk).__name__}")
        if not chunk:
            return
        self.bytes += len(chunk)
        if self.head is not None:
            self.head += chunk
            if len(self.head) < _HEAD:
                return
            chunk = self._sniff()
            if chunk is None:
                return
        self._split(chunk)

    def _sniff(self) -> bytes | None:
        head, self.head = self.head, None
        for magic, what, todo in _MAGIC:
            if head.startswith(magic) and (magic != b"BZh" or head[3:4].isdigit()):
                self.stop("compressed_file", f"file is {what}: {todo}")
                return None
        if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
            self.stop("utf16_file", "file is UTF-16/binary (it starts with a UTF-16/UTF-32 byte-order mark): "
                      "save it as UTF-8 JSONL (one JSON object per line)")
            return None
        if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark: accepted, dropped
            self.done_bytes += 3
            head = head[3:]
        return head

    def _split(self, chunk) -> None:
        chunk = bytes(chunk)  # read in place below, so it must not change under us
        find = chunk.find
        pos = 0
        limit = self.max_line + 1  # +1: a trailing \r is not counted against the limit
        while True:
            nl = find(b"\n", pos)
            if nl < 0:
                break
            seg = nl - pos
            if self.skip_len:
                total = self.skip_len + seg
                self.skip_len = 0
                self._too_long(total, True)
            elif self.pend:
                if len(self.pend) + seg > limit:
                    total = len(self.pend) + seg
                    self.pend = bytearray()
                    self._too_long(total, True)
                else:
                    self.pend += chunk[pos:nl]
                    raw, self.pend = bytes(self.pend), bytearray()
                    self._line(raw, 0, len(raw), True)
            elif seg > limit:
                self._too_long(seg, True)
            else:
                self._line(chunk, pos, nl, True)  # no copy: the line is read in place
            if self.fatal:
                return
            pos = nl + 1
        rest = len(chunk) - pos
        if rest:
            if self.skip_len:
                self.skip_len += rest
            elif len(self.pend) + rest > limit:
                self.skip_len = len(self.pend) + rest
                self.pend = bytearray()
            else:
                self.pend += chunk[pos:]
        # the bytes of a partial line are accounted for when the line completes

    def finish(self) -> None:
        if self.head is not None:  # a file shorter than the sniff window
            chunk = self._sniff()
            if chunk:
                self._split(chunk)
        if self.fatal:
            return
        if self.skip_len:
            total, self.skip_len = self.skip_len, 0
            self._too_long(total, False)
        elif self.pend:
            raw, self.pend = bytes(self.pend), bytearray()
            self._line(raw, 0, len(raw), False)

    # -- one line ----------------------------------------------------------------------------

    def _too_long(self, length: int, newline: bool) -> None:
        """A line over the limit, seen only as a length: it was never held whole."""
        self.lineno += 1
        self.done_bytes += length + newline
        self._flush_blank_run()
        self._line_too_long(length, self.lineno)

    def _line_too_long(self, length: int, ln: int) -> None:
        self.invalid += 1
        self.error(
            "line_too_long",
            f"line is {length:,} bytes, over the {self.max_line:,}-byte limit: split or shorten the "
            f"conversation (or check that the file really has one JSON object per line)",
            ln,
        )

    def _flush_blank_run(self) -> None:
        run = self.blank_run
        if run is not None:
            self.blank_run = None
            first, count = run
            where = f"line {first}" if count == 1 else f"lines {first}-{first + count - 1}"
            self.warning(
                "blank_line",
                f"{_plural(count, 'blank line')} in the middle of the file ({where}): remove "
                f"{'it' if count == 1 else 'them'}",
                first,
            )

    def _nesting_too_deep(self, ln: int) -> None:
        self.invalid += 1
        self.error(
            "nesting_too_deep",
            f"JSON nests arrays/objects more than {self.max_depth} levels deep: "
            f"a chat row needs only 3 (row, messages, message)",
            ln,
        )

    def _line(self, buf: bytes, start: int, end: int, newline: bool) -> None:
        """The line ``buf[start:end]`` (without its newline)."""
        self.lineno += 1
        ln = self.lineno
        self.done_bytes += end - start + newline
        if end > start and buf[end - 1] == 13:  # \r
            end -= 1
        if end - start <= self.max_line:
            try:
                row = _typed_loads(memoryview(buf)[start:end])
            except Exception:  # not the documented shape, or not valid: the general path says which
                row = None
            if row is not None and self._typed_row(row, buf, start, end, ln):
                return
        raw = buf[start:end]
        if not raw or raw.isspace():
            self.blank_lines += 1
            if self.blank_run is None:
                self.blank_run = (ln, 1)
            else:
                self.blank_run = (self.blank_run[0], self.blank_run[1] + 1)
            return
        if self.blank_run is not None:
            self._flush_blank_run()
        if len(raw) > self.max_line:
            self._line_too_long(len(raw), ln)
            return
        if b"\x00" in raw:
            self.stop("binary_file", "file is UTF-16/binary (NUL bytes on this line): save it as UTF-8 JSONL "
                      "(one JSON object per line)", ln)
            return
        try:
            obj = _loads(raw)
        except Exception:  # not valid strict JSON (or too deep): the stdlib path below says exactly what is wrong
            obj = _FAILED
        if obj is not _FAILED:
            if raw.count(b"[") + raw.count(b"{") > self.max_depth and _shape(obj)[1] > self.max_depth:
                self._nesting_too_deep(ln)
                return
            if not _has_duplicate_key(raw, obj):
                # the parser refuses lone surrogates, so no content needs the surrogate check
                self._row(obj, ln, False)
                return
        if raw.count(b"[") + raw.count(b"{") > self.max_depth and _too_deep(raw, self.max_depth):
            self._nesting_too_deep(ln)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.invalid += 1
            self.error(
                "invalid_utf8",
                f"bytes at offset {e.start} are not valid UTF-8 ({bytes(raw[e.start:e.start + 4]).hex(' ')}): "
                f"save the file as UTF-8 (it may be Latin-1/Windows-1252)",
                ln,
            )
            return
        try:
            obj = _decode(text)
        except _DuplicateKey:
            self.invalid += 1
            path, key = _locate(text, "dup")
            self.error(
                "duplicate_key",
                f"key {key!r} appears twice in the same object: JSON keys must be unique, keep one"
                if key is not None else "an object has the same key twice: JSON keys must be unique",
                ln,
                path,
            )
            return
        except _NonFinite as e:
            self.invalid += 1
            path, _ = _locate(text, "nan")
            self.error(
                "non_finite_number",
                f"{e.args[0]} is not valid JSON (RFC 8259): write null or a finite number",
                ln,
                path,
            )
            return
        except json.JSONDecodeError as e:
            self.invalid += 1
            self.error("invalid_json", _json_error_message(e, text), ln)
            return
        except RecursionError:  # pragma: no cover - the depth scan runs first
            self.invalid += 1
            self.error("nesting_too_deep", f"JSON nests too deeply (limit {self.max_depth})", ln)
            return
        except ValueError as e:  # e.g. an integer with more than 4300 digits
            self.invalid += 1
            self.error("invalid_json", f"invalid JSON value: {e}; fix the line", ln)
            return
        self._row(obj, ln, b"\\u" in raw)

    # -- one row -----------------------------------------------------------------------------

    def _row(self, obj, ln: int, escapes: bool) -> None:
        if type(obj) is not dict:
            self.invalid += 1
            if type(obj) is list and obj and all(type(x) is dict for x in obj[:3]):
                hint = ("the line is an array of objects: JSONL needs one object per line "
                        "(is this a .json file? write each row on its own line)")
            else:
                hint = 'each line must be an object like {"messages": [...]}'
            self.error("not_an_object", f"row is {_jtype(obj)}, not an object: {hint}", ln)
            return
        bad = 0
        if "prompt" in obj and type(obj["prompt"]) is not str:
            bad += 1
            self.error("prompt_not_string",
                       f"prompt is {_jtype(obj['prompt'])}: make it a string or drop the key", ln, "prompt")
        if "prompt_id" in obj and type(obj["prompt_id"]) is not str:
            bad += 1
            self.error("prompt_id_not_string",
                       f"prompt_id is {_jtype(obj['prompt_id'])}: make it a string or drop the key",
                       ln, "prompt_id")
        msgs = obj.get("messages", _MISSING)
        if msgs is _MISSING:
            self.invalid += 1
            self.error("missing_messages", _missing_messages_message(obj), ln, "messages")
            return
        if type(msgs) is not list:
            self.invalid += 1
            extra = ""
            if type(msgs) is str and msgs.lstrip().startswith("["):
                extra = " (it is a string holding JSON: store the array itself, not json.dumps of it)"
            self.error("messages_not_list",
                       f"messages is {_jtype(msgs)}, not an array of messages{extra}", ln, "messages")
            return
        if not msgs:
            self.invalid += 1
            self.error("empty_messages", "messages is empty: give at least a user and an assistant message",
                       ln, "messages")
            return

        roles: list[str] = []
        contents: list[str] = []
        chars = 0
        allowed = self.role_counts
        for i, m in enumerate(msgs):
            # Fast path: a plain, well-formed {"role", "content"} message.
            if type(m) is dict and len(m) == 2:
                role = m.get("role")
                content = m.get("content")
                if (type(role) is str and role in allowed and type(content) is str and content
                        and not content.isspace() and not (escapes and not content.isascii())):
                    roles.append(role)
                    contents.append(content)
                    chars += len(content)
                    continue
            errs, role, content = self._message(m, i, ln, escapes)
            if errs:
                bad += errs
            else:
                chars += len(content)
                contents.append(content)
            if role is not None:
                roles.append(role)
        if bad:
            self.invalid += 1
            return

        # Conversation-level rules: every message is well formed here, so roles[i] is msgs[i]'s role.
        n = len(roles)
        if "system" in roles:
            first_sys = roles.index("system")
            if first_sys != 0:
                bad += 1
                self.error("system_not_first",
                           f"system message at position {first_sys}: move it to the start of the "
                           "conversation", ln, f"messages[{first_sys}].role")
            for j in range(first_sys + 1, n):
                if roles[j] == "system":
                    bad += 1
                    self.error("multiple_system_messages",
                               "a second system message: keep one system message, first",
                               ln, f"messages[{j}].role")
        prev = None
        has_assistant = False
        trainable = False
        for j, r in enumerate(roles):
            if r == prev and r != "system":
                bad += 1
                self.error("consecutive_same_role",
                           f"two {r} messages in a row (messages[{j - 1}] and messages[{j}]): "
                           f"merge them or put {'an assistant' if r == 'user' else 'a user'} message between",
                           ln, f"messages[{j}].role")
            if r == "assistant":
                has_assistant = True
                if not trainable:
                    w = msgs[j].get("weight", 1)
                    trainable = w != 0
            prev = r
        if not has_assistant:
            bad += 1
            self.error("no_assistant_message",
                       "no assistant message: nothing to learn; add the assistant's reply",
                       ln, "messages")
        elif not trainable:
            bad += 1
            self.error("all_weights_zero",
                       "every assistant message has weight 0: nothing to learn; set weight 1 on at least one",
                       ln, "messages")
        if bad:
            self.invalid += 1
            return

        self._accept(ln, roles, contents, chars)

    def _typed_row(self, row: _TypedRow, buf: bytes, start: int, end: int, ln: int) -> bool:
        """Accept a row of the documented shape that breaks no rule, as :meth:`_row` would; return
        False, having changed nothing, when anything is off (the general path then reports it).

        Each check runs over the whole conversation at C speed (map, count, any): this path is
        most of the validator's time on a large dataset."""
        msgs = row.messages
        n = len(msgs)
        if not n:
            return False
        roles = [m.role for m in msgs]
        contents = [m.content for m in msgs]
        if (roles[-1] != "assistant" or not all(contents) or any(map(str.isspace, contents))
                or any(map(eq, roles, islice(roles, 1, None)))
                or roles.count("system") > (roles[0] == "system")):
            return False
        strings = 1 + 4 * n  # the key "messages", and in each message two keys and two strings
        weights = [m.weight for m in msgs]
        weighted = n - weights.count(UNSET)
        if weighted:
            if any(w is not UNSET and w != 0 and w != 1 for w in weights):
                return False
            if all(w == 0 for r, w in zip(roles, weights, strict=False) if r == "assistant"):
                return False
            strings += weighted
        ends_in_backslash = sum(map(str.endswith, contents, repeat("\\", n)))
        for extra in (row.prompt, row.prompt_id):
            if extra is not UNSET:
                strings += 2
                ends_in_backslash += extra.endswith("\\")
        # A key written twice is one more string in the text than in the decoded row. The text's
        # quote marks are two per string plus one per escaped quote (\"); the \" pairs are those
        # escaped quotes plus, for each string ending in an escaped backslash (\\"), its closing
        # quote. So the text has exactly `strings` strings iff the equation holds (a backslash or
        # quote escaped as \u005c or \u0022 can only break it, never hide a doubled key).
        quotes = buf.count(b'"', start, end) - buf.count(b'\\"', start, end) + ends_in_backslash
        if quotes != 2 * strings:
            return False
        if self.blank_run is not None:
            self._flush_blank_run()
        self._accept(ln, roles, contents, sum(map(len, contents)))
        return True

    def _accept(self, ln: int, roles: list[str], contents: list[str], chars: int) -> None:
        """Count a valid example: its stats, tokens and duplicate check."""
        self.examples += 1
        if roles[-1] != "assistant":
            self.warning("last_message_not_assistant",
                         f"conversation ends with a {roles[-1]} message, which teaches nothing: "
                         "end with the assistant's reply or drop the trailing turns",
                         ln, f"messages[{len(roles) - 1}].role")
        if self.collect:
            self.out.append([{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)])
        if not self.track:
            return
        rc = self.role_counts
        for r in ROLES:
            rc[r] += roles.count(r)
        self.chars.add(chars)
        if self.tokenizer is not None:
            self.tok_pending.append((ln, contents))
            self.tok_pending_texts += len(contents)
            if self.tok_pending_texts >= _TOKEN_BATCH:
                self._count_tokens()
        h = hash((tuple(roles), tuple(contents))) & 0xFFFFFFFFFFFFFFFF or 1
        first = self.seen.add(h, ln)
        if first:
            self.duplicates += 1
            self.warning("duplicate_conversation",
                         f"same conversation as line {first}: remove one copy", ln, "messages")
        if self.train is not None and self.train.seen is not None:
            first = self.train.seen.get(h)
            if first:
                self.in_train += 1
                self.warning("test_in_train", f"same conversation as line {first} of the train file: the test "
                             "loss would reward memorising it; remove it from one of the two files", ln, "messages")

    def _message(self, m, i: int, ln: int, escapes: bool) -> tuple[int, str | None, str | None]:
        """Check one message in full; return (errors found, its valid role or None, its content)."""
        if type(m) is not dict:
            self.error("message_not_object",
                       f'message is {_jtype(m)}: each message must be {{"role": ..., "content": ...}}',
                       ln, f"messages[{i}]")
            return 1, None, None
        bad = 0
        role = m.get("role", _MISSING)
        content = m.get("content", _MISSING)
        if len(m) > 2 or role is _MISSING or content is _MISSING:
            bad += self._odd_keys(m, i, ln, role, content)
        if role is _MISSING:
            bad += 1
            self.error("missing_role", 'message has no "role": add one of system, user, assistant',
                       ln, f"messages[{i}].role")
            role = None
        elif type(role) is not str:
            bad += 1
            self.error("role_not_string", f"role is {_jtype(role)}: use one of the strings system, user, assistant",
                       ln, f"messages[{i}].role")
            role = None
        elif role not in self.role_counts:
            bad += 1
            self.error("unknown_role", _role_message(role), ln, f"messages[{i}].role")
            role = None
        tool_calls = "tool_calls" in m or "function_call" in m
        if content is _MISSING:
            if not tool_calls:  # with tool calls, _odd_keys reported tool_calls_unsupported
                bad += 1
                self.error("missing_content", 'message has no "content": add the message text',
                           ln, f"messages[{i}].content")
        elif type(content) is not str:
            if not (content is None and tool_calls):
                bad += 1
                self.error("content_not_string", _content_type_message(content), ln, f"messages[{i}].content")
        elif not content or content.isspace():
            bad += 1
            self.error("empty_content", "content is empty or only whitespace: write the message text "
                       "or drop the message", ln, f"messages[{i}].content")
        elif escapes and not content.isascii():
            try:
                content.encode("utf-8")
            except UnicodeEncodeError as e:
                bad += 1
                self.error("lone_surrogate",
                           f"content has an unpaired surrogate escape at character {e.start} "
                           f"(\\u{ord(content[e.start]):04x}): the text was cut inside an emoji or "
                           f"mis-encoded; fix or drop it", ln, f"messages[{i}].content")
        return bad, role, content

    def _odd_keys(self, m: dict, i: int, ln: int, role, content) -> int:
        """Report keys other than role/content/weight; return how many errors that made."""
        bad = 0
        for key in m:
            if key in MESSAGE_KEYS:
                continue
            if key in ("tool_calls", "function_call") and (content is None or content is _MISSING):
                bad += 1
                self.error("tool_calls_unsupported",
                           f"message has {key} and no text content: tool/function calling is not "
                           "supported; drop tool-calling conversations or turn them into plain text",
                           ln, f"messages[{i}].{key}")
                continue
            if not self.track:
                continue
            count = self.unknown_keys.get(key)
            if count is not None:
                self.unknown_keys[key] = count + 1
            elif len(self.unknown_keys) < _UNKNOWN_KEYS_CAP:
                self.unknown_keys[key] = 1
                self.warning("unknown_message_key",
                             f"unknown key {_short(key)} in a message: it is ignored (only role, content "
                             "and weight are used); later occurrences are counted in stats",
                             ln, f"messages[{i}].{key}")
            else:
                self.unknown_keys_other += 1
        if "weight" in m:
            w = m["weight"]
            if not ((type(w) is int or type(w) is float) and (w == 0 or w == 1)):
                bad += 1
                self.error("invalid_weight", f"weight is {_short(w)}: use 0 (do not learn this message) "
                           "or 1 (learn it)", ln, f"messages[{i}].weight")
        return bad

    # -- tokens ------------------------------------------------------------------------------

    def _count_tokens(self) -> None:
        """Count the pending examples' tokens in one batch (the fast tokenizer encodes in parallel)."""
        pending, self.tok_pending, self.tok_pending_texts = self.tok_pending, [], 0
        counts = self.tokenizer.count([t for _, contents in pending for t in contents])
        i = 0
        limit = self.max_seq_length
        for ln, contents in pending:
            k = len(contents)
            n = sum(counts[i:i + k]) + _tok_overhead() * k
            i += k
            self.tok_total += n
            self.tok.add(n)
            if limit and n > limit:
                self.tok_over += 1
                if self.tok_first_over is None:
                    self.tok_first_over = ln
                n_kept = limit
            else:
                n_kept = n
            self.tok_kept += n_kept

    def _token_stats(self) -> dict | None:
        if self.tokenizer is None:
            return None
        if self.tok_pending:
            self._count_tokens()
        if self.tok_over:
            first = self.tok_first_over
            self.warning(
                "too_long",
                f"{_plural(self.tok_over, 'example')} (the first on line {first}) "
                f"{'is' if self.tok_over == 1 else 'are'} longer than max_seq_length={self.max_seq_length:,} tokens "
                f"(longest: {self.tok.max:,}): {'it' if self.tok_over == 1 else 'they'} will be truncated; shorten or "
                f"split {'it' if self.tok_over == 1 else 'them'}, or raise max_seq_length",
                first, "messages",
            )
        tok = self.tok
        median, p95 = tok.median_p95()
        return {
            "method": self.tokenizer.method,
            "exact": bool(getattr(self.tokenizer, "exact", False)),
            "examples": tok.seen,
            "min": tok.min,
            "median": median,
            "p95": p95,
            "max": tok.max,
            "total": self.tok_total,
            "total_kept": self.tok_kept,
            "max_seq_length": self.max_seq_length,
            "over_max_seq_length": self.tok_over,
            "sampled": not tok.exact,
        }

    # -- the verdict ---------------------------------------------------------------------------

    def report(self, source: str) -> Report:
        tokens = self._token_stats() if not self.fatal else None
        if not self.fatal:
            nonblank = self.lineno - self.blank_lines
            if nonblank == 0:
                what = ("file is empty" if self.bytes == 0 else "file has no rows" if self.format == "parquet"
                        else "file holds only blank lines")
                self.dataset_error("empty_file", f"{what}: upload a dataset with one conversation per line (row)")
            elif self.examples < self.min_examples:
                self.dataset_error(
                    "too_few_examples",
                    f"only {self.examples:,} valid example{'s' if self.examples != 1 else ''} found "
                    f"({self.invalid:,} invalid); at least {self.min_examples:,} are needed"
                    + (": fix the errors listed" if self.invalid else ": add more conversations"),
                )
        stats = {
            "bytes": self.bytes if not self.fatal else self.done_bytes,
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
            "unknown_message_keys": dict(self.unknown_keys, **(
                {"(other)": self.unknown_keys_other} if self.unknown_keys_other else {})),
            "errors_by_code": dict(self.errors_by_code),
            "warnings_by_code": dict(self.warnings_by_code),
            "stopped_early": self.fatal,
        }
        if tokens is not None:
            stats["tokens"] = tokens
        if self.format != "jsonl":
            stats["format"] = self.format
            if self.format == "jsonl.gz":
                stats["compressed_bytes"] = self.compressed_bytes
        return Report(
            accepted=self.error_count == 0,
            errors=list(self.errors),
            warnings=list(self.warnings),
            stats=stats,
            error_count=self.error_count,
            warning_count=self.warning_count,
            source=source,
        )

    def dataset_error(self, code: str, message: str, line: int | None = None) -> None:
        """A file- or dataset-level error: always listed, first, so that the cap never hides it."""
        self.error_count += 1
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        if self.max_errors:
            self.errors.insert(0, Issue(code, message, line))
            del self.errors[self.max_errors:]


class _Sizes:
    """Per-example sizes (characters, tokens): count, min and max exact; median and p95 exact up
    to ``capacity`` examples, then from a uniform sample of that many (reservoir sampling, seeded),
    so memory stays flat however long the file."""

    __slots__ = ("sample", "seen", "min", "max", "capacity", "_rng")

    def __init__(self, capacity: int = _RESERVOIR) -> None:
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


def _missing_messages_message(obj: dict) -> str:
    base = 'row has no "messages" key'
    if "conversations" in obj:
        return base + ": ShareGPT format? rename \"conversations\" to \"messages\" and from/value to role/content"
    if "chosen" in obj and "rejected" in obj:
        return base + ": preference (DPO) data? use the \"chosen\" conversation as \"messages\""
    if "prompt" in obj and "completion" in obj:
        return base + ": prompt/completion format? turn each row into a user and an assistant message"
    if "instruction" in obj and ("output" in obj or "response" in obj):
        return base + ": instruction/output format? turn each row into a user and an assistant message"
    if "text" in obj:
        return base + ': plain "text" rows are not chat data; give a list of role/content messages'
    keys = ", ".join(_short(k, 20) for k in list(obj)[:5])
    return base + (f" (it has {keys})" if keys else " (it is {})") + ': add "messages": [{"role": ..., "content": ...}, ...]'


def _content_type_message(content) -> str:
    if content is None:
        return "content is null: write the message text (null is only allowed alongside tool calls)"
    if type(content) is list:
        return ("content is an array (content parts?): join the text into one string; images and other "
                "parts are not supported")
    return f"content is {_jtype(content)}: make it a string"


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
) -> Report:
    """Validate a chat dataset given as byte chunks of any size; memory stays bounded.

    ``format`` is one of :data:`FORMATS` (see :func:`detect_format`). ``max_warnings`` defaults
    to ``max_errors``. The counts in the report are true totals even where the lists are capped.
    Stops reading early only on a file-level error (compressed, UTF-16 or binary file, damaged
    gzip or Parquet). With a ``tokenizer`` (see :mod:`shared.tokens`), tokens per example are
    counted in batches and examples over ``max_seq_length`` draw one ``too_long`` warning.
    """
    return _validate(chunks, source, format, dict(
        min_examples=min_examples, max_errors=max_errors, max_warnings=max_warnings, max_line_bytes=max_line_bytes,
        max_depth=max_depth, tokenizer=tokenizer, max_seq_length=max_seq_length))[1]


def _validate(chunks, source: str, format: str, options: dict, train: "_Validator | None" = None):
    v = _Validator(train=train, **options)
    for _ in _drive(v, chunks, format):
        pass
    return v, v.report(source)


def validate_pair(train: Iterable[bytes], test: Iterable[bytes], *, train_source: str = "train",
                  test_source: str = "test", train_format: str = "jsonl", test_format: str = "jsonl",
                  min_examples: int = 10, **options) -> Report:
    """Validate a train/test pair (used as given): the train file as :func:`validate_chunks` does,
    the test file needing one example, and each test conversation looked up among the train
    file's (``test_in_train``). One report: its issues name their file, its stats are the train
    file's with the test file's under ``stats["test"]``."""
    options = {"max_errors": 50, **options}
    train_v, train_report = _validate(train, train_source, train_format, {**options, "min_examples": min_examples})
    _, test_report = _validate(test, test_source, test_format, {**options, "min_examples": 1}, train=train_v)
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


#: Dataset formats: chat JSONL, gzip-compressed chat JSONL, Parquet with a ``messages`` column.
FORMATS = ("jsonl", "jsonl.gz", "parquet")
_GZ_OUT = 1 << 20  # decompressed bytes per step: a small gzip cannot balloon in memory
_SPOOL_MEMORY = 16 << 20  # a Parquet upload is spooled in memory up to this, then to a temp file
_PARQUET_BATCH = 1024


def detect_format(name: str) -> str:
    """The format a dataset's file name says: ``*.parquet`` Parquet, ``*.gz`` gzipped JSONL, else JSONL."""
    low = str(name).lower()
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith(".gz"):
        return "jsonl.gz"
    return "jsonl"


def _drive(v: "_Validator", chunks: Iterable[bytes], format: str) -> Iterator[None]:
    """Feed ``chunks`` of ``format`` to ``v``; yields after each piece so callers can drain rows."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: use one of {', '.join(FORMATS)}")
    v.format = format
    if format == "parquet":
        yield from _parquet_rows(v, chunks)
    else:
        for chunk in _gunzip(v, chunks) if format == "jsonl.gz" else chunks:
            v.feed(chunk)
            yield
            if v.fatal:
                return
    v.finish()


def _gunzip(v: "_Validator", chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream (one or more members) as it arrives, at most _GZ_OUT bytes at a time."""
    import zlib

    d = zlib.decompressobj(wbits=31)
    head = b""  # the first bytes, until the magic number is checked
    member = False  # inside a member: some of its bytes were read, its end not yet
    for chunk in chunks:
        data = bytes(chunk)
        v.compressed_bytes += len(data)
        if head is not None:
            head += data
            if len(head) < 2:
                continue
            if head[:2] != b"\x1f\x8b":
                v.stop("corrupt_gzip", "file is named .gz but is not gzip-compressed: name it .jsonl if it is "
                       "plain JSONL, or compress it with gzip")
                return
            data, head = head, None
        while data:
            member = True
            try:
                out = d.decompress(data, _GZ_OUT)
            except zlib.error as exc:
                v.stop("corrupt_gzip", f"the gzip data is damaged ({exc}): compress the file again with gzip "
                       "and upload it whole")
                return
            if out:
                yield out
                if v.fatal:
                    return
            if d.eof:  # a member ended; another may follow (concatenated gzip files)
                data = d.unused_data
                d = zlib.decompressobj(wbits=31)
                member = False
            else:
                data = d.unconsumed_tail
    if head:  # a single byte
        v.stop("corrupt_gzip", "file is named .gz but is not gzip-compressed: name it .jsonl if it is plain JSONL")
    elif member:
        v.stop("corrupt_gzip", "the gzip stream is cut short (an interrupted upload?): upload the whole file again")


def _parquet_rows(v: "_Validator", chunks: Iterable[bytes]) -> Iterator[None]:
    """Spool the upload (memory up to _SPOOL_MEMORY, then a temp file), then read it row group by row group."""
    import tempfile

    v.head = None  # no byte sniffing: Parquet is binary
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
        for chunk in chunks:
            spool.write(chunk)
            v.bytes += len(chunk)
        if not v.bytes:
            return  # reported as an empty file
        try:
            import pyarrow.parquet as pq
        except ImportError:
            v.stop("parquet_unavailable", "Parquet needs pyarrow, which is not installed here: install pyarrow, "
                   "or upload the dataset as .jsonl or .jsonl.gz")
            return
        spool.seek(0)
        try:
            pf = pq.ParquetFile(spool)
            names = pf.schema_arrow.names
        except Exception as exc:
            v.stop("invalid_parquet", f"not a readable Parquet file ({_short(str(exc), 120)}): write it with "
                   "datasets' to_parquet or pyarrow, or upload JSONL")
            return
        if "messages" not in names:
            v.stop("no_messages_column", f'no "messages" column (columns: {", ".join(names[:10]) or "none"}): '
                   'add a "messages" column of [{"role", "content"}, ...] lists')
            return
        columns = [c for c in ("messages", "prompt", "prompt_id") if c in names]
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
                for row in batch.to_pylist():
                    v.lineno += 1
                    v._row(_drop_nulls(row), v.lineno, False)
                v.done_bytes = v.bytes
                yield
        except Exception as exc:
            v.stop("invalid_parquet", f"Parquet data unreadable after row {v.lineno:,} ({_short(str(exc), 120)}): "
                   "write the file again")


def _drop_nulls(row: dict) -> dict:
    """A Parquet null means "absent" (columns and struct fields exist for every row)."""
    out = {k: x for k, x in row.items() if x is not None}
    msgs = out.get("messages")
    if type(msgs) is list:
        out["messages"] = [{k: x for k, x in m.items() if x is not None} if type(m) is dict else m for m in msgs]
    return out


def _read_chunks(path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return
            yield chunk


def validate_path(path, *, chunk_size: int = 1 << 20, **kw) -> Report:
    """Validate a file on disk, read in ``chunk_size`` pieces. Takes validate_chunks' keywords;
    the format defaults to the one the file name says (:func:`detect_format`)."""
    kw.setdefault("source", os.path.basename(os.fspath(path)) or "dataset")
    kw.setdefault("format", detect_format(os.fspath(path)))
    return validate_chunks(_read_chunks(path, chunk_size), **kw)


def iter_conversations(
    chunks: Iterable[bytes], *, format: str = "jsonl", max_line_bytes: int = 1_048_576, max_depth: int = 32
) -> Iterator[list[dict]]:
    """Yield the normalized messages ``[{"role", "content"}, ...]`` of each valid row, in order.

    Rows that validation would reject are skipped (validate first); ``weight`` and other message
    keys are dropped. Memory is bounded by the chunk size (a Parquet row group).
    """
    v = _Validator(min_examples=0, max_errors=0, max_warnings=0, max_line_bytes=max_line_bytes,
                   max_depth=max_depth, collect=True, track=False)
    for _ in _drive(v, chunks, format):
        if v.out:
            out, v.out = v.out, []
            yield from out
    if v.out:
        yield from v.out
