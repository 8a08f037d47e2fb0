"""One row into one conversation, two ways, one set of rules (:mod:`rules`).

* The typed path decodes a line straight into the two documented row shapes (:class:`TypedRow`):
  no dicts built, no depth scan (the schema bounds the depth). Most rows of a real dataset take it.
* The general path takes any parsed JSON value and says what is wrong with its shape: not an
  object, no ``messages``, a message without a role, content that is not a string, tool calls...

Both hand the conversation's roles, contents and weights to the same rules; a row whose shape is
sound gets the same verdict, codes and messages whichever path read it (a test holds them to it).
"""

from __future__ import annotations

from itertools import repeat
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from shared.datasets.report import IssueLog, json_type, short
from shared.datasets.rules import (
    MESSAGE_KEYS,
    NO_WEIGHT,
    ROLES,
    Fault,
    conversation_faults,
    looks_clean,
    message_faults,
)

#: What a reader returns for a row it reported as invalid.
INVALID = ()
_MISSING = object()
_UNKNOWN_KEYS_CAP = 100


class TypedMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str
    weight: int | float | UnsetType = UNSET


class TypedRow(msgspec.Struct, forbid_unknown_fields=True):
    """The two documented row shapes exactly: OpenAI's ``{"messages"}`` and the seed's ultrachat
    ``{"prompt", "prompt_id", "messages"}``. Anything else takes the general path."""

    messages: list[TypedMessage]
    prompt: str | UnsetType = UNSET
    prompt_id: str | UnsetType = UNSET


typed_loads = msgspec.json.Decoder(TypedRow).decode


