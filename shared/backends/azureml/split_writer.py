"""Seed step 4, the data: a run's validated dataset streamed into the data container as the chat
JSONL train/test files the pipeline job reads, in staged blocks of bounded size.
"""

from __future__ import annotations

import json

from shared.split import split_stream
from shared.training import TrainingConfig


def write_split(storage, settings, run, config: TrainingConfig) -> tuple[str, str | None]:
    """Stream the validated dataset into `<run>/train.jsonl` and `<run>/test.jsonl` in the data container.

    Whatever format was dropped (.jsonl, .jsonl.gz, Parquet), the pipeline gets chat JSONL, one
    `{"messages": [...]}` per line, as the validator read it. A train/test pair is copied as given.
    A single file is split by :func:`shared.split.split_stream`, as the local backend splits it:
    deterministic, one pass, bounded memory (blocks of 4 MiB are staged as they fill). Returns the
    `azureml://datastores/...` URIs the pipeline reads.
    """

    service = storage.blob_service
    container = storage.ensure_container(settings.azureml_data_container)
    paths = {"train": f"{run.run_id}/train.jsonl", "test": f"{run.run_id}/test.jsonl"}
    writers = {side: _BlockWriter(container.get_blob_client(path)) for side, path in paths.items()}
    with_test = bool(run.test_blob) or config.test_fraction > 0
    if run.test_blob:
        for side, blob, etag in (("train", run.dataset_blob, run.dataset_etag), ("test", run.test_blob, run.test_etag)):
            for line in _chat_lines(service, run.dataset_container, blob, etag):
                writers[side].write(line)
    else:
        lines = _chat_lines(service, run.dataset_container, run.dataset_blob, run.dataset_etag)
        for side, line in split_stream(lines, config.test_fraction, config.seed):
            writers[side].write(line)
    writers["train"].commit()
    if with_test:
        writers["test"].commit()
    store = settings.azureml_datastore
    train = f"azureml://datastores/{store}/paths/{paths['train']}"
    test = f"azureml://datastores/{store}/paths/{paths['test']}" if with_test else None
    return train, test


def _chat_lines(service, container: str, blob: str, etag: str):
    """The examples of one blob version as chat JSONL lines, whatever its format."""
    from azure.core import MatchConditions

    from shared.datasets import detect_format, iter_conversations

    stream = service.get_blob_client(container, blob).download_blob(
        etag=etag, match_condition=MatchConditions.IfNotModified)
    for messages in iter_conversations(stream.chunks(), format=detect_format(blob)):
        yield json.dumps({"messages": messages}, ensure_ascii=False).encode() + b"\n"


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
