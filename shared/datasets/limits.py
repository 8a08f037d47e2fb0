"""The dataset limits: how large, how compressed, how many examples and tokens, how repetitive a dataset
may be, and how long and costly its training estimate. Each is a setting (shared/settings.py); each
refusal names the limit, the figure found and the setting to raise.

Size, compression ratio, examples and tokens are checked while a file is read, and the first file past
one stops being read (a file-level fault, like ``compressed_file``): a gzip bomb is refused after its
first :data:`RATIO_FLOOR` bytes inflated, not after its last, in the memory of one piece. The
duplicate share is checked at the end, or as soon as the duplicates alone pass the share of
``max_examples`` (past that, the file is refused whatever follows). The estimate limits are checked
by :func:`shared.datasets.check_dataset` on the report's training estimate.

The trainers read rows with the same limits (:func:`shared.datasets.iter_conversations` raises
:class:`DatasetLimitError`), so nothing past them is trained on even if it was never validated.
"""

from __future__ import annotations

from shared.datasets.report import FileFault, plural

#: The compression-ratio limit applies once this many bytes are inflated: a smaller file is harmless
#: however well it compresses (a few repeated rows compress 100x).
RATIO_FLOOR = 16 << 20

#: Validator option -> (Settings field, its environment variable).
OPTIONS: dict[str, tuple[str, str]] = {
    "max_bytes": ("max_dataset_bytes", "TUNEDROP_MAX_DATASET_BYTES"),
    "max_ratio": ("max_compression_ratio", "TUNEDROP_MAX_COMPRESSION_RATIO"),
    "max_examples": ("max_examples", "TUNEDROP_MAX_EXAMPLES"),
    "max_tokens": ("max_tokens", "TUNEDROP_MAX_TOKENS"),
    "max_duplicate_share": ("max_duplicate_share", "TUNEDROP_MAX_DUPLICATE_SHARE"),
}
#: The estimate limits (checked on the report, not while reading): Settings field -> environment variable.
ESTIMATE_SETTINGS = {"max_estimated_hours": "TUNEDROP_MAX_ESTIMATED_HOURS",
                     "max_estimated_cost": "TUNEDROP_MAX_ESTIMATED_COST"}
#: The codes of the limits checked while reading: iter_conversations raises on these.
READING_CODES = ("dataset_too_large", "compression_ratio_too_high", "too_many_examples", "too_many_tokens",
                 "too_many_duplicates")


class DatasetLimitError(ValueError):
    """A file read for training is past a dataset limit; ``code`` is the dataset fault code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def reading_limits(settings) -> dict:
    """The validator's (and iter_conversations') limit options from ``settings``."""
    return {option: getattr(settings, field) for option, (field, _) in OPTIONS.items()}


def training_limits(settings) -> dict:
    """The options a trainer reads rows with (:func:`shared.datasets.iter_conversations`): the line,
    size, ratio and example limits of ``settings`` (tokens and duplicates are not counted there)."""
    return {"max_line_bytes": settings.max_line_bytes, "max_bytes": settings.max_dataset_bytes,
            "max_ratio": settings.max_compression_ratio, "max_examples": settings.max_examples}


def bound(value):
    """A limit as the readers use it: None where it is off (None, 0 or less)."""
    return value if value is not None and value > 0 else None


def _env(option: str) -> str:
    return OPTIONS[option][1]


# -- the refusals ------------------------------------------------------------------------------------


def too_large(limit: int, read: int, compressed: bool) -> FileFault:
    what = "inflates to" if compressed else "is"
    return FileFault("dataset_too_large", f"file {what} more than {limit:,} bytes, the limit (reading stopped at "
                     f"{read:,} bytes): split the dataset, or raise {_env('max_bytes')}")


def ratio_too_high(limit: float, inflated: int, compressed: int, what: str = "inflates") -> FileFault:
    ratio = inflated / max(1, compressed)
    return FileFault("compression_ratio_too_high", f"file {what} {ratio:,.0f}x ({inflated:,} bytes from the first "
                     f"{compressed:,} compressed bytes), over the {limit:g}x limit: a compression bomb or the same "
                     f"rows over and over? Upload the dataset you mean to train on, or raise {_env('max_ratio')}")


def too_many_examples(limit: int, found: int, rows: bool = False) -> FileFault:
    """``rows``: ``found`` is a Parquet file's row count, read from its footer before any row."""
    where = (f"file has {plural(found, 'row')}, more than {plural(limit, 'example')}, the limit (read from its "
             "footer)" if rows else
             f"file holds more than {plural(limit, 'example')}, the limit (reading stopped at example {found:,})")
    return FileFault("too_many_examples", f"{where}: split or sample the dataset, or raise {_env('max_examples')}")


def too_many_tokens(limit: int, found: int, stopped: bool = True) -> FileFault:
    where = (f"file holds more than {limit:,} tokens, the limit (reading stopped at {found:,})" if stopped else
             f"file holds {found:,} tokens, more than {limit:,}, the limit")
    return FileFault("too_many_tokens", f"{where}: split or sample the dataset, or raise {_env('max_tokens')}")


def too_many_duplicates(limit: float, duplicates: int, examples: int, max_examples: int | None = None) -> FileFault:
    """``max_examples`` given: reading stopped there, the duplicates being over ``limit`` of the most examples the
    file may hold (whatever follows, the share ends over the limit, or the file over max_examples)."""
    where = (f"{duplicates:,} of the first {plural(examples, 'example')} repeat an earlier conversation, more "
             f"than {limit:.0%} of the {max_examples:,} a file may hold ({_env('max_examples')}), so the share is "
             f"over the {limit:.0%} limit whatever follows" if max_examples is not None else
             f"{duplicates:,} of {plural(examples, 'example')} ({duplicates / max(1, examples):.0%}) repeat an "
             f"earlier conversation, over the {limit:.0%} limit")
    return FileFault("too_many_duplicates", f"{where}: remove the copies (or check that the export did not repeat "
                     f"rows), or raise {_env('max_duplicate_share')}")


def estimate_refusals(training: dict, max_hours: float | None, max_cost: float | None) -> list[tuple[str, str, str]]:
    """(code, message, field) for each estimate limit the training estimate is past."""
    out = []
    hours = training["estimated_seconds"] / 3600
    if bound(max_hours) is not None and hours > max_hours:
        out.append(("training_too_long", f"the training estimate is {hours:,.1f} h ({training['training_tokens']:,} "
                    f"tokens at ~{training['tokens_per_s']:,.0f} tokens/s on {training['compute']}), over the "
                    f"{max_hours:g} h limit: set max_steps or num_train_epochs lower, sample the dataset, or raise "
                    f"{ESTIMATE_SETTINGS['max_estimated_hours']}", "training"))
    cost = training["estimated_cost"]
    if bound(max_cost) is not None and cost > max_cost:
        out.append(("training_too_costly", f"the training estimate costs ~{cost:,.2f} ({hours:,.1f} h on "
                    f"{training['compute']}), over the {max_cost:,.2f} limit: set max_steps or num_train_epochs "
                    f"lower, sample the dataset, or raise {ESTIMATE_SETTINGS['max_estimated_cost']}", "training"))
    return out
