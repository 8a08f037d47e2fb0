"""The blob trigger's listing of a container, and its way past names Azurite cannot list.

A name with a character XML cannot carry (a control character) makes Azurite answer HTTP 500 to
every listing page that would hold it (Azure sends such names percent-encoded, ``Encoded="true"``;
Azurite 3.x cannot): the scan then narrows the page down to the blob it cannot list, finds that
blob's name by probing with ``startFrom`` (a lower bound Azurite does not echo into its XML, unlike
``marker`` and ``prefix``), logs it with the command that deletes it, hands it to the function like
any blob, and goes on past it (of several such names in a row only the last can be told apart; the
one before it is found once it is gone, as ingest's quarantine removes it). A name with a ``.`` or
``..`` segment is addressed with its '/' written '\\' (storage turns '\\' into '/'; HTTP clients
resolve dot segments away): :func:`addressable`.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import threading
import time
from typing import Callable, Iterator

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient

log = logging.getLogger("tunedrop.host")

#: Blobs a listing page holds (the service's maximum).
PAGE_SIZE = 5000
#: Listing probes spent finding the name of one blob Azurite cannot list (8 or so per character).
MAX_PROBES = 2500
#: After probing failed to find such a name, how long scans stop at it before probing again.
STUCK_RETRY_S = 300.0
#: Longest blob name storage takes (1024 characters); a longer receipt name is named from a hash.
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


class _OutOfProbes(Exception):
    pass


_probing = threading.local()


class _QuietProbes(logging.Filter):
    """Drops the SDK's warning about each listing Azurite fails while the scan probes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_probing, "active", False)


logging.getLogger("azure.storage.blob._shared.response_handlers").addFilter(_QuietProbes())


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'  # listings drop the quotes


class ContainerListing:
    """The blobs of one container under a prefix, scan after scan, past names Azurite cannot list.

    ``service`` lists and reads properties; ``probe_service`` (no retries: a 500 there is an answer)
    probes. ``blob_failed(key, what, exc)`` is told of a blob that failed on its own (its properties
    could not be read); ``connection_setting`` and ``log_name`` go into the messages.
    """

    def __init__(self, service: BlobServiceClient, probe_service: BlobServiceClient, container: str, prefix: str,
                 stopping: threading.Event, blob_failed: Callable[[tuple[str, str], str, Exception], None],
                 connection_setting: str, log_name: str):
        self.service = service
        self.probe_service = probe_service
        self.container = container
        self.prefix = prefix
        self.stopping = stopping
        self.blob_failed = blob_failed
        self.connection_setting = connection_setting
        self.log_name = log_name
        self._unlistable: dict[str, str] = {}  # scan position -> the unlistable name found there
        self._reported: set[str] = set()  # unlistable names and stuck positions already logged
        self._careful = False  # the last scan met a listing Azurite fails: list carefully from the start
        self._stuck: dict[str, float] = {}  # scan position whose unlistable name was not found -> probe again at

    def blobs(self) -> Iterator[tuple[str, str]]:
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
        while not self.stopping.is_set():
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
                self.blob_failed((name, ""), "its properties could not be read", exc)
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
            self.log_name, self.container, name, chars, delete_command(self.connection_setting, self.container, name))

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
            "delete it.", self.log_name, self.container, where, self.container)
