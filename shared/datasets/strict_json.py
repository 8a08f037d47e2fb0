"""Strict JSON (RFC 8259) of one line, fast on good lines and exact about bad ones.

msgspec parses each line; what it lets through that JSON forbids (a key written twice) is found
after it without building anything. Only a line that fails goes through the standard library's
parser again, to say what is wrong and where (the field path of a doubled key or a NaN).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from shared.datasets.report import FileFault, LineFault
from shared.json_pairs import MarkedObject, marking_pairs


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
loads = msgspec.json.Decoder().decode
_dumps = msgspec.json.Encoder().encode

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


def has_duplicate_key(raw, obj) -> bool:
    """True if the JSON text writes a key twice in one object (the parser keeps the last silently).

    Outside strings a colon follows each key and nothing else, so the text's colons are its keys
    plus the colons inside its strings. The compact re-serialisation of the parsed value has
    the parsed keys plus the same in-string colons, unless a colon was written as an escape
    (``\\u003a``): when the text may hold one, the colons outside strings are counted on the text
    itself (escaped backslashes, then escaped quotes, dropped first, as in :func:`too_deep`).
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


_BAD_CONSTANT = object()


_diagnose = json.JSONDecoder(object_pairs_hook=marking_pairs, parse_constant=lambda _n: _BAD_CONSTANT).decode


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
        if want == "dup" and isinstance(node, MarkedObject) and node.duplicate is not None:
            return _path_join(path, node.duplicate), node.duplicate
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


def too_deep(raw: bytes, max_depth: int) -> bool:
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


def depth_hint(raw: bytes, max_depth: int) -> bool:
    """Whether a line has enough brackets to nest deeper than max_depth (a cheap first look)."""
    return raw.count(b"[") + raw.count(b"{") > max_depth


def too_deep_fault(max_depth: int) -> LineFault:
    return LineFault("nesting_too_deep", f"JSON nests arrays/objects more than {max_depth} levels deep: "
                     "a chat row needs only 3 (row, messages, message)")


def parse_line(raw: bytes, max_depth: int) -> tuple[Any, bool]:
    """The JSON value of one non-blank line, and whether its text holds ``\\u`` escapes (a content
    string may then hold a lone surrogate the fast parser did not see).

    Raises :class:`LineFault` for a line that is not one strict JSON value, :class:`FileFault` for
    NUL bytes (the file is UTF-16 or binary, not a text file with a bad line)."""
    if b"\x00" in raw:
        raise FileFault("binary_file", "file is UTF-16/binary (NUL bytes on this line): save it as UTF-8 JSONL "
                        "(one JSON object per line)")
    try:
        obj = loads(raw)
    except Exception:  # not valid strict JSON (or too deep): the stdlib path below says exactly what is wrong
        obj = _FAILED
    if obj is not _FAILED:
        if depth_hint(raw, max_depth) and _shape(obj)[1] > max_depth:
            raise too_deep_fault(max_depth)
        if not has_duplicate_key(raw, obj):
            return obj, False  # the parser refuses lone surrogates, so no content needs the surrogate check
    if depth_hint(raw, max_depth) and too_deep(raw, max_depth):
        raise too_deep_fault(max_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineFault("invalid_utf8", f"bytes at offset {e.start} are not valid UTF-8 "
                        f"({bytes(raw[e.start:e.start + 4]).hex(' ')}): save the file as UTF-8 (it may be "
                        "Latin-1/Windows-1252)") from None
    try:
        obj = _decode(text)
    except _DuplicateKey:
        path, key = _locate(text, "dup")
        raise LineFault("duplicate_key", f"key {key!r} appears twice in the same object: JSON keys must be unique, "
                        "keep one" if key is not None else "an object has the same key twice: JSON keys must be unique",
                        path) from None
    except _NonFinite as e:
        path, _ = _locate(text, "nan")
        raise LineFault("non_finite_number", f"{e.args[0]} is not valid JSON (RFC 8259): write null or a finite number",
                        path) from None
    except json.JSONDecodeError as e:
        raise LineFault("invalid_json", _json_error_message(e, text)) from None
    except RecursionError:  # pragma: no cover - the depth scan runs first
        raise LineFault("nesting_too_deep", f"JSON nests too deeply (limit {max_depth})") from None
    except ValueError as e:  # e.g. an integer with more than 4300 digits
        raise LineFault("invalid_json", f"invalid JSON value: {e}; fix the line") from None
    return obj, b"\\u" in raw
