"""Dataset file formats: what a name says, what the first bytes say, and the readers that turn a
``.jsonl.gz`` into JSONL bytes and a ``.parquet`` into rows, all from a stream of byte chunks.

A reader raises :class:`FileFault` when the file as a whole cannot be read (not gzip, damaged, no
``messages`` column); what it yields is checked like any other dataset.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from shared.datasets.limits import RATIO_FLOOR, bound, ratio_too_high, too_large, too_many_examples
from shared.datasets.report import FileFault, short

#: Dataset formats: chat JSONL, gzip-compressed chat JSONL, Parquet with a ``messages`` column.
FORMATS = ("jsonl", "jsonl.gz", "parquet")
#: Decompressed bytes per step: a small gzip cannot balloon in memory.
GZ_OUT = 1 << 20
#: A Parquet upload is spooled in memory up to this, then to a temp file.
SPOOL_MEMORY = 16 << 20
PARQUET_BATCH = 1024

_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "name it .jsonl.gz (gzip is accepted under that name), or decompress it"),
    (b"PK\x03\x04", "a zip archive", "extract the .jsonl and upload it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (zstd -d) and upload the .jsonl"),
    (b"BZh", "bzip2-compressed", "decompress it (bunzip2) and upload the .jsonl"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz) and upload the .jsonl"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract the .jsonl and upload it"),
)
#: Bytes needed to recognise every magic number above.
HEAD = 6


def detect_format(name: str) -> str:
    """The format a dataset's file name says: ``*.parquet`` Parquet, ``*.gz`` gzipped JSONL, else JSONL."""
    low = str(name).lower()
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith(".gz"):
        return "jsonl.gz"
    return "jsonl"


def sniff_text(head: bytes) -> int:
    """How many leading bytes of a JSONL stream to skip (a UTF-8 byte-order mark), given its first
    :data:`HEAD` bytes; FileFault when they say it is compressed, an archive or UTF-16."""
    for magic, what, todo in _MAGIC:
        if head.startswith(magic) and (magic != b"BZh" or head[3:4].isdigit()):
            raise FileFault("compressed_file", f"file is {what}: {todo}")
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise FileFault("utf16_file", "file is UTF-16/binary (it starts with a UTF-16/UTF-32 byte-order mark): "
                        "save it as UTF-8 JSONL (one JSON object per line)")
    return 3 if head.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark: accepted, dropped


class GzipReader:
    """The decompressed bytes of a gzip stream (one or more members), at most :data:`GZ_OUT` at a time.

    ``max_ratio``: once :data:`limits.RATIO_FLOOR` bytes are inflated, a stream inflating more than that
    many times the compressed bytes it has consumed is refused (``compression_ratio_too_high``), there
    and then: a bomb is never inflated further."""

    def __init__(self, chunks: Iterable[bytes], max_ratio: float | None = None) -> None:
        self.chunks = chunks
        self.compressed_bytes = 0
        self.inflated = 0
        self.max_ratio = bound(max_ratio)

    def __iter__(self) -> Iterator[bytes]:
        import zlib

        d = zlib.decompressobj(wbits=31)
        head = b""  # the first bytes, until the magic number is checked
        member = False  # inside a member: some of its bytes were read, its end not yet
        for chunk in self.chunks:
            data = bytes(chunk)
            self.compressed_bytes += len(data)
            if head is not None:
                head += data
                if len(head) < 2:
                    continue
                if head[:2] != b"\x1f\x8b":
                    raise FileFault("corrupt_gzip", "file is named .gz but is not gzip-compressed: name it .jsonl "
                                    "if it is plain JSONL, or compress it with gzip")
                data, head = head, None
            while data:
                member = True
                try:
                    out = d.decompress(data, GZ_OUT)
                except zlib.error as exc:
                    raise FileFault("corrupt_gzip", f"the gzip data is damaged ({exc}): compress the file again "
                                    "with gzip and upload it whole") from None
                if out:
                    self.inflated += len(out)
                    if self.max_ratio is not None and self.inflated > RATIO_FLOOR:
                        consumed = self.compressed_bytes - len(d.unused_data if d.eof else d.unconsumed_tail)
                        if self.inflated > self.max_ratio * consumed:
                            raise ratio_too_high(self.max_ratio, self.inflated, consumed)
                    yield out
                if d.eof:  # a member ended; another may follow (concatenated gzip files)
                    data = d.unused_data
                    d = zlib.decompressobj(wbits=31)
                    member = False
                else:
                    data = d.unconsumed_tail
        if head:  # a single byte
            raise FileFault("corrupt_gzip", "file is named .gz but is not gzip-compressed: name it .jsonl if it is "
                            "plain JSONL")
        if member:
            raise FileFault("corrupt_gzip", "the gzip stream is cut short (an interrupted upload?): upload the whole "
                            "file again")


