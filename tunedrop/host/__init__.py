"""A local Azure Functions host for a Python v2-model FunctionApp, driven against Azurite.

Azure Functions Core Tools (``func start``) cannot be installed on these machines, so this package
loads the app (``import function_app``), reads each function's trigger from the app's own binding
metadata and drives it for real: HTTP routes under ``/api``, the Event Grid webhook
``/runtime/webhooks/EventGrid?functionName=...``, the admin invoke API, NCRONTAB timers, and blob
and queue triggers polling Azurite with the host's receipts, retries and poison queues. Each
module's docstring says which real-host behaviour it mirrors and where it differs.

Checked first (PyPI metadata, no maintained package does this job): ``azure-functions-test``
(1.17.0a1: mock trigger objects for unit tests, "no runtime, no Azurite"); ``azure-functions-runtime``
/ ``azure-functions-worker`` (the Python language worker: it needs the .NET host over gRPC, and the
former requires Python >= 3.13); ``benzene-azure`` (adapts Benzene handlers to run inside Azure
Functions, runs no triggers); the other ``azure-functions-*`` / ``azurefunctions-*`` packages are
bindings, helpers, scaffolding or OpenAPI layers. Only Core Tools runs the real host locally.
"""

from tunedrop.host.config import HostConfig, HostConfigError
from tunedrop.host.host import LocalHost, load_app, main, run_host

__all__ = ["LocalHost", "HostConfig", "HostConfigError", "load_app", "main", "run_host"]
