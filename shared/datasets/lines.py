"""Byte chunks of any size into lines, without joining the file.

A line may straddle chunks (its pieces are joined, up to the limit); a line over ``max_line`` bytes
is measured and skipped, never held whole; a line that lies inside one chunk is handed over in
place, as (buffer, start, end), with no copy. The first bytes are sniffed (:func:`formats.sniff_text`)
so that a compressed or UTF-16 file is named as such instead of as a million bad lines.
"""

from __future__ import annotations

from typing import Callable

from shared.datasets.formats import HEAD, sniff_text


class LineSplitter:
    def __init__(self, max_line: int, on_line: Callable[[bytes, int, int, bool], None],
                 on_too_long: Callable[[int, bool], None]) -> None:
        self.max_line = max(1, max_line)
        self.on_line = on_line  # (buffer, start, end, ended by a newline)
        self.on_too_long = on_too_long  # (length, ended by a newline)
        self.read = 0  # bytes fed
        self.done = 0  # offset just past the last line handed over
        self.head: bytes | None = b""  # bytes collected before the sniff, None after
        self.pend = bytearray()  # the current partial line
        self.skip_len = 0  # > 0 while skipping a too-long line

    def feed(self, chunk) -> None:
        if not isinstance(chunk, (bytes, bytearray)):
            if isinstance(chunk, memoryview):
                chunk = chunk.tobytes()
            else:
                raise TypeError(f"chunks must be bytes, got {type(chunk).__name__}")
        if not chunk:
            return
        self.read += len(chunk)
        if self.head is not None:
            self.head += chunk
            if len(self.head) < HEAD:
                return
            chunk = self._sniff()
        self._split(chunk)

    def finish(self) -> None:
        if self.head is not None:  # a file shorter than the sniff window
            chunk = self._sniff()
            if chunk:
                self._split(chunk)
        if self.skip_len:
            total, self.skip_len = self.skip_len, 0
            self._too_long(total, False)
        elif self.pend:
            raw, self.pend = bytes(self.pend), bytearray()
            self._line(raw, 0, len(raw), False)

    def _sniff(self) -> bytes:
        head, self.head = self.head, None
        skip = sniff_text(head)
        self.done += skip
        return head[skip:]

    def _line(self, buf: bytes, start: int, end: int, newline: bool) -> None:
        self.done += end - start + newline
        self.on_line(buf, start, end, newline)

    def _too_long(self, length: int, newline: bool) -> None:
        self.done += length + newline
        self.on_too_long(length, newline)

    def _split(self, chunk) -> None:
        chunk = bytes(chunk)  # read in place below, so it must not change under us
        find = chunk.find
        pos = 0
        limit = self.max_line + 1  # +1: a trailing \r is not counted against the limit
        while True:
            nl = find(b"\n", pos)
            if nl < 0:
                break
            seg = nl - pos
            if self.skip_len:
                total = self.skip_len + seg
                self.skip_len = 0
                self._too_long(total, True)
            elif self.pend:
                if len(self.pend) + seg > limit:
                    total = len(self.pend) + seg
                    self.pend = bytearray()
                    self._too_long(total, True)
                else:
                    self.pend += chunk[pos:nl]
                    raw, self.pend = bytes(self.pend), bytearray()
                    self._line(raw, 0, len(raw), True)
            elif seg > limit:
                self._too_long(seg, True)
            else:
                self._line(chunk, pos, nl, True)  # no copy: the line is read in place
            pos = nl + 1
        rest = len(chunk) - pos
        if rest:
            if self.skip_len:
                self.skip_len += rest
            elif len(self.pend) + rest > limit:
                self.skip_len = len(self.pend) + rest
                self.pend = bytearray()
            else:
                self.pend += chunk[pos:]
        # the bytes of a partial line are accounted for when the line completes
