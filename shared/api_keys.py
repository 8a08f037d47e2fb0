"""API keys of the OpenAI-compatible routes (``/api/v1``): issued, checked and rotated without the app ever
holding one.

OpenAI clients send their key as ``Authorization: Bearer <key>`` (Azure OpenAI's as ``api-key``). The
Functions host only checks its own keys (``x-functions-key`` or ``code``), so the ``/api/v1`` routes are
anonymous to the host and check the key here. ``TUNEDROP_API_KEYS`` holds ``name:sha256`` entries, the
SHA-256 of each key beside a name for the record (who forced a gated deploy, the logs): hashes are not
secrets, so the setting can live in plain app settings and in the repo's infra parameters, and a leaked
setting gives no key. ``tunedrop keys new NAME`` makes a key and its entry; rotating is adding the new
entry, moving clients over, then removing the old one. Keys are long random tokens, so one unsalted
hash is enough (no dictionary to try), and the comparison takes the same time whatever it finds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ENTRY = re.compile(r"([A-Za-z0-9_.@-]{1,64}):([0-9a-f]{64})")
PREFIX = "td_"


class ApiKeysError(ValueError):
    """TUNEDROP_API_KEYS is not a comma-separated list of ``name:sha256`` entries."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, prefixed so that secret scanners and people recognise it."""
    return PREFIX + secrets.token_urlsafe(32)


def entry(name: str, key: str) -> str:
    """The TUNEDROP_API_KEYS entry that admits ``key`` under ``name``."""
    if not ENTRY.fullmatch(f"{name}:{'0' * 64}"):
        raise ApiKeysError(f"A key name is 1-64 letters, digits, '_', '.', '@' or '-', not {name!r}.")
    return f"{name}:{digest(key)}"


def parse(value: str) -> tuple[tuple[str, str], ...]:
    """(name, sha256) of each entry of TUNEDROP_API_KEYS; ApiKeysError names a bad one (never its value)."""
    entries = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        found = ENTRY.fullmatch(item)
        if not found:
            raise ApiKeysError(f"TUNEDROP_API_KEYS entry {index + 1} is not name:sha256 (a name, ':', then 64 "
                               "lowercase hex digits): make one with `tunedrop keys new NAME`.")
        entries.append((found.group(1), found.group(2)))
    return tuple(entries)


def presented(headers) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, or ``api-key: <key>``."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return (headers.get("api-key") or "").strip() or None


def caller(key: str | None, entries: tuple[tuple[str, str], ...]) -> str | None:
    """The name of the entry ``key`` matches, or None; every entry is compared (constant time)."""
    if not key:
        return None
    given = digest(key)
    found = None
    for name, expected in entries:
        if hmac.compare_digest(given, expected):
            found = name
    return found
