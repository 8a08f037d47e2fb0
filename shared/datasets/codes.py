"""The dataset fault catalogue: every code a dataset check can report, with what it means.

An error rejects the dataset; a warning is reported and the dataset still trains. The catalogue is the
single list the report, the documentation (docs/dataset-faults.md, generated) and the tests read.
"""

from __future__ import annotations

#: Every code an error can carry, with what it means.
ERROR_CODES: dict[str, str] = {
    # file level
    "empty_file": "The file is empty or holds only blank lines.",
    "compressed_file": "The file is compressed (gzip, zip, zstd, bzip2, xz, 7z), not plain JSONL.",
    "utf16_file": "The file starts with a UTF-16/UTF-32 byte-order mark instead of being UTF-8.",
    "binary_file": "The file holds NUL bytes: it is UTF-16 without a byte-order mark, or binary.",
    "corrupt_gzip": "A .jsonl.gz file is not gzip, or its compressed stream is damaged or cut short.",
    "invalid_parquet": "A .parquet file cannot be read as Parquet (damaged, cut short, or another format).",
    "no_messages_column": "A Parquet file has no \"messages\" column.",
    "parquet_unavailable": "Parquet support (pyarrow) is not installed where the validator runs.",
    # file level: the dataset limits (shared/datasets/limits.py), reading stops there
    "dataset_too_large": "A file is larger than TUNEDROP_MAX_DATASET_BYTES once decompressed (decoded, for "
    "Parquet); reading stopped there.",
    "compression_ratio_too_high": "A .jsonl.gz or Parquet file inflates more than TUNEDROP_MAX_COMPRESSION_RATIO "
    "times its compressed size (a compression bomb, or the same rows over and over); reading stopped there.",
    "too_many_examples": "A file holds more examples (a Parquet file, rows) than TUNEDROP_MAX_EXAMPLES; reading "
    "stopped there.",
    "too_many_tokens": "A file holds more tokens than TUNEDROP_MAX_TOKENS; reading stopped there.",
    # line level: syntax
    "line_too_long": "A line is longer than max_line_bytes; it was skipped unread.",
    "invalid_utf8": "A line is not valid UTF-8.",
    "nesting_too_deep": "A line's JSON nests arrays/objects deeper than max_depth.",
    "invalid_json": "A line is not one valid JSON value (RFC 8259).",
    "non_finite_number": "A line uses NaN, Infinity or -Infinity, which JSON does not allow.",
    "duplicate_key": "An object on the line has the same key twice.",
    "lone_surrogate": "A content string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).",
    # line level: row shape
    "not_an_object": "The line's JSON value is not an object.",
    "missing_messages": "The row has no \"messages\" key.",
    "messages_not_list": "\"messages\" is not an array.",
    "empty_messages": "\"messages\" is an empty array.",
    "message_not_object": "A message is not an object.",
    "missing_role": "A message has no \"role\".",
    "role_not_string": "A message's role is not a string.",
    "unknown_role": "A message's role is not system, user or assistant.",
    "missing_content": "A message has no \"content\".",
    "content_not_string": "A message's content is not a string (null, a number, a list of parts...).",
    "tool_calls_unsupported": "An assistant message carries tool/function calls instead of content.",
    "empty_content": "A message's content is empty or only whitespace.",
    "invalid_weight": "A message's weight is not 0 or 1.",
    "prompt_not_string": "The ultrachat \"prompt\" field is present but not a string.",
    "prompt_id_not_string": "The ultrachat \"prompt_id\" field is present but not a string.",
    # line level: conversation
    "system_not_first": "A system message is not the first message.",
    "multiple_system_messages": "A conversation has more than one system message.",
    "consecutive_same_role": "Two user messages or two assistant messages follow each other.",
    "no_assistant_message": "A conversation has no assistant message: nothing to learn.",
    "all_weights_zero": "Every assistant message has weight 0: nothing to learn.",
    # dataset level
    "too_few_examples": "Fewer valid examples than min_examples.",
    "too_many_duplicates": "More than TUNEDROP_MAX_DUPLICATE_SHARE of a file's examples repeat an earlier "
    "conversation (reading stops once that is certain).",
    "training_too_long": "The rough training-time estimate is over TUNEDROP_MAX_ESTIMATED_HOURS.",
    "training_too_costly": "The rough training-cost estimate is over TUNEDROP_MAX_ESTIMATED_COST.",
    "bad_override": "A training-parameter override (blob metadata `tunedrop_<param>`, the sidecar "
    "`<name>.tunedrop.json`, or TUNEDROP_TRAINING_OVERRIDES) is unknown, has a bad value, or the sidecar "
    "is not a JSON object.",
}

#: Every code a warning can carry, with what it means.
WARNING_CODES: dict[str, str] = {
    "blank_line": "Blank line(s) in the middle of the file (blank lines at the end are fine).",
    "unknown_message_key": "A message has a key other than role, content, weight; it is ignored "
    "(warned once per key name, occurrences counted in stats).",
    "last_message_not_assistant": "A conversation does not end with an assistant message; "
    "the trailing turns teach nothing.",
    "duplicate_conversation": "The same conversation (roles and contents) appeared on an earlier line.",
    "test_in_train": "A conversation of a train/test pair's test file is also in its train file: the test "
    "loss would flatter the model on what it was trained on.",
    "too_long": "Examples longer than max_seq_length tokens of the target model: they will be truncated "
    "(one warning, with the count and the first line).",
}

CODES: dict[str, str] = {**ERROR_CODES, **WARNING_CODES}
