"""Seed step 4, the data: a run's validated dataset streamed into the data container as the chat
JSONL train/test files the pipeline job reads, in staged blocks of bounded size. The test file is the
held-out examples the job evaluates: at most TUNEDROP_MAX_EVAL_EXAMPLES of them, the seeded sample the
local trainer evaluates too (shared/split.py).
"""

from __future__ import annotations

import json
import tempfile

from shared.backends.base import BackendError
from shared.split import SeededSample, split_stream
from shared.training import TrainingConfig

#: Held-out lines of the evaluation sample are kept in memory up to this, then in a temp file.
SPOOL_MEMORY = 16 << 20


def write_split(storage, settings, run, config: TrainingConfig) -> tuple[str, str | None]:
    """Stream the validated dataset into `<run>/train.jsonl` and `<run>/test.jsonl` in the data container.

    Whatever format was dropped (.jsonl, .jsonl.gz, Parquet), the pipeline gets chat JSONL, one
    `{"messages": [...]}` per line, as the validator read it. A train/test pair is copied as given.
    A single file is split by :func:`shared.split.split_stream`, as the local backend splits it:
    deterministic, one pass, bounded memory (blocks of 4 MiB are staged as they fill). The held-out
    examples are capped at ``settings.max_eval_examples``, a seeded sample (:class:`SeededSample`) in
    held-out order. The dataset limits hold here too: a file past one fails the step with its dataset
    code (it cannot have been accepted under the same settings). Returns the `azureml://datastores/...`
    URIs the pipeline reads.
    """
    from shared.datasets import DatasetLimitError

    service = storage.blob_service
    container = storage.ensure_container(settings.azureml_data_container)
    paths = {"train": f"{run.run_id}/train.jsonl", "test": f"{run.run_id}/test.jsonl"}
    writers = {side: _BlockWriter(container.get_blob_client(path)) for side, path in paths.items()}
    with_test = bool(run.test_blob) or config.test_fraction > 0
    held_out = _EvalLines(settings.max_eval_examples, config.seed)
    reading = run.dataset_blob
    try:
        if run.test_blob:
            for line in _chat_lines(service, run.dataset_container, run.dataset_blob, run.dataset_etag, settings):
                writers["train"].write(line)
            reading = run.test_blob
            for line in _chat_lines(service, run.dataset_container, run.test_blob, run.test_etag, settings):
                held_out.add(line)
        else:
            lines = _chat_lines(service, run.dataset_container, run.dataset_blob, run.dataset_etag, settings)
            for side, line in split_stream(lines, config.test_fraction, config.seed):
                if side == "train":
                    writers["train"].write(line)
                else:
                    held_out.add(line)
    except DatasetLimitError as exc:
        held_out.spool.close()
        raise BackendError(f"dataset {reading}: {exc}", code=exc.code) from None
    for line in held_out.lines():
        writers["test"].write(line)
    writers["train"].commit()
    if with_test:
        writers["test"].commit()
    store = settings.azureml_datastore
    train = f"azureml://datastores/{store}/paths/{paths['train']}"
    test = f"azureml://datastores/{store}/paths/{paths['test']}" if with_test else None
    return train, test


def _chat_lines(service, container: str, blob: str, etag: str, settings):
    """The examples of one blob version as chat JSONL lines, whatever its format, within the dataset limits."""
    from azure.core import MatchConditions

    from shared.datasets import detect_format, iter_conversations, training_limits

    stream = service.get_blob_client(container, blob).download_blob(
        etag=etag, match_condition=MatchConditions.IfNotModified)
    for messages in iter_conversations(stream.chunks(), format=detect_format(blob), **training_limits(settings)):
        yield json.dumps({"messages": messages}, ensure_ascii=False).encode() + b"\n"


class _EvalLines:
    """The held-out lines the job evaluates (:class:`SeededSample` of ``cap``; 0: all), fed in held-out
    order: the sample keeps (offset, length) of each line, the lines wait in a spooled temp file."""

    def __init__(self, cap: int, seed: int) -> None:
        self.sample: SeededSample[tuple[int, int]] = SeededSample(cap, seed)
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)

    def add(self, line: bytes) -> None:
        offset = self.spool.tell()
        self.spool.write(line)
        if self.sample.add((offset, len(line))) == (offset, len(line)):  # not sampled: its bytes go again
            self.spool.seek(offset)
            self.spool.truncate()

    def lines(self):
        with self.spool:
            for offset, length in self.sample.examples():
                self.spool.seek(offset)
                yield self.spool.read(length)


class _BlockWriter:
    """Write a block blob as staged blocks of up to 4 MiB, committed at the end (bounded memory)."""

    BLOCK = 4 * 1024 * 1024

    def __init__(self, blob):
        self.blob, self.buffer, self.blocks = blob, bytearray(), []

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= self.BLOCK:
            self._stage()

    def _stage(self) -> None:
        from azure.storage.blob import BlobBlock

        block_id = f"{len(self.blocks):08d}"
        self.blob.stage_block(block_id, bytes(self.buffer))
        self.blocks.append(BlobBlock(block_id=block_id))
        self.buffer = bytearray()

    def commit(self) -> None:
        if self.buffer or not self.blocks:
            self._stage()
        self.blob.commit_block_list(self.blocks)
