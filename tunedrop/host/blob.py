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
while the scan goes on. A name with a character XML cannot carry (a control character) makes Azurite
answer HTTP 500 to every listing page that would hold it (Azure sends such names percent-encoded,
``Encoded="true"``; Azurite 3.x cannot): the scan then narrows the page down to the blob it cannot
list, finds that blob's name by probing with ``startFrom`` (a lower bound Azurite does not echo into
its XML, unlike ``marker`` and ``prefix``), logs it with the command that deletes it, hands it to
the function like any blob, and goes on past it (of several such names in a row only the last can be
told apart; the one before it is found once it is gone, as ingest's quarantine removes it). A name
with a ``.`` or ``..`` segment is addressed with its '/' written '\\' (storage turns '\\' into '/';
HTTP clients resolve dot segments away), and the receipt of such a name, and of one XML cannot carry
or too long for a receipt, is named from its escaped form instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import sys
import threading
import time
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.functions.blob import InputStream
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from tunedrop.host.config import HOST_CLIENT_OPTIONS, HostConfigError, resolve_settings, storage_connection_string
from tunedrop.host.invoke import FunctionSpec
from tunedrop.host.listener import HostContext, PollingListener
from tunedrop.host.queue import encode_message, ensure_queue

log = logging.getLogger("tunedrop.host")

HOSTS_CONTAINER = "azure-webjobs-hosts"
POISON_QUEUE = "webjobs-blobtrigger-poison"
#: Blobs a listing page holds (the service's maximum).
PAGE_SIZE = 5000
#: A blob that failed on its own (receipt, properties) is tried again after this long.
BLOB_RETRY_S = 60.0
#: Listing probes spent finding the name of one blob Azurite cannot list (8 or so per character).
MAX_PROBES = 2500
#: After probing failed to find such a name, how long scans stop at it before probing again.
STUCK_RETRY_S = 300.0
#: Longest receipt name storage takes (1024 characters); a longer one is named from a hash.
MAX_BLOB_NAME = 1024

#: Characters XML 1.0 cannot carry: Azurite fails (500) every listing whose page would hold a name with one.
XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")
#: Code points in the order Azurite (JavaScript) compares strings, UTF-16 code units: the BMP below the
#: surrogates, then the supplementary planes (their surrogate pairs), then U+E000-U+FFFF.
_RANKS = ((0, 0xD800), (0x10000, 0x110000), (0xE000, 0x10000))
_RANK_COUNT = sum(high - low for low, high in _RANKS)


def _char_at(rank: int) -> str:
    for low, high in _RANKS:
        if rank < high - low:
            return chr(low + rank)
        rank -= high - low
    raise ValueError(rank)


def _js_order(name: str) -> bytes:
    """A sort key that orders strings as JavaScript (Azurite) compares them: by UTF-16 code unit."""
    return name.encode("utf-16-be", "surrogatepass")


def addressable(name: str) -> str:
    """The name to put in a blob URL. One with a '.' or '..' segment is written with '\\' for '/': HTTP
    clients resolve dot segments away (the request would name another path, or fail its signature),
    and storage turns '\\' back into '/'."""
    return name.replace("/", "\\") if _DOT_SEGMENT.search(name) else name


def odd_name(name: str) -> bool:
    """A name a URL path or an XML listing cannot carry as it is."""
    return bool(XML_ILLEGAL.search(name) or _DOT_SEGMENT.search(name) or "\\" in name)


def _literal(text: str) -> str:
    """``text`` as a double-quoted Python literal, escaped as repr() escapes it (control characters as \\xNN)."""
    shown = repr(text)
    if shown[0] == '"':
        return shown
    return '"' + shown[1:-1].replace("\\'", "'").replace('"', '\\"') + '"'


def delete_command(connection_setting: str, container: str, name: str) -> str:
    """A shell command that deletes one blob, its name escaped (control characters shown as \\xNN)."""
    code = (f"import os; from azure.storage.blob import ContainerClient; ContainerClient.from_connection_string("
            f"os.environ[{_literal(connection_setting)}], {_literal(container)}).delete_blob({_literal(addressable(name))})")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"

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


class _OutOfProbes(Exception):
    pass


_probing = threading.local()


class _QuietProbes(logging.Filter):
    """Drops the SDK's warning about each listing Azurite fails while the scan probes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_probing, "active", False)


logging.getLogger("azure.storage.blob._shared.response_handlers").addFilter(_QuietProbes())


def _printable(name: str) -> str:
    """A name for a log line: as it is when printable, else escaped as repr() escapes it."""
    return name if name.isprintable() else repr(name)[1:-1]


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'  # listings drop the quotes


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
        # Probes of a listing Azurite fails: a 500 there is an answer, not something to retry.
        self.probe_service = BlobServiceClient.from_connection_string(
            self.connection, **{**HOST_CLIENT_OPTIONS, "retry_total": 0})
        self.queues = QueueServiceClient.from_connection_string(self.connection, **HOST_CLIENT_OPTIONS)
        self.bind_service = BlobServiceClient.from_connection_string(self.connection)  # what the extension builds
        self._lock = threading.Lock()
        self._done: set[tuple[str, str]] = set()
        self._in_flight: set[tuple[str, str]] = set()
        self._attempts: dict[tuple[str, str], int] = {}
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}  # blob version -> (next try, reason)
        self._unlistable: dict[str, str] = {}  # scan position -> the unlistable name found there
        self._reported: set[str] = set()  # unlistable names and stuck positions already logged
        self._careful = False  # the last scan met a listing Azurite fails: list carefully from the start
        self._stuck: dict[str, float] = {}  # scan position whose unlistable name was not found -> probe again at

    def describe(self) -> str:
        return f"blobTrigger ({self.container}/{self.prefix}...)"

    def setup(self) -> None:
        for name in (self.container, HOSTS_CONTAINER):
            try:
                self.service.create_container(name)
            except ResourceExistsError:
                pass

    def poll(self) -> bool:
        for name, etag in self._listing():
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

    # -- listing --------------------------------------------------------------------------------

    def _listing(self):
        """(name, quoted ETag) of every blob under the prefix, in name order. When Azurite fails a page
        (HTTP 500: it cannot write a name XML cannot carry), the rest is listed carefully from the last
        name it did list (:meth:`_careful_listing`)."""
        if self._careful:  # skip the listing that failed last time (and its retry); stay careful while pages fail
            self._careful = False
            yield from self._careful_listing(None)
            return
        container = self.service.get_container_client(self.container)
        last = None
        try:
            for page in container.list_blobs(name_starts_with=self.prefix or None, results_per_page=PAGE_SIZE).by_page():
                for blob in page:
                    last = blob.name
                    yield blob.name, _quoted(blob.etag)
            return
        except HttpResponseError as exc:
            if exc.status_code != 500:
                raise
        yield from self._careful_listing(last)

    def _probe(self, start: str, size: int) -> list[tuple[str, str]] | None:
        """Up to ``size`` blobs from name ``start`` on (inclusive); None when Azurite fails that page (500)."""
        container = self.probe_service.get_container_client(self.container)
        pages = container.list_blobs(name_starts_with=self.prefix or None, results_per_page=size,
                                     start_from=start or None).by_page()
        _probing.active = True
        try:
            return [(blob.name, _quoted(blob.etag)) for blob in next(pages)]
        except StopIteration:
            return []
        except HttpResponseError as exc:
            if exc.status_code == 500:
                return None
            raise
        finally:
            _probing.active = False

    def _careful_listing(self, last: str | None):
        """List on from after ``last``, narrowing a failing page down to the one blob Azurite cannot list,
        finding its name (:meth:`_find_unlistable`), reporting it, yielding it, and going on past it."""
        start = "" if last is None else last + "\x00"  # the least name after `last`
        size = PAGE_SIZE
        while not self.ctx.stopping.is_set():
            listed = self._probe(start, size)
            if listed is not None:
                yield from listed
                if len(listed) < size:
                    return
                start, size = listed[-1][0] + "\x00", PAGE_SIZE
                continue
            self._careful = True
            if size > 1:
                size = max(1, size // 8)
                continue
            if self._stuck.get(start, 0.0) > time.monotonic():
                return  # reported already; probing again later
            name = self._find_unlistable(start)
            if name is None:
                self._stuck[start] = time.monotonic() + STUCK_RETRY_S
                self._report_stuck(last)
                return
            self._report_unlistable(name)
            try:
                etag = _quoted(self.service.get_blob_client(self.container, addressable(name)).get_blob_properties().etag)
            except Exception as exc:
                self._blob_failed((name, ""), "its properties could not be read", exc)
            else:
                yield name, etag
            last, start, size = name, name + "\x00", PAGE_SIZE

    def _find_unlistable(self, start: str) -> str | None:
        """The name of the blob at ``start`` that Azurite cannot list, found by probing; None if not found.

        ``fails(x)``: the first name at or after ``x`` is one Azurite cannot list. It holds from ``start``
        up to the last B of the row of such names that begins there (and again over any later row), so B
        is the greatest string it holds for: found a character at a time, each by bisection over the code
        points in Azurite's order. A probe that lists a good name G below the B found means B ends a later
        row: the search is done again below G. The names of a row before its last cannot be told apart
        by any listing; each is found once the one after it is gone (ingest quarantines it). A name found
        before at this position is checked with two probes."""
        known = self._unlistable.get(start)
        if known is not None and self._probe(known, 1) is None and self._probe(known + "\x00", 1) is not None:
            return known
        budget = [MAX_PROBES]
        upper: str | None = None
        while True:
            below: list[str] = []
            found = self._greatest_failing(start, upper, budget, below)
            if found is None:
                return None
            witness = min(below, key=_js_order, default=None)
            if witness is None or _js_order(witness) > _js_order(found):
                self._unlistable[start] = found
                return found
            upper = witness  # a listable blob lies between `start` and `found`: look below it

    def _greatest_failing(self, start: str, upper: str | None, budget: list[int], seen: list[str]) -> str | None:
        floor, ceiling = _js_order(start), _js_order(upper) if upper is not None else None

        def fails(x: str) -> bool:
            key = _js_order(x)
            if key <= floor:
                return True
            if ceiling is not None and key >= ceiling:
                return False
            if budget[0] <= 0:
                raise _OutOfProbes
            budget[0] -= 1
            listed = self._probe(x, 1)
            if listed:
                seen.append(listed[0][0])
            return listed is None

        found = ""
        try:
            while len(found) <= MAX_BLOB_NAME:
                if not fails(found + "\x00"):
                    return found or None
                low, high = 0, _RANK_COUNT - 1  # fails(found + _char_at(0)) holds: the bisection's floor
                if fails(found + _char_at(0x80)):  # most names are ASCII: settle that first
                    low = 0x80
                else:
                    high = 0x7F
                while low < high:
                    middle = (low + high + 1) // 2
                    if fails(found + _char_at(middle)):
                        low = middle
                    else:
                        high = middle - 1
                found += _char_at(low)
        except _OutOfProbes:
            return None
        return None

    def _report_unlistable(self, name: str) -> None:
        if name in self._reported:
            return
        self._reported.add(name)
        chars = ", ".join(sorted({f"U+{ord(c):04X}" for c in XML_ILLEGAL.findall(name)})) or "a character"
        log.error(
            "Blob trigger for '%s': Azurite answers HTTP 500 to every listing of container '%s' that would hold the "
            "blob %r: its name has %s, which XML cannot carry (Azure would send the name percent-encoded; Azurite "
            "cannot). Found by probing: the blob is handed to the function like any other and the scan goes on past "
            "it. Delete it (or upload it again under a plain name) with: %s",
            self.spec.log_name, self.container, name, chars, delete_command(self.connection_setting, self.container, name))

    def _report_stuck(self, last: str | None) -> None:
        where = "at its first blob" if last is None else f"at the first blob after {last!r}"
        if where in self._reported:
            return
        self._reported.add(where)
        log.error(
            "Blob trigger for '%s': Azurite answers HTTP 500 to every listing of container '%s' %s, and probing did "
            "not find that blob's name. Likely cause: a blob name with a control character (XML cannot carry it). "
            "Blobs listed before it are processed; those after it are not until it is deleted: find it with "
            "Storage Explorer, or `az storage blob list --container-name %s --prefix <start of the name>`, and "
            "delete it.", self.spec.log_name, self.container, where, self.container)

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
