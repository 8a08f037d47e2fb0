"""The local fine-tune job's data: the dataset limits it keeps to, and the conversations it reads within them.

A pair's halves are used as given; a single file is split as on Azure ML and the held-out examples
sampled as there (shared/split.py). With ``max_steps`` only a seeded sample of the training examples
those steps can use is kept. The job itself is trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.backends.local.examples import read_dataset
from shared.backends.local.reporting import log
from shared.split import TRAIN, SeededSample, split_stream
from shared.training import TrainingConfig

#: The settings a job keeps to (job.json "limits" overrides the environment's).
LIMIT_SETTINGS = ("max_line_bytes", "max_dataset_bytes", "max_compression_ratio", "max_examples", "max_eval_examples")


@dataclass
class Data:
    """What the job read: the training examples it will tokenise, the held-out examples it evaluates,
    and how many there were of each."""

    train: list
    evaluated: list
    train_examples: int  # in the train split
    held_out: int  # in the test split (a pair's test file)
    max_eval_examples: int

    @property
    def eval_sampled(self) -> bool:
        return len(self.evaluated) < self.held_out


def job_limits(spec: dict[str, Any]) -> dict[str, Any]:
    """The settings of :data:`LIMIT_SETTINGS` this job keeps to: job.json's ``limits`` where given, else the
    settings of the environment it was spawned with (the app's), else their defaults."""
    from shared.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError:
        settings = Settings()
    given = spec.get("limits") or {}
    return {name: given.get(name, getattr(settings, name)) for name in LIMIT_SETTINGS}


def load_data(spec: dict[str, Any], job_dir: Path, config: TrainingConfig, limits: dict[str, Any]) -> Data:
    """The conversations of job.json ``spec``, streamed within the dataset limits (downloaded into ``job_dir``):
    a pair as given, a single file split as on Azure ML, the held-out examples sampled as there
    (shared/split.py). With ``max_steps``, only a seeded sample of the training examples those steps can use
    is kept."""
    from shared.datasets import detect_format
    from shared.storage import Storage

    dataset = spec["dataset"]
    reading = {"max_line_bytes": limits["max_line_bytes"], "max_bytes": limits["max_dataset_bytes"],
               "max_ratio": limits["max_compression_ratio"], "max_examples": limits["max_examples"]}

    def fetch(blob: str, etag: str | None, path: Path):
        Storage().download_blob(dataset["container"], blob, etag, path)
        return read_dataset(path, detect_format(blob), **reading)

    needed = 0  # training examples max_steps can use (0: all)
    if config.max_steps > 0:
        needed = config.max_steps * config.per_device_train_batch_size * config.gradient_accumulation_steps
        needed += needed // 4 + 8  # spares for examples with nothing to learn within max_seq_length
    train: SeededSample = SeededSample(needed, config.seed, salt="train")
    held_out: SeededSample = SeededSample(limits["max_eval_examples"], config.seed)
    pair = dataset.get("test")
    rows = fetch(dataset["blob"], dataset.get("etag"), job_dir / "dataset.data")
    if pair:  # a train/test pair: used as given
        for conversation in rows:
            train.add(conversation)
        if not train.seen:
            raise ValueError(f"dataset {dataset['blob']} holds no chat examples")
        for conversation in fetch(pair["blob"], pair.get("etag"), job_dir / "test.data"):
            held_out.add(conversation)
        if not held_out.seen:
            raise ValueError(f"dataset {pair['blob']} holds no chat examples")
    else:
        for side, conversation in split_stream(rows, config.test_fraction, config.seed):
            (train if side == TRAIN else held_out).add(conversation)
        if not train.seen + held_out.seen:
            raise ValueError(f"dataset {dataset['blob']} holds no chat examples")
    data = Data(train.examples(), held_out.examples(), train.seen, held_out.seen, limits["max_eval_examples"])
    log(f"dataset: {data.train_examples} train, {data.held_out} test "
        + (f"({dataset['blob']}, {pair['blob']})" if pair else f"(split {config.test_fraction:g})"))
    if data.eval_sampled:
        log(f"evaluating a seeded sample of {len(data.evaluated)} of the {data.held_out} held-out examples "
            f"(max_eval_examples {data.max_eval_examples})")
    if len(data.train) < data.train_examples:
        log(f"max_steps {config.max_steps}: tokenising a seeded sample of {len(data.train)} of the "
            f"{data.train_examples} training examples")
    return data