class RowReader:
    """Reads rows for one file, reporting into its :class:`IssueLog`; tallies unknown message keys."""

    def __init__(self, log: IssueLog, track: bool = True) -> None:
        self.log = log
        self.track = track
        self.unknown_keys: dict[str, int] = {}
        self.unknown_keys_other = 0

    # -- the typed path --------------------------------------------------------------------------

    def typed(self, row: TypedRow, buf: bytes, start: int, end: int, ln: int) -> tuple | None:
        """The conversation of a row decoded as :class:`TypedRow` from ``buf[start:end]``; INVALID when
        the rules refuse it (reported); None, having reported nothing, when its text writes a key twice
        (the decoder keeps the last silently): the general path then says so."""
        msgs = row.messages
        n = len(msgs)
        if not n:
            return None
        roles = [m.role for m in msgs]
        contents = [m.content for m in msgs]
        weights = [m.weight for m in msgs]
        strings = 1 + 4 * n  # the key "messages", and in each message two keys and two strings
        strings += n - weights.count(UNSET)
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
            return None
        if looks_clean(roles, contents, weights, False):
            return roles, contents
        return self._judge(ln, roles, contents, weights, None, 0, False)

    # -- the general path ------------------------------------------------------------------------

    def general(self, obj, ln: int, escapes: bool) -> tuple:
        """The conversation of any parsed row, or INVALID (reported)."""
        log = self.log
        if type(obj) is not dict:
            if type(obj) is list and obj and all(type(x) is dict for x in obj[:3]):
                hint = ("the line is an array of objects: JSONL needs one object per line "
                        "(is this a .json file? write each row on its own line)")
            else:
                hint = 'each line must be an object like {"messages": [...]}'
            log.error("not_an_object", f"row is {json_type(obj)}, not an object: {hint}", ln)
            return INVALID
        bad = 0
        for key in ("prompt", "prompt_id"):
            if key in obj and type(obj[key]) is not str:
                bad += 1
                log.error(f"{key}_not_string", f"{key} is {json_type(obj[key])}: make it a string or drop the key",
                          ln, key)
        msgs = obj.get("messages", _MISSING)
        if msgs is _MISSING:
            log.error("missing_messages", _missing_messages_message(obj), ln, "messages")
            return INVALID
        if type(msgs) is not list:
            extra = ""
            if type(msgs) is str and msgs.lstrip().startswith("["):
                extra = " (it is a string holding JSON: store the array itself, not json.dumps of it)"
            log.error("messages_not_list", f"messages is {json_type(msgs)}, not an array of messages{extra}",
                      ln, "messages")
            return INVALID
        if not msgs:
            log.error("empty_messages", "messages is empty: give at least a user and an assistant message",
                      ln, "messages")
            return INVALID

        roles: list = []
        contents: list = []
        weights: list = []
        shape: dict[int, list[Fault]] | None = None
        for i, m in enumerate(msgs):
            if type(m) is dict and len(m) == 2:  # the plain {"role", "content"} message, quickly
                role = m.get("role")
                content = m.get("content")
                if type(role) is str and role in ROLES and type(content) is str:
                    roles.append(role)
                    contents.append(content)
                    weights.append(NO_WEIGHT)
                    continue
            faults, role, content, weight = self._message_shape(m, i, ln)
            if faults:
                shape = shape or {}
                shape[i] = faults
            roles.append(role)
            contents.append(content)
            weights.append(weight)
        if shape is None and not bad and looks_clean(roles, contents, weights, escapes):
            return roles, contents
        return self._judge(ln, roles, contents, weights, shape, bad, escapes)

    def _message_shape(self, m, i: int, ln: int) -> tuple[list[Fault], str | None, str | None, object]:
        """(shape faults, role or None, content or None, weight) of one message; unknown keys are warned of."""
        if type(m) is not dict:
            return [("message_not_object", f'message is {json_type(m)}: each message must be '
                     '{"role": ..., "content": ...}', f"messages[{i}]")], None, None, NO_WEIGHT
        faults: list[Fault] = []
        role = m.get("role", _MISSING)
        content = m.get("content", _MISSING)
        tool_calls = "tool_calls" in m or "function_call" in m
        if len(m) > 2 or role is _MISSING or content is _MISSING:
            self._odd_keys(m, i, ln, content, faults)
        if role is _MISSING:
            faults.append(("missing_role", 'message has no "role": add one of system, user, assistant',
                           f"messages[{i}].role"))
        elif type(role) is not str:
            faults.append(("role_not_string", f"role is {json_type(role)}: use one of the strings system, user, "
                           "assistant", f"messages[{i}].role"))
        elif role not in ROLES:
            faults.append(("unknown_role", _role_message(role), f"messages[{i}].role"))
        if content is _MISSING:
            if not tool_calls:  # with tool calls, _odd_keys reported tool_calls_unsupported
                faults.append(("missing_content", 'message has no "content": add the message text',
                               f"messages[{i}].content"))
        elif type(content) is not str and not (content is None and tool_calls):
            faults.append(("content_not_string", _content_type_message(content), f"messages[{i}].content"))
        return (faults, role if type(role) is str and role in ROLES else None,
                content if type(content) is str else None, m.get("weight", NO_WEIGHT))

    def _odd_keys(self, m: dict, i: int, ln: int, content, faults: list[Fault]) -> None:
        """Keys other than role/content/weight: tool calls are refused, the rest warned of once per name."""
        for key in m:
            if key in MESSAGE_KEYS:
                continue
            if key in ("tool_calls", "function_call") and (content is None or content is _MISSING):
                faults.append(("tool_calls_unsupported", f"message has {key} and no text content: tool/function "
                               "calling is not supported; drop tool-calling conversations or turn them into plain "
                               "text", f"messages[{i}].{key}"))
                continue
            if not self.track:
                continue
            count = self.unknown_keys.get(key)
            if count is not None:
                self.unknown_keys[key] = count + 1
            elif len(self.unknown_keys) < _UNKNOWN_KEYS_CAP:
                self.unknown_keys[key] = 1
                self.log.warning("unknown_message_key", f"unknown key {short(key)} in a message: it is ignored "
                                 "(only role, content and weight are used); later occurrences are counted in stats",
                                 ln, f"messages[{i}].{key}")
            else:
                self.unknown_keys_other += 1

    # -- the verdict, shared ---------------------------------------------------------------------

    def _judge(self, ln: int, roles: list, contents: list, weights: list, shape: dict | None, bad: int,
               escapes: bool) -> tuple:
        """Report a conversation's faults, message by message (shape, then values), then across it."""
        error = self.log.error
        for i in range(len(roles)):
            for code, message, field in (shape.get(i, ()) if shape else ()):
                bad += 1
                error(code, message, ln, field)
            for code, message, field in message_faults(i, contents[i], weights[i], escapes):
                bad += 1
                error(code, message, ln, field)
        if bad:
            return INVALID
        for code, message, field in conversation_faults(roles, weights):
            bad += 1
            error(code, message, ln, field)
        return INVALID if bad else (roles, contents)


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
        return f"unknown role {short(role)}: roles are lowercase without spaces, use {low!r}"
    if low in ("tool", "function", "ipython"):
        return f"unknown role {short(role)}: tool/function messages are not supported; {allowed}"
    hint = _ROLE_HINTS.get(low)
    if hint:
        return f"unknown role {short(role)}: {allowed} (did you mean {hint!r}?)"
    return f"unknown role {short(role)}: {allowed}"


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
    keys = ", ".join(short(k, 20) for k in list(obj)[:5])
    return base + (f" (it has {keys})" if keys else " (it is {})") + ': add "messages": [{"role": ..., "content": ...}, ...]'


def _content_type_message(content) -> str:
    if content is None:
        return "content is null: write the message text (null is only allowed alongside tool calls)"
    if type(content) is list:
        return ("content is an array (content parts?): join the text into one string; images and other "
                "parts are not supported")
    return f"content is {json_type(content)}: make it a string"