class ParquetReader:
    """The rows of a Parquet upload, a row group's batch at a time, nulls dropped (a null is "absent").

    The upload is spooled (memory up to :data:`SPOOL_MEMORY`, then a temp file), since Parquet's
    footer comes last; ``bytes`` counts it, ``rows`` the rows yielded so far, ``decoded`` the bytes
    of the rows decoded so far (Arrow's in-memory size: a Parquet file is compressed too). The
    limits: an upload over ``max_bytes`` stops spooling; the footer's row count over ``max_rows``,
    or its uncompressed size over ``max_bytes`` or ``max_ratio`` times the file, refuses the file
    before a row is read; the decoded rows are held to both limits batch by batch."""

    def __init__(self, chunks: Iterable[bytes], *, max_bytes: int | None = None, max_ratio: float | None = None,
                 max_rows: int | None = None) -> None:
        self.chunks = chunks
        self.bytes = 0
        self.rows = 0
        self.decoded = 0
        self.max_bytes, self.max_ratio, self.max_rows = bound(max_bytes), bound(max_ratio), bound(max_rows)

    def _check(self, size: int, what: str) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise too_large(self.max_bytes, size, True)
        if self.max_ratio is not None and size > RATIO_FLOOR and size > self.max_ratio * self.bytes:
            raise ratio_too_high(self.max_ratio, size, self.bytes, what)

    def __iter__(self) -> Iterator[list[dict]]:
        import tempfile

        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
            for chunk in self.chunks:
                spool.write(chunk)
                self.bytes += len(chunk)
                if self.max_bytes is not None and self.bytes > self.max_bytes:
                    raise too_large(self.max_bytes, self.bytes, False)
            if not self.bytes:
                return  # reported as an empty file
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise FileFault("parquet_unavailable", "Parquet needs pyarrow, which is not installed here: install "
                                "pyarrow, or upload the dataset as .jsonl or .jsonl.gz") from None
            spool.seek(0)
            try:
                pf = pq.ParquetFile(spool)
                names = pf.schema_arrow.names
            except Exception as exc:
                raise FileFault("invalid_parquet", f"not a readable Parquet file ({short(str(exc), 120)}): write it "
                                "with datasets' to_parquet or pyarrow, or upload JSONL") from None
            if "messages" not in names:
                raise FileFault("no_messages_column", f'no "messages" column (columns: {", ".join(names[:10]) or "none"}): '
                                'add a "messages" column of [{"role", "content"}, ...] lists')
            meta = pf.metadata
            if self.max_rows is not None and meta.num_rows > self.max_rows:
                raise too_many_examples(self.max_rows, meta.num_rows, rows=True)
            self._check(sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)),
                        "says it inflates")
            columns = [c for c in ("messages", "prompt", "prompt_id") if c in names]
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
                    self.decoded += batch.nbytes
                    self._check(self.decoded, "decodes")
                    rows = [_drop_nulls(row) for row in batch.to_pylist()]
                    self.rows += len(rows)
                    yield rows
            except FileFault:
                raise
            except Exception as exc:
                raise FileFault("invalid_parquet", f"Parquet data unreadable after row {self.rows:,} "
                                f"({short(str(exc), 120)}): write the file again") from None


def _drop_nulls(row: dict) -> dict:
    """A Parquet null means "absent" (columns and struct fields exist for every row)."""
    out = {k: x for k, x in row.items() if x is not None}
    msgs = out.get("messages")
    if type(msgs) is list:
        out["messages"] = [{k: x for k, x in m.items() if x is not None} if type(m) is dict else m for m in msgs]
    return out


def read_chunks(path, chunk_size: int) -> Iterator[bytes]:
    """A file on disk as ``chunk_size`` pieces."""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return
            yield chunk
