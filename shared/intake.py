"""Checking one dropped dataset with the training parameters its run would get: the one path that the
ingest function and `tunedrop validate` share.

    sidecar -> overrides (settings < sidecar < blob metadata) -> base model check -> tokenizer
            -> validate the file (or the train/test pair) -> reject a bad override -> training estimate

The caller brings the bytes (a blob stream, a file on disk) and the sidecar's raw bytes; what it does
with the report (quarantine, submit, print) is its own business.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from shared.backends.base import BackendError
from shared.coerce import to_bool
from shared.settings import Settings
from shared.training import TrainingConfig, TrainingConfigError

#: Blob metadata keys with this prefix override training parameters for that one dataset.
OVERRIDE_PREFIX = "tunedrop_"
#: A JSON object of training-parameter overrides uploaded as `<dataset name>` + this, beside the
#: dataset and before it. It is read when the dataset is ingested and never becomes a run itself.
SIDECAR_SUFFIX = ".tunedrop.json"
SIDECAR_MAX_BYTES = 64 * 1024
#: Blob metadata asking to train content that an earlier run already trained with the same parameters.
FORCE_KEY = "tunedrop_force"


def training_config(settings: Settings, metadata: dict[str, str] | None, sidecar: dict[str, Any] | None = None,
                    sidecar_name: str = "sidecar") -> TrainingConfig:
    """The seed's defaults < TUNEDROP_TRAINING_OVERRIDES < the sidecar file < blob metadata.

    A bad value raises TrainingConfigError whose ``field`` says which layer it came from."""
    config = TrainingConfig()
    per_blob = {k[len(OVERRIDE_PREFIX):].lower(): v for k, v in (metadata or {}).items()
                if k.lower().startswith(OVERRIDE_PREFIX) and k.lower() != FORCE_KEY}
    layer = "settings"
    try:
        if settings.training_overrides:
            try:
                overrides = json.loads(settings.training_overrides)
            except json.JSONDecodeError as exc:
                raise TrainingConfigError(f"TUNEDROP_TRAINING_OVERRIDES is not JSON: {exc.msg}.") from None
            config = config.with_overrides(overrides, "TUNEDROP_TRAINING_OVERRIDES")
        layer = "sidecar"
        if sidecar:
            config = config.with_overrides(sidecar, sidecar_name)
        layer = "metadata"
        forced(metadata)  # a force flag that is neither true nor false is refused here, with the overrides
        return config.with_overrides(per_blob, "blob metadata")
    except TrainingConfigError as exc:
        exc.field = layer
        raise


def forced(metadata: dict[str, str] | None) -> bool:
    """Whether blob metadata asks to train content an earlier run trained (FORCE_KEY)."""
    value = next((v for k, v in (metadata or {}).items() if k.lower() == FORCE_KEY), None)
    if value is None:
        return False
    try:
        return to_bool(value)
    except ValueError as exc:
        raise TrainingConfigError(f"blob metadata: {FORCE_KEY}: {exc}.") from None


def parse_sidecar(name: str, raw: bytes) -> dict[str, Any]:
    """The overrides in a sidecar file's bytes; TrainingConfigError naming the file when they are not a JSON object."""
    if len(raw) > SIDECAR_MAX_BYTES:
        raise TrainingConfigError(f"{name}: over {SIDECAR_MAX_BYTES // 1024} KiB; it holds only a JSON object "
                                  "of training parameters.", field="sidecar")
    try:
        overrides = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingConfigError(f"{name}: not JSON ({exc}); write an object such as "
                                  '{"num_train_epochs": 1}.', field="sidecar") from None
    if not isinstance(overrides, dict):
        raise TrainingConfigError(f"{name}: a JSON object of training parameters is needed, "
                                  f"not {type(overrides).__name__}.", field="sidecar")
    return overrides


def check_dataset(settings: Settings, train: tuple[str, Iterable[bytes]], test: tuple[str, Iterable[bytes]] | None = None,
                  *, metadata: dict[str, str] | None = None, sidecar: tuple[str, bytes | None] | None = None,
                  check_base_model: Callable[[str], None] | None = None, min_examples: int | None = None):
    """(report, training config or None) of one dataset: ``train`` and ``test`` are (name, byte chunks),
    ``sidecar`` (its name, its bytes or None when there is none). A bad override or base model rejects
    the dataset as `bad_override`, its ``field`` saying where it came from; a retryable backend error
    (the registry did not answer) is raised."""
    from shared.tokens import estimate, tokenizer_for
    from shared.validation import Issue, detect_format, validate_chunks, validate_pair

    config, rejected = None, None
    try:
        name, raw = sidecar or (train[0] + SIDECAR_SUFFIX, None)
        config = training_config(settings, metadata, parse_sidecar(name, raw) if raw is not None else None, name)
        if config.base_model and check_base_model is not None:
            check_base_model(config.base_model)
    except TrainingConfigError as exc:
        config, rejected = None, Issue(code="bad_override", message=str(exc), field=exc.field or "metadata")
    except BackendError as exc:
        if exc.retryable:
            raise
        config, rejected = None, Issue(code="bad_override", message=str(exc), field="base_model")
    options = dict(min_examples=settings.min_examples if min_examples is None else min_examples,
                   max_errors=settings.max_errors, max_line_bytes=settings.max_line_bytes,
                   tokenizer=tokenizer_for(settings, config.base_model if config else ""),
                   max_seq_length=(config or TrainingConfig()).max_seq_length)
    if test is None:
        report = validate_chunks(train[1], source=train[0], format=detect_format(train[0]), **options)
    else:
        report = validate_pair(train[1], test[1], train_source=train[0], test_source=test[0],
                               train_format=detect_format(train[0]), test_format=detect_format(test[0]), **options)
    if rejected is not None:
        report.reject(rejected)
    elif report.accepted:
        training = estimate(report.stats, config, settings.backend, settings.estimate_tokens_per_s,
                            settings.estimate_cost_per_hour)
        if training:
            report.stats["training"] = training
    return report, config
