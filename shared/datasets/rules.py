"""The rules a conversation must keep, written once for both ways a row is read (:mod:`rows`).

A conversation reaches these rules as parallel lists, one entry a message:

* ``roles``: each one of :data:`ROLES` (or None for a message whose role was already refused);
* ``contents``: the message's text, or None where it has no text string (already reported);
* ``weights``: the ``weight`` value as written, or :data:`NO_WEIGHT`.

Each fault is a ``(code, message, field)`` triple; the reader adds the line. A rule added here holds
for every row, whichever path read it.
"""

from __future__ import annotations

from itertools import islice
from operator import eq

from msgspec import UNSET

from shared.datasets.report import short

ROLES = ("system", "user", "assistant")
#: The keys a message may have; others draw a warning and are ignored.
MESSAGE_KEYS = frozenset(("role", "content", "weight"))
#: What ``weights`` holds for a message without a weight (it counts as 1).
NO_WEIGHT = UNSET

Fault = tuple[str, str, "str | None"]


def _weight_ok(w) -> bool:
    return w is NO_WEIGHT or (type(w) is int or type(w) is float) and (w == 0 or w == 1)


def looks_clean(roles: list, contents: list, weights: list, escapes: bool) -> bool:
    """True only when :func:`message_faults` and :func:`conversation_faults` would find nothing.

    Decided over the whole conversation at C speed (map, count, any), since almost every row of a
    real dataset is clean and this is most of the validator's time; False means "ask the rules",
    which say what is wrong. It may be False for a clean conversation, never True for a faulty one
    (a property test holds it to that)."""
    return (
        all(contents)
        and not any(map(str.isspace, contents))
        and not (escapes and not all(map(str.isascii, contents)))
        and not any(map(eq, roles, islice(roles, 1, None)))
        and roles.count("system") <= (roles[0] == "system")
        and "assistant" in roles
        and (weights.count(NO_WEIGHT) == len(weights) or (
            all(map(_weight_ok, weights))
            and any(w != 0 for r, w in zip(roles, weights, strict=True) if r == "assistant")))
    )


def message_faults(i: int, content: str | None, weight, escapes: bool) -> list[Fault]:
    """What is wrong with message ``i``'s values (its shape is sound): weight, then content."""
    faults: list[Fault] = []
    if not _weight_ok(weight):
        faults.append(("invalid_weight", f"weight is {short(weight)}: use 0 (do not learn this message) or 1 "
                       "(learn it)", f"messages[{i}].weight"))
    if content is None:
        return faults
    if not content or content.isspace():
        faults.append(("empty_content", "content is empty or only whitespace: write the message text or drop "
                       "the message", f"messages[{i}].content"))
    elif escapes and not content.isascii():
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            faults.append(("lone_surrogate", f"content has an unpaired surrogate escape at character {e.start} "
                           f"(\\u{ord(content[e.start]):04x}): the text was cut inside an emoji or mis-encoded; "
                           "fix or drop it", f"messages[{i}].content"))
    return faults


def conversation_faults(roles: list[str], weights: list) -> list[Fault]:
    """What is wrong with the conversation as a whole (every message is well formed)."""
    faults: list[Fault] = []
    n = len(roles)
    if "system" in roles:
        first_sys = roles.index("system")
        if first_sys != 0:
            faults.append(("system_not_first", f"system message at position {first_sys}: move it to the start of "
                           "the conversation", f"messages[{first_sys}].role"))
        for j in range(first_sys + 1, n):
            if roles[j] == "system":
                faults.append(("multiple_system_messages", "a second system message: keep one system message, first",
                               f"messages[{j}].role"))
    prev = None
    for j, r in enumerate(roles):
        if r == prev and r != "system":
            faults.append(("consecutive_same_role", f"two {r} messages in a row (messages[{j - 1}] and messages[{j}]): "
                           f"merge them or put {'an assistant' if r == 'user' else 'a user'} message between",
                           f"messages[{j}].role"))
        prev = r
    assistant_weights = [w for r, w in zip(roles, weights, strict=True) if r == "assistant"]
    if not assistant_weights:
        faults.append(("no_assistant_message", "no assistant message: nothing to learn; add the assistant's reply",
                       "messages"))
    elif all(w is not NO_WEIGHT and w == 0 for w in assistant_weights):
        faults.append(("all_weights_zero", "every assistant message has weight 0: nothing to learn; set weight 1 on "
                       "at least one", "messages"))
    return faults
