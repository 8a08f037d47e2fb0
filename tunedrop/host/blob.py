"""Blob trigger: scan a container like the Functions host's polling blob listener.

Mirrors: the binding's ``path`` ("container/{name}", other literal/``{param}`` patterns too);
blob receipts in container ``azure-webjobs-hosts`` of the trigger's account, named
``blobreceipts/<hostId>/Host.Functions.<name>/<ETag>/<container>/<blob>`` and created with
metadata ``Incomplete=true`` before the invocation, cleared once it is done, so each blob version
runs once across restarts and an overwrite (new ETag) runs again; a blob whose function keeps
failing is tried ``maxDequeueCount`` times in all, then a message shaped like the host's goes to
``webjobs-blobtrigger-poison`` and the receipt is completed. A ``source="EventGrid"`` trigger is
polled here too (Azure delivers those through an Event Grid subscription instead).
Differences: the host queues discovered blobs on an internal queue; here attempts are counted in
memory (a restart starts the count again) and retried on the next scan.

Odd names never stop a scan. A blob that fails on its own (its receipt cannot be written, its
properties not read) is logged with its name escaped and the reason, and tried again a minute later
while the scan goes on. A name Azurite cannot list (a character XML cannot carry) is found and handed
over all the same, and a name with a ``.`` or ``..`` segment addressed with its '/' written '\\': see
blob_listing.py. The receipt of either, and of a name too long for a receipt, is named from its
escaped form instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.blob import InputStream
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from tunedrop.host.blob_listing import MAX_BLOB_NAME, ContainerListing, addressable, odd_name
from tunedrop.host.config import HOST_CLIENT_OPTIONS, HostConfigError, resolve_settings, storage_connection_string
from tunedrop.host.invoke import FunctionSpec
from tunedrop.host.listener import HostContext, PollingListener
from tunedrop.host.queue import encode_message, ensure_queue

log = logging.getLogger("tunedrop.host")

HOSTS_CONTAINER = "azure-webjobs-hosts"
POISON_QUEUE = "webjobs-blobtrigger-poison"
#: A blob that failed on its own (receipt, properties) is tried again after this long.
BLOB_RETRY_S = 60.0

try:  # SDK-type bindings (azurefunctions-extensions-bindings-blob), optional like in the worker
    from azurefunctions.extensions.bindings import blob as blob_ext
except ImportError:  # pragma: no cover
    blob_ext = None


def compile_blob_path(pattern: str) -> tuple[re.Pattern, str]:
    """The regex for the part after the container, and the literal prefix to list with."""
    prefix = pattern.split("{", 1)[0]
    regex, pos = "", 0
    for match in re.finditer(r"\{([^{}]+)\}", pattern):
        regex += re.escape(pattern[pos:match.start()]) + r"(.+?)"
        pos = match.end()
    return re.compile(regex + re.escape(pattern[pos:]), re.DOTALL), prefix  # a name may hold a newline


def _printable(name: str) -> str:
    """A name for a log line: as it is when printable, else escaped as repr() escapes it."""
    return name if name.isprintable() else repr(name)[1:-1]


def _is_subclass(annotation: Any, cls: Any) -> bool:
    return isinstance(annotation, type) and cls is not None and issubclass(annotation, cls)


class BlobListener(PollingListener):
    def __init__(self, spec: FunctionSpec, ctx: HostContext):
        super().__init__(spec, ctx, workers=max(1, ctx.batch_size))
        where = f"Function {spec.name}"
        path = resolve_settings(spec.trigger["path"], ctx.environ, where).strip("/")
        self.container, _, pattern = path.partition("/")
        if not self.container or not pattern:
            raise HostConfigError(f"{where}: blob path {path!r} must be 'container/pattern', e.g. 'input/{{name}}'.")
        self.regex, self.prefix = compile_blob_path(pattern)
        self.connection = storage_connection_string(ctx.environ, spec.trigger.get("connection"), where)
        setting = spec.trigger.get("connection") or "AzureWebJobsStorage"
        self.connection_setting = setting if ctx.environ.get(setting) else f"AzureWebJobs{setting}"
        self.service = BlobServiceClient.from_connection_string(self.connection, **HOST_CLIENT_OPTIONS)
        self.queues = QueueServiceClient.from_connection_string(self.connection, **HOST_CLIENT_OPTIONS)
        self.bind_service = BlobServiceClient.from_connection_string(self.connection)  # what the extension builds
        self._lock = threading.Lock()
        self._done: set[tuple[str, str]] = set()
        self._in_flight: set[tuple[str, str]] = set()
        self._attempts: dict[tuple[str, str], int] = {}
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}  # blob version -> (next try, reason)
        # Probes of a listing Azurite fails: a 500 there is an answer, not something to retry.
        probe_service = BlobServiceClient.from_connection_string(self.connection, **{**HOST_CLIENT_OPTIONS, "retry_total": 0})
        self.listing = ContainerListing(self.service, probe_service, self.container, self.prefix, ctx.stopping,
                                        self._blob_failed, self.connection_setting, spec.log_name)

    def describe(self) -> str:
        return f"blobTrigger ({self.container}/{self.prefix}...)"

    def setup(self) -> None:
        for name in (self.container, HOSTS_CONTAINER):
            try:
                self.service.create_container(name)
            except ResourceExistsError:
                pass

    def poll(self) -> bool:
        for name, etag in self.listing.blobs():
            if self.ctx.stopping.is_set():
                break
            key = (name, etag)
            with self._lock:
                if key in self._done or key in self._in_flight or not self.regex.fullmatch(name):
                    continue
                failed = self._failed.get(key)
            if failed and failed[0] > time.monotonic():
                continue
            try:
                receipt = self._receipt(name, etag)
                claimed = self._claim(receipt)
            except Exception as exc:  # this blob's trouble, not the scan's: log it, go on with the others
                self._blob_failed(key, "its blob receipt could not be written", exc)
                continue
            with self._lock:
                self._failed.pop(key, None)
                if not claimed:
                    self._done.add(key)
                    continue
                self._in_flight.add(key)
            self._workers.submit(self._process, name, etag, receipt)
        return False

    def _blob_failed(self, key: tuple[str, str], what: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        with self._lock:
            first = key not in self._failed or self._failed[key][1] != reason
            self._failed[key] = (time.monotonic() + BLOB_RETRY_S, reason)
        (log.error if first else log.debug)(
            "Blob trigger for '%s': skipped blob %r in container '%s' for now: %s (%s). The scan goes on with the "
            "other blobs; this one is tried again in %.0f s.", self.spec.log_name, key[0], self.container, what,
            reason, BLOB_RETRY_S)

    def _receipt(self, name: str, etag: str):
        receipt = f"blobreceipts/{self.ctx.host_id}/{self.spec.function_id}/{etag}/{self.container}/"
        tail = name
        if odd_name(name) or len(receipt) + len(name) > MAX_BLOB_NAME:
            tail = "~" + quote(name, safe="")  # no dot segment, nothing XML cannot carry
            if len(receipt) + len(tail) > MAX_BLOB_NAME:
                tail = "~sha256-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return self.service.get_blob_client(HOSTS_CONTAINER, receipt + tail)

    def _claim(self, receipt) -> bool:
        """True when this blob version still has to run: no receipt yet (one is created) or an incomplete one."""
        try:
            receipt.upload_blob(b"", metadata={"Incomplete": "true"}, overwrite=False)  # If-None-Match: *
            return True
        except ResourceExistsError:
            pass
        try:
            return receipt.get_blob_properties().metadata.get("Incomplete") == "true"
        except ResourceNotFoundError:  # deleted meanwhile: look again on the next scan
            return False

    def _process(self, name: str, etag: str, receipt) -> None:
        key = (name, etag)
        try:
            outcome = self.ctx.invoker.invoke(
                self.spec, f"New blob detected(LogsAndContainerScan): {self.container}/{_printable(name)}",
                lambda: self.bind(name))
            if outcome.succeeded:
                self._complete(receipt, key)
                return
            with self._lock:
                attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if attempts >= self.ctx.max_dequeue_count:
                self._poison(name, etag)
                self._complete(receipt, key)
        except Exception as exc:  # storage trouble: try again on the next scan
            log.error("Blob trigger for '%s' could not record blob %r in container '%s': %s", self.spec.log_name, name,
                      self.container, exc)
        finally:
            with self._lock:
                self._in_flight.discard(key)

    def _complete(self, receipt, key) -> None:
        receipt.set_blob_metadata({})
        with self._lock:
            self._done.add(key)
            self._attempts.pop(key, None)

    def _poison(self, name: str, etag: str) -> None:
        log.warning("Blob %r in container '%s' has failed %d times. Moving a message to queue '%s'.",
                    name, self.container, self.ctx.max_dequeue_count, POISON_QUEUE)
        message = {"Type": "BlobTrigger", "FunctionId": self.spec.function_id, "BlobType": "BlockBlob",
                   "ContainerName": self.container, "BlobName": name, "ETag": etag}
        ensure_queue(self.queues, POISON_QUEUE).send_message(
            encode_message(json.dumps(message).encode("utf-8"), self.ctx.message_encoding))

    def bind(self, name: str) -> Any:
        """The value the worker passes, chosen by the parameter's annotation.

        SDK types (azurefunctions.extensions.bindings.blob) become the azure.storage.blob client the
        extension builds from the same connection: BlobClient -> azure.storage.blob.BlobClient,
        ContainerClient -> ContainerClient, StorageStreamDownloader -> the blob's download stream.
        bytes/str get the content; anything else a func.blob.InputStream.
        """
        annotation = self.spec.param_type
        client = self.bind_service.get_blob_client(self.container, name)
        if blob_ext is not None:
            if _is_subclass(annotation, blob_ext.BlobClient):
                return client  # by its name, as the extension builds it: the function deals with an odd one
            if _is_subclass(annotation, blob_ext.ContainerClient):
                return self.bind_service.get_container_client(self.container)
        client = self.bind_service.get_blob_client(self.container, addressable(name))
        if blob_ext is not None and _is_subclass(annotation, blob_ext.StorageStreamDownloader):
            return client.download_blob()
        downloader = client.download_blob()
        data = downloader.readall()
        if annotation is bytes:
            return data
        if annotation is str:
            return data.decode("utf-8")
        props = downloader.properties
        properties = {"Length": props.size, "ETag": props.etag, "BlobType": "BlockBlob",
                      "ContentType": props.content_settings.content_type,
                      "LastModified": props.last_modified.isoformat() if props.last_modified else None}
        return InputStream(data=data, name=f"{self.container}/{name}", uri=client.url, length=len(data),
                                     blob_properties=properties, metadata=dict(props.metadata or {}))
