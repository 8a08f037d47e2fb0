"""Strict JSON of an HTTP request body, with errors that say what is wrong and where.

What the standard library's ``json.loads`` lets through or fails on, and what this refuses with a
:class:`RequestJSONError` (HTTP 400, or 413 for size) instead:

- a body over the size limit (413), an empty body, bytes that are not UTF-8 (the offset is named);
- nesting deeper than the depth limit (``json.loads`` recurses and raises RecursionError at ~1000
  levels: the depth is counted first, without recursion);
- ``NaN``, ``Infinity``, ``-Infinity`` (not JSON, RFC 8259 section 6), numbers that overflow a double
  (``1e999`` would become ``inf``) and integers outside 64 bits (or longer than Python converts);
- strings, keys included, holding a lone surrogate (``"\\ud800"``: not text; it cannot be encoded
  again to send it on), and a key written twice in one object.

Errors name the field as a path (``input_data.parameters.temperature``) or the line and column.
Nothing heavy is imported: this is on the scoring function's hot path.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from shared.json_pairs import MarkedObject, marking_pairs

#: Beyond this an integer is refused: JSON numbers are doubles for most readers, and int64 for the rest.
INT_LIMIT = 2**63

_SURROGATE = re.compile("[\ud800-\udfff]")
_BRACKETS = re.compile(r"[\[\]{}]")


class RequestJSONError(ValueError):
    """The body is not strict JSON; ``field`` is the path of the offending value, when there is one."""

    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class _Bad:
    """Stands in for a value the parser saw but tunedrop refuses; found with its path after the parse."""

    def __init__(self, why: str):
        self.why = why


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Bad(f"the number {_short(text)} overflows a double")


def _int(text: str) -> Any:
    try:
        value = int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return _Bad(f"the integer of {len(text)} digits is out of range")
    return value if -INT_LIMIT <= value < INT_LIMIT else _Bad(f"the integer {_short(text)} is out of range (64 bits)")


def _constant(name: str) -> Any:
    return _Bad(f"{name} is not JSON (write a finite number or null)")


_decode = json.JSONDecoder(object_pairs_hook=marking_pairs, parse_float=_float, parse_int=_int,
                           parse_constant=_constant).decode


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether arrays/objects nest deeper than ``max_depth``, brackets inside strings aside. No recursion:
    escaped backslashes, then escaped quotes, are dropped (as a JSON reader pairs them), what lies between
    the quotes left is string text, and only the brackets outside are walked."""
    outside = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    depth = 0
    for bracket in _BRACKETS.findall(outside):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            return True
    return False


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    shown = key if key.isidentifier() else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _first_fault(root: Any) -> tuple[str, str] | None:
    """(path, what is wrong) of the first refused value in document order; iterative."""
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Bad):
            return path, node.why
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return path, "the string holds a lone surrogate (\\ud800-\\udfff), which is not text"
        elif isinstance(node, dict):
            if isinstance(node, MarkedObject) and node.duplicate is not None:
                return _join(path, node.duplicate), f"the key {json.dumps(node.duplicate)} is written twice in one object"
            for key in node:
                if _SURROGATE.search(key):
                    return path, "a key holds a lone surrogate (\\ud800-\\udfff), which is not text"
            stack.extend((value, _join(path, key)) for key, value in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((value, _join(path, i)) for i, value in reversed(list(enumerate(node))))
    return None


def loads(body: bytes, *, max_bytes: int, max_depth: int, what: str = "Request body") -> Any:
    """``body`` as strict JSON; raises RequestJSONError saying what is wrong and where."""
    if len(body) > max_bytes:
        raise RequestJSONError(f"{what} is {len(body):,} bytes, over the limit of {max_bytes:,} "
                               "(TUNEDROP_MAX_REQUEST_BYTES).", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestJSONError(f"{what} is not UTF-8: the bytes at offset {exc.start} "
                               f"({body[exc.start:exc.start + 4].hex(' ')}) are not valid UTF-8; send JSON as UTF-8.") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise RequestJSONError(f"{what} is empty: send a JSON object.")
    if _depth_exceeds(text, max_depth):
        raise RequestJSONError(f"{what} nests arrays/objects more than {max_depth} levels deep "
                               "(TUNEDROP_MAX_JSON_DEPTH).")
    try:
        value = _decode(text)
    except json.JSONDecodeError as exc:
        raise RequestJSONError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
                               f"(character {exc.pos}).") from None
    except RecursionError:  # pragma: no cover - the depth is counted first
        raise RequestJSONError(f"{what} nests too deeply.") from None
    fault = _first_fault(value)
    if fault is not None:
        path, why = fault
        where = f" at {path}" if path else ""
        raise RequestJSONError(f"{what} is not accepted{where}: {why}.", field=path or None)
    return value
