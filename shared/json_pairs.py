"""A JSON object that remembers a key written twice: the ``object_pairs_hook`` both strict JSON readers
(request bodies, shared/request_json.py; dataset lines, shared/datasets/strict_json.py) use to say
which key it was, since the standard library keeps the last silently."""

from __future__ import annotations

from typing import Any


class MarkedObject(dict):
    """A parsed object; ``duplicate`` is the first key written twice in it, or None."""

    duplicate: str | None = None


def marking_pairs(pairs: list[tuple[str, Any]]) -> MarkedObject:
    d = MarkedObject(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                d.duplicate = key
                break
            seen.add(key)
    return d
