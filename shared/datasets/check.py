"""Checking one dropped dataset with the training parameters its run would get: the one path that the
ingest function and `tunedrop validate` share.

    sidecar -> overrides (settings < sidecar < blob metadata) -> base model check -> tokenizer
            -> validate the file (or the train/test pair), within the dataset limits
            -> reject a bad override -> training estimate (and its limits) -> evaluation sample

The caller brings the bytes (a blob stream, a file on disk) and the sidecar's raw bytes; what it does
with the report (quarantine, submit, print) is its own business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from shared.datasets.formats import detect_format
from shared.datasets.limits import estimate_refusals, reading_limits
from shared.datasets.pairs import validate_pair
from shared.datasets.report import Issue, Report
from shared.datasets.validator import validate_chunks

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.training import TrainingConfig


def check_dataset(settings: Settings, train: tuple[str, Iterable[bytes]], test: tuple[str, Iterable[bytes]] | None = None,
                  *, metadata: dict[str, str] | None = None, sidecar: tuple[str, bytes | None] | None = None,
                  check_base_model: Callable[[str], None] | None = None,
                  min_examples: int | None = None) -> tuple[Report, TrainingConfig | None]:
    """(report, training config or None) of one dataset: ``train`` and ``test`` are (name, byte chunks),
    ``sidecar`` (its name, its bytes or None when there is none). A bad override or base model rejects
    the dataset as `bad_override`, its ``field`` saying where it came from; a retryable backend error
    (the registry did not answer) is raised. The dataset limits are the settings' (:mod:`limits`);
    an accepted report says how many held-out examples the run will evaluate (``stats["evaluation"]``)."""
    # Imported here: the trainers read rows through this package and need none of the app's settings.
    from shared.backends.base import BackendError
    from shared.intake import SIDECAR_SUFFIX, parse_sidecar, training_config
    from shared.split import held_out_count
    from shared.throughput import measured
    from shared.tokens import estimate, tokenizer_for
    from shared.training import TrainingConfig, TrainingConfigError

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
                   max_seq_length=(config or TrainingConfig()).max_seq_length, **reading_limits(settings))
    if test is None:
        report = validate_chunks(train[1], source=train[0], format=detect_format(train[0]), **options)
    else:
        report = validate_pair(train[1], test[1], train_source=train[0], test_source=test[0],
                               train_format=detect_format(train[0]), test_format=detect_format(test[0]), **options)
    if rejected is not None:
        report.reject(rejected)
    elif report.accepted:
        base_model = config.base_model or settings.effective_base_model
        here = measured(settings.model_cache_dir, base_model) if settings.backend == "local" else None
        training = estimate(report.stats, config, settings.backend, settings.estimate_tokens_per_s,
                            settings.estimate_cost_per_hour, measured=here, base_model=base_model)
        if training:
            report.stats["training"] = training
            for code, message, field in estimate_refusals(training, settings.max_estimated_hours,
                                                          settings.max_estimated_cost):
                report.reject(Issue(code=code, message=message, field=field))
        if report.accepted:
            held_out = (report.stats["test"]["examples"] if test is not None else
                        held_out_count(report.stats["examples"], config.test_fraction, config.seed))
            report.stats["evaluation"] = evaluation(held_out, settings.max_eval_examples)
    return report, config


def evaluation(held_out: int, cap: int) -> dict:
    """What a report says of the run's evaluation: ``held_out`` examples, of which a seeded sample of
    ``cap`` (TUNEDROP_MAX_EVAL_EXAMPLES; 0: all) is evaluated, as both backends do (shared/split.py)."""
    evaluated = min(held_out, cap) if cap > 0 else held_out
    return {"held_out": held_out, "evaluated": evaluated, "sampled": evaluated < held_out, "max_eval_examples": cap}
