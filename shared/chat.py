"""The chat request vocabulary shared by tunedrop's scoring route and the local endpoint: messages,
and the conversation a seed request's `input_data.input_string` holds.

`input_string` comes in two shapes, both accepted: a flat list of messages (the shape of Phi-3's
model card sample) and the seed notebook's own `[conversation]`, a list holding one list of messages
(`"input_string": [test_df["messages"][0]]`). One request scores one conversation.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class ChatRequestError(ValueError):
    """A chat request is not of the documented shape; the message names the field at fault (``field``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def messages(value: Any, field: str) -> list[dict[str, str]]:
    """``value`` as a checked, non-empty list of {role, content} messages (other keys dropped)."""
    if not isinstance(value, list) or not value:
        raise ChatRequestError(f"{field} must be a non-empty list of messages", field)
    checked = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ChatRequestError(f"{where} must be an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatRequestError(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        if not isinstance(content, str):
            raise ChatRequestError(f"{where}.content must be a string", f"{where}.content")
        checked.append({"role": role, "content": content})
    return checked


def _where(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _number(params: dict, key: str, field: str, low: float, high: float, low_open: bool = False) -> None:
    value = params.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (low < value if low_open else low <= value) or not value <= high:
        span = f"{'above' if low_open else 'from'} {low:g} up to {high:g}"
        raise ChatRequestError(f"{_where(field, key)} must be a number {span}", _where(field, key))


def _positive_int(params: dict, key: str, field: str) -> None:
    value = params.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ChatRequestError(f"{_where(field, key)} must be a positive integer", _where(field, key))


def check_sampling(params: Any, field: str, tokens_keys: tuple[str, ...]) -> None:
    """The sampling parameters a request may carry, by type and range (the bounds the local model
    server keeps): temperature 0-2, top_p above 0 up to 1, do_sample true/false, token counts positive
    integers. Absent or null ones are fine; other keys are left to the endpoint."""
    if not isinstance(params, dict):
        raise ChatRequestError(f"{field or 'the request'} must be an object", field or None)
    _number(params, "temperature", field, 0.0, 2.0)
    _number(params, "top_p", field, 0.0, 1.0, low_open=True)
    if params.get("do_sample") is not None and not isinstance(params["do_sample"], bool):
        raise ChatRequestError(f"{_where(field, 'do_sample')} must be true or false", _where(field, "do_sample"))
    for key in tokens_keys:
        _positive_int(params, key, field)


def conversation(input_string: Any, field: str = "input_data.input_string") -> list[dict[str, str]]:
    """The one conversation of a seed request's ``input_string``, in either shape (see above)."""
    if isinstance(input_string, list) and input_string and isinstance(input_string[0], list):
        if len(input_string) > 1:
            raise ChatRequestError(f"{field} holds {len(input_string)} conversations: send one per request, "
                                   "as a list of messages or as a list holding one list of messages", field)
        return messages(input_string[0], f"{field}[0]")
    return messages(input_string, field)
