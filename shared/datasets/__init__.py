"""Chat datasets: their formats, the rules a conversation keeps, and the report a check makes.

One public entry checks a dropped dataset with its overrides, :func:`check_dataset`; the rest is
for callers that need one part (the trainers read rows with :func:`iter_conversations`).

====================  ============================================================================
``check``             check_dataset: overrides -> tokenizer -> validate (file or pair) -> estimate
``validator``         the streaming engine: chunks -> lines -> rows -> counted -> report
``formats``           file names and magic numbers; the gzip and Parquet readers
``limits``            the dataset limits (size, compression ratio, examples, tokens, duplicates, estimate)
``lines``             byte chunks into lines, in place, bounded
``strict_json``       strict RFC 8259 JSON of one line, with the field a fault is in
``rows``              a row into a conversation: the typed fast path and the general path
``rules``             the conversation rules, written once for both paths
``stats``             bounded statistics: duplicate hashes, size distributions
``token_count``       tokens per example, batched; the too_long warning
``pairs``             train/test pair naming and the pair's joint report
``report``            Issue, Report, the capped issue log; ``codes``: the fault catalogue
====================  ============================================================================
"""

from shared.datasets.check import check_dataset
from shared.datasets.codes import CODES, ERROR_CODES, WARNING_CODES
from shared.datasets.formats import FORMATS, detect_format
from shared.datasets.limits import DatasetLimitError, reading_limits, training_limits
from shared.datasets.pairs import DATASET_SUFFIXES, PairHalf, pair_half, validate_pair
from shared.datasets.report import Issue, Report
from shared.datasets.validator import iter_conversations, validate_chunks, validate_path

__all__ = [
    "CODES", "DATASET_SUFFIXES", "ERROR_CODES", "FORMATS", "WARNING_CODES", "DatasetLimitError", "Issue", "PairHalf",
    "Report", "check_dataset", "detect_format", "iter_conversations", "pair_half", "reading_limits", "training_limits",
    "validate_chunks", "validate_pair", "validate_path",
]
