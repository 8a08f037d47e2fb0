"""The dataset limits (shared/datasets/limits.py) and bounded evaluation (shared/split.py): a gzip bomb is
refused in its first megabytes, each limit names the figure found and the setting to raise, the readers
of the trainers keep to them, and both backends evaluate the same capped, seeded sample."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
import time
import tracemalloc
import zlib
from dataclasses import fields

import pytest

from shared.datasets import (
    DatasetLimitError,
    check_dataset,
    iter_conversations,
    reading_limits,
    validate_chunks,
)
from shared.datasets.formats import GZ_OUT, GzipReader
from shared.datasets.limits import ESTIMATE_SETTINGS, OPTIONS, RATIO_FLOOR
from shared.datasets.report import FileFault
from shared.settings import Settings
from shared.split import eval_sample, held_out_count, split_examples
from shared.tokens import EstimateTokenizer
from tests.test_validation import chunked, codes, line, row

#: The codes whose tests are here (test_validation checks that every code is tested somewhere).
LIMIT_CODES = {"dataset_too_large", "compression_ratio_too_high", "too_many_examples", "too_many_tokens",
               "too_many_duplicates", "training_too_long", "training_too_costly"}
SETTINGS = Settings(count_tokens=False)


def rows(n: int, start: int = 0) -> bytes:
    return b"".join(line(row(start + i)) + b"\n" for i in range(n))


def gzip_bomb(inflated_mib: int) -> bytes:
    """A real, complete gzip file (one member) of one repeated line, built without deflating it all: an 8 MiB
    block deflated once after a full flush is the same bytes every time, so it is repeated (as the user's
    9.6 MB file that inflates to 2.2 GB, ~220x)."""
    one = line(row(1)) + b"\n"
    block = one * ((8 << 20) // len(one))
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    n = max(1, (inflated_mib << 20) // len(block))
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(block, crc)
    return first + again * (n - 1) + b"\x03\x00" + struct.pack("<II", crc, (len(block) * n) & 0xFFFFFFFF)


def check(data: bytes, name: str = "chat.jsonl", **settings):
    return check_dataset(dataclasses.replace(SETTINGS, **settings), (name, chunked(data, 1 << 20)))[0]


def test_every_limit_names_a_setting_that_exists():
    envs = {f.metadata["env"]: f.name for f in fields(Settings)}
    for field, env in [*OPTIONS.values(), *((f, e) for f, e in ESTIMATE_SETTINGS.items())]:
        assert envs.get(env) == field
    assert set(reading_limits(SETTINGS)) == set(OPTIONS)


# -- the gzip bomb of the issue -------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_in_its_first_megabytes():
    assert gzip.decompress(gzip_bomb(16)) == (line(row(1)) + b"\n") * ((8 << 20) // len(line(row(1)) + b"\n")) * 2
    bomb = gzip_bomb(2200)  # 2.2 GB of one line in ~9 MB, as the issue's
    assert len(bomb) < 12_000_000
    started = time.perf_counter()
    report = check(bomb, "bomb.jsonl.gz")
    seconds = time.perf_counter() - started
    assert not report.accepted and codes(report.errors) == ["compression_ratio_too_high"], report.summary()
    assert seconds < 10, seconds  # was: 6.5 minutes, then accepted
    message = report.errors[0].message
    assert "TUNEDROP_MAX_COMPRESSION_RATIO" in message and "100x limit" in message and "bytes from the first" in message
    assert report.stats["stopped_early"] and report.stats["bytes"] <= RATIO_FLOOR + GZ_OUT
    # in bounded memory: the reader inflates a piece at a time and stops at the floor
    pieces = chunked(bomb, 4 << 20)  # as a blob download gives it
    tracemalloc.start()
    try:
        with pytest.raises(FileFault) as fault:
            for _ in GzipReader(pieces, max_ratio=100):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fault.value.code == "compression_ratio_too_high" and peak < 12 << 20, peak  # a piece or two, not 2.2 GB
    with pytest.raises(DatasetLimitError) as caught:  # what the trainers read with
        for _ in iter_conversations(chunked(bomb, 4 << 20), format="jsonl.gz", max_ratio=100):
            pass
    assert caught.value.code == "compression_ratio_too_high"


def test_without_the_ratio_limit_the_inflated_size_stops_it():
    bomb = gzip_bomb(64)
    report = check(bomb, "bomb.jsonl.gz", max_compression_ratio=0, max_dataset_bytes=20 << 20,
                   max_duplicate_share=0)
    assert codes(report.errors) == ["dataset_too_large"], report.summary()
    assert "inflates to more than 20,971,520 bytes" in report.errors[0].message
    assert "TUNEDROP_MAX_DATASET_BYTES" in report.errors[0].message
    assert report.stats["bytes"] <= 20 << 20
    # and without either, the duplicates are certain to be over their share well before the end
    report = check(bomb, "bomb.jsonl.gz", max_compression_ratio=0, max_examples=10_000)
    assert codes(report.errors) == ["too_many_duplicates"] and report.stats["examples"] < 10_000  # of 300,000+
    assert "TUNEDROP_MAX_DUPLICATE_SHARE" in report.errors[0].message


def test_a_small_file_may_compress_well():
    repetitive = [row(i, note="the same words " * 5000) for i in range(12)]
    data = b"".join(line(r) + b"\n" for r in repetitive)
    packed = gzip.compress(data)
    assert len(data) / len(packed) > 100 and len(data) < RATIO_FLOOR  # harmless however well it compresses
    assert check(packed, "chat.jsonl.gz").accepted


def test_the_size_limit_applies_to_plain_files_and_stops_reading():
    data = rows(2000)
    report = validate_chunks(chunked(data, 4096), max_bytes=100_000)
    assert codes(report.errors) == ["dataset_too_large"]
    assert "file is more than 100,000 bytes" in report.errors[0].message
    assert report.stats["bytes"] <= 100_000 and report.stats["stopped_early"]
    assert validate_chunks([data], max_bytes=len(data)).accepted  # at the limit: accepted
    with pytest.raises(DatasetLimitError):
        list(iter_conversations(chunked(data, 4096), max_bytes=100_000))


# -- examples, tokens, duplicates -------------------------------------------------------------------------------


def test_too_many_examples_stops_reading_and_the_trainers_read_no_further():
    data = rows(500)
    report = validate_chunks(chunked(data, 2048), max_examples=100)
    assert codes(report.errors) == ["too_many_examples"], report.summary()
    assert "more than 100 examples" in report.errors[0].message and "TUNEDROP_MAX_EXAMPLES" in report.errors[0].message
    assert 100 < report.stats["examples"] < 130
    assert validate_chunks([rows(100)], max_examples=100).accepted
    read = []
    with pytest.raises(DatasetLimitError) as caught:
        for conversation in iter_conversations(chunked(data, 2048), max_examples=100):
            read.append(conversation)
    assert caught.value.code == "too_many_examples" and len(read) <= 100


def test_too_many_examples_in_a_parquet_footer(tmp_path):
    from tests.test_formats import parquet_bytes

    data = parquet_bytes([row(i) for i in range(50)], tmp_path)
    report = validate_chunks([data], format="parquet", max_examples=20)
    assert codes(report.errors) == ["too_many_examples"] and "file has 50 rows" in report.errors[0].message
    assert report.stats["examples"] == 0  # refused from the footer, before a row was read


def test_a_parquet_bomb_is_refused_as_it_decodes(tmp_path):
    from tests.test_formats import parquet_bytes

    big = row(1)
    big["messages"][1]["content"] = "same words again " * 1000  # 17 KB, dictionary-encoded once
    data = parquet_bytes([big] * 3000, tmp_path)  # ~50 MB decoded from a small file
    report = validate_chunks([data], format="parquet", max_ratio=100, max_duplicate_share=0.5)
    assert codes(report.errors) == ["compression_ratio_too_high"], report.summary()
    assert "decodes" in report.errors[0].message and report.stats["examples"] < 3000


def test_too_many_tokens_early_and_at_the_end():
    data = rows(3000)
    report = validate_chunks(chunked(data, 8192), tokenizer=EstimateTokenizer(), max_tokens=5000)
    assert codes(report.errors) == ["too_many_tokens"] and report.stats["stopped_early"]
    assert "TUNEDROP_MAX_TOKENS" in report.errors[0].message and "reading stopped at" in report.errors[0].message
    small = rows(20)
    total = validate_chunks([small], tokenizer=EstimateTokenizer()).stats["tokens"]["total"]
    report = validate_chunks([small], tokenizer=EstimateTokenizer(), max_tokens=total - 1)
    assert codes(report.errors) == ["too_many_tokens"] and f"holds {total:,} tokens" in report.errors[0].message
    assert validate_chunks([small], tokenizer=EstimateTokenizer(), max_tokens=total).accepted


def test_too_many_duplicates():
    data = rows(8) + (line(row(1)) + b"\n") * 12  # 20 examples, 12 of them copies: 60 %
    report = check(data)
    assert codes(report.errors) == ["too_many_duplicates"], report.summary()
    assert "12 of 20 examples (60%)" in report.errors[0].message and "50% limit" in report.errors[0].message
    assert check(data, max_duplicate_share=0.6).accepted and check(data, max_duplicate_share=0).accepted


# -- the training estimate ---------------------------------------------------------------------------------------


def test_the_training_estimate_is_held_to_its_limits():
    data = rows(40)
    azure = dataclasses.replace(SETTINGS, backend="azureml", count_tokens=True, estimate_tokens_per_s=0.001)  # ~480 h, ~$1,470
    report, _ = check_dataset(azure, ("chat.jsonl", [data]))
    assert sorted(codes(report.errors)) == ["training_too_costly", "training_too_long"], report.summary()
    long = next(e for e in report.errors if e.code == "training_too_long")
    assert "TUNEDROP_MAX_ESTIMATED_HOURS" in long.message and "168 h limit" in long.message and long.field == "training"
    assert report.stats["training"]["estimated_seconds"] > 168 * 3600
    relaxed = dataclasses.replace(azure, max_estimated_hours=0, max_estimated_cost=0)
    assert check_dataset(relaxed, ("chat.jsonl", [data]))[0].accepted
    assert check_dataset(dataclasses.replace(azure, estimate_tokens_per_s=0), ("chat.jsonl", [data]))[0].accepted


# -- bounded evaluation ------------------------------------------------------------------------------------------


def test_the_report_states_the_evaluation_sample():
    data = rows(200)
    overrides = {"tunedrop_test_fraction": "0.5", "tunedrop_seed": "7"}
    report, config = check_dataset(dataclasses.replace(SETTINGS, max_eval_examples=10), ("chat.jsonl", [data]),
                                   metadata=overrides)
    held_out = len(split_examples(list(range(200)), 0.5, 7)[1])
    assert held_out_count(200, 0.5, 7) == held_out > 10
    assert report.stats["evaluation"] == {"held_out": held_out, "evaluated": 10, "sampled": True,
                                          "max_eval_examples": 10}
    assert f"evaluation: a seeded sample of 10 of the {held_out} held-out examples" in report.summary()
    report, _ = check_dataset(SETTINGS, ("chat.jsonl", [data]), metadata=overrides)
    assert report.stats["evaluation"]["sampled"] is False and f"all {held_out} held-out" in report.summary()
    pair, _ = check_dataset(dataclasses.replace(SETTINGS, max_eval_examples=3), ("c.train.jsonl", [data]),
                            ("c.test.jsonl", [rows(5, start=900)]))
    assert pair.stats["evaluation"] == {"held_out": 5, "evaluated": 3, "sampled": True, "max_eval_examples": 3}


def test_the_eval_sample_is_seeded_capped_and_in_order():
    held_out = list(range(1000))
    sample = eval_sample(held_out, 50, seed=42)
    assert len(sample) == 50 and sample == sorted(sample) and sample == eval_sample(iter(held_out), 50, seed=42)
    assert sample != eval_sample(held_out, 50, seed=43)
    assert eval_sample(held_out[:40], 50, seed=42) == held_out[:40] and eval_sample(held_out, 0, 1) == held_out


def test_both_backends_evaluate_the_same_capped_sample(backend, transport, settings, tmp_path):
    """The Azure ML test file is the sample the local trainer evaluates (test_trainer checks the trainer's side)."""
    from shared.backends.azureml.split_writer import write_split
    from shared.backends.local.examples import parse_dataset
    from shared.runs import Run
    from shared.storage import default_storage
    from shared.training import TrainingConfig
    from tests.azureml_world import dataset, stored_run

    n, cap = 300, 17
    run = stored_run(settings)
    container = default_storage().blob_service.get_container_client(settings.training_container)
    etag = container.upload_blob("chat.jsonl", dataset(n), overwrite=True).get_blob_properties().etag
    run = Run(run.run_id, dataset_container=run.dataset_container, dataset_blob="chat.jsonl", dataset_etag=etag,
              base_model=run.base_model, created_at=run.created_at)
    config = TrainingConfig().with_overrides({"test_fraction": 0.3, "seed": 5})
    write_split(default_storage(), dataclasses.replace(settings, max_eval_examples=cap), run, config)
    data = default_storage().blob_service.get_container_client(settings.azureml_data_container)

    def written(side):
        return [json.loads(x)["messages"] for x in data.download_blob(f"{run.run_id}/{side}.jsonl").readall().splitlines()]

    (tmp_path / "chat.jsonl").write_bytes(dataset(n))
    train, test = split_examples(parse_dataset(tmp_path / "chat.jsonl"), 0.3, 5)
    assert len(test) > cap
    assert written("train") == train and written("test") == eval_sample(test, cap, 5)
    # past a limit the step fails with the dataset's code instead of writing a split
    from shared.backends.base import BackendError

    with pytest.raises(BackendError) as caught:
        write_split(default_storage(), dataclasses.replace(settings, max_examples=50), run, config)
    assert caught.value.code == "too_many_examples" and not caught.value.retryable
