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
    """A chat request is not of the documented shape; the message names the field at fault."""


def messages(value: Any, field: str) -> list[dict[str, str]]:
    """``value`` as a checked, non-empty list of {role, content} messages (other keys dropped)."""
    if not isinstance(value, list) or not value:
        raise ChatRequestError(f"{field} must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ChatRequestError(f"{where} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatRequestError(f"{where}.role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatRequestError(f"{where}.content must be a string")
        checked.append({"role": role, "content": content})
    return checked


def conversation(input_string: Any, field: str = "input_data.input_string") -> list[dict[str, str]]:
    """The one conversation of a seed request's ``input_string``, in either shape (see above)."""
    if isinstance(input_string, list) and input_string and isinstance(input_string[0], list):
        if len(input_string) > 1:
            raise ChatRequestError(f"{field} holds {len(input_string)} conversations: send one per request, "
                                   "as a list of messages or as a list holding one list of messages")
        return messages(input_string[0], f"{field}[0]")
    return messages(input_string, field)
