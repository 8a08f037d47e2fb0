"""host.json, app-setting references and the host's keys, read the way the Functions host reads them."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tunedrop.host")

_SETTING_REF = re.compile(r"%([^%]+)%")
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


class HostConfigError(ValueError):
    """host.json, an app setting or a binding cannot be used; the message names it."""


def parse_timespan(value: str | int | float | None) -> float | None:
    """A .NET TimeSpan string ("00:05:00", "1.02:00:00") in seconds; "-1" or None means unbounded."""
    if value is None or str(value).strip() == "-1":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = _TIMESPAN.match(value.strip())
    if not match:
        raise HostConfigError(f"host.json: {value!r} is not a TimeSpan like 00:05:00.")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def format_timespan(seconds: float) -> str:
    """Seconds as .NET prints a TimeSpan: 00:05:00, 00:00:00.5000000."""
    whole, fraction = int(seconds), round((seconds % 1) * 10_000_000)
    text = f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    return f"{text}.{fraction:07d}" if fraction else text


def resolve_settings(value: str, environ: dict[str, str], where: str) -> str:
    """Replace each ``%NAME%`` in a binding value with the app setting NAME, as the host does at indexing."""

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise HostConfigError(f"{where}: '%{name}%' does not resolve to a value (app setting {name} is not set).")
        return environ[name]

    return _SETTING_REF.sub(lookup, value)


def storage_connection_string(environ: dict[str, str], connection: str | None, where: str) -> str:
    """The connection string a storage binding's ``connection`` names (default AzureWebJobsStorage).

    Like the host it also looks under ``AzureWebJobs<name>``. Identity-based connections
    (``<name>__blobServiceUri``...) are what Azure uses; this local host needs a connection string.
    """
    name = connection or "AzureWebJobsStorage"
    for key in (name, f"AzureWebJobs{name}"):
        if environ.get(key):
            return environ[key]
    raise HostConfigError(
        f"{where}: storage connection '{name}' is not set; the local host needs a connection string "
        f"in app setting {name} (e.g. Azurite's)."
    )


#: Options for the host's own storage clients: one quick retry (the next poll retries anyway), so a host
#: whose storage is down still stops promptly. The clients handed to functions keep the SDK's defaults.
HOST_CLIENT_OPTIONS = {"retry_total": 1, "initial_backoff": 0.5, "increment_base": 1, "random_jitter_range": 0.2,
                       "connection_timeout": 10, "read_timeout": 60}


def default_host_id(environ: dict[str, str]) -> str:
    """The host id: AzureFunctionsWebHost__hostid, else the site or machine name, lower-case, at most 32 chars."""
    raw = environ.get("AzureFunctionsWebHost__hostid") or environ.get("WEBSITE_SITE_NAME") or socket.gethostname()
    cleaned = re.sub(r"[^a-z0-9-]", "", raw.lower())[:32].rstrip("-")
    return cleaned or "localhost"


@dataclass(frozen=True)
class HostConfig:
    """The parts of host.json this host honours, with the Functions host's defaults."""

    max_dequeue_count: int = 5
    visibility_timeout_s: float = 0.0
    batch_size: int = 16
    message_encoding: str = "base64"
    route_prefix: str = "api"
    function_timeout_s: float | None = 30 * 60
    #: extensions.http.maxConcurrentRequests: HTTP invocations running at once (the HTTP lane's workers).
    #: The Functions host's default, -1, is unbounded; this host's is 32 (its trigger lane has 32 more).
    max_concurrent_requests: int = 32
    #: extensions.http.maxOutstandingRequests: HTTP invocations running or waiting for a worker; past it
    #: a request is answered 429. None (or -1, the Functions host's unbounded default): twice the above.
    max_outstanding_requests: int | None = None

    @property
    def http_workers(self) -> int:
        """How many HTTP invocations may run at once (never more than may be outstanding)."""
        return min(self.max_concurrent_requests, self.max_outstanding_requests or self.max_concurrent_requests)

    @property
    def http_backlog(self) -> int:
        """How many HTTP invocations may wait for a worker beyond those running."""
        outstanding = self.max_outstanding_requests
        if outstanding is None:
            return self.max_concurrent_requests
        return max(0, outstanding - self.http_workers)

    @classmethod
    def load(cls, root: Path) -> "HostConfig":
        path = Path(root) / "host.json"
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise HostConfigError(f"{path}: not valid JSON ({exc}).") from exc
        extensions = doc.get("extensions") or {}
        queues = extensions.get("queues") or {}
        http = extensions.get("http") or {}
        default = cls()
        encoding = str(queues.get("messageEncoding", default.message_encoding)).lower()
        if encoding not in ("base64", "none"):
            raise HostConfigError(f"{path}: extensions.queues.messageEncoding must be base64 or none.")
        timeout = doc.get("functionTimeout", "default")

        def http_limit(key: str) -> int | None:
            value = http.get(key, -1)
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise HostConfigError(f"{path}: extensions.http.{key} must be a whole number.") from None
            if number == -1:
                return None
            if number < 1:
                raise HostConfigError(f"{path}: extensions.http.{key} must be at least 1 (or -1 for the default).")
            return number

        return cls(
            max_dequeue_count=int(queues.get("maxDequeueCount", default.max_dequeue_count)),
            visibility_timeout_s=parse_timespan(queues.get("visibilityTimeout", "00:00:00")) or 0.0,
            batch_size=int(queues.get("batchSize", default.batch_size)),
            message_encoding=encoding,
            route_prefix=str(http.get("routePrefix", default.route_prefix)).strip("/"),
            function_timeout_s=default.function_timeout_s if timeout == "default" else parse_timespan(timeout),
            max_concurrent_requests=http_limit("maxConcurrentRequests") or default.max_concurrent_requests,
            max_outstanding_requests=http_limit("maxOutstandingRequests"),
        )


def load_or_create_keys(state_dir: Path) -> dict[str, str]:
    """The master key and the default function key, created once in ``host_keys.json`` (mode 0600).

    The real host keeps its keys in blob storage (azure-webjobs-secrets); a local file does the same job.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "host_keys.json"
    if path.exists():
        keys = json.loads(path.read_text())
        if keys.get("masterKey") and keys.get("functionKey"):
            os.chmod(path, 0o600)
            return keys
    keys = {"masterKey": secrets.token_urlsafe(32), "functionKey": secrets.token_urlsafe(32)}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(keys, handle, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return keys
