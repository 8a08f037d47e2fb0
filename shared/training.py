"""Training parameters: one dataclass, the seed's defaults, help on every field.

The same object feeds both backends: the Azure ML `chat_completion_pipeline` inputs and the
local LoRA trainer. Per-run overrides and `TUNEDROP_TRAINING_OVERRIDES` are merged with
:meth:`TrainingConfig.with_overrides`, which rejects unknown keys and bad values by name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from shared.coerce import to_kind

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


#: The longest max_seq_length accepted: beyond any base model's context (Phi-3-mini-128k's is 131,072).
MAX_SEQ_LENGTH = 131_072


class TrainingConfigError(ValueError):
    """An override names an unknown parameter or gives it a value of the wrong kind. ``field``: where
    it came from ("settings", "sidecar", "metadata"), once known."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TrainingConfig:
    num_train_epochs: int = _param(3, "Passes over the training set (seed: 3).")
    per_device_train_batch_size: int = _param(1, "Examples per device per training step (seed: 1).")
    per_device_eval_batch_size: int = _param(1, "Examples per device per evaluation step (seed: 1).")
    learning_rate: float = _param(5e-6, "Peak learning rate (seed: 5e-6).")
    lr_scheduler_type: str = _param("cosine", "Learning-rate schedule: cosine, linear or constant (seed: cosine).")
    gradient_accumulation_steps: int = _param(1, "Steps whose gradients are summed before an update.")
    apply_lora: bool = _param(True, "Train LoRA adapters instead of all weights (seed: true).")
    lora_r: int = _param(16, "LoRA rank.")
    lora_alpha: int = _param(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _param(0.0, "Dropout on the LoRA path.")
    apply_deepspeed: bool = _param(True, "Azure ML only: shard with DeepSpeed (seed: true).")
    deepspeed_stage: int = _param(2, "Azure ML only: DeepSpeed ZeRO stage (seed: 2).")
    num_nodes_finetune: int = _param(1, "Azure ML only: nodes for the fine-tune step.")
    save_total_limit: int = _param(1, "Checkpoints kept during training.")
    max_seq_length: int = _param(512, "Tokens per example; longer examples are truncated.")
    test_fraction: float = _param(0.1, "Share of a single dropped file held out as the test split.")
    max_steps: int = _param(0, "Stop after this many optimiser steps (0: run all epochs). For quick local runs.")
    seed: int = _param(42, "Random seed for the split, LoRA initialisation and data order.")
    base_model: str = _param("", "Base model to fine-tune for this dataset instead of the app's TUNEDROP_BASE_MODEL: "
                             "locally smollm2-135m-instruct or tiny-random; in Azure ML a model of the registry "
                             "(e.g. Phi-3-mini-128k-instruct). Checked before validation.")

    def with_overrides(self, overrides: dict[str, Any] | None, source: str = "overrides") -> "TrainingConfig":
        if not overrides:
            return self
        known = {f.name: f for f in fields(self)}
        changes = {}
        for key, value in overrides.items():
            if key not in known:
                raise TrainingConfigError(
                    f"{source}: unknown training parameter {key!r}; known: {', '.join(sorted(known))}."
                )
            changes[key] = _coerce(known[key], value, source)
        merged = replace(self, **changes)
        merged.check(source)
        return merged

    def check(self, source: str = "training config") -> None:
        positive = ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "lora_r", "max_seq_length", "num_nodes_finetune")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainingConfigError(f"{source}: {name} must be > 0, got {getattr(self, name)}.")
        if self.max_steps < 0:
            raise TrainingConfigError(f"{source}: max_steps must be >= 0 (0: run all epochs), got {self.max_steps}.")
        if self.max_seq_length > MAX_SEQ_LENGTH:
            raise TrainingConfigError(f"{source}: max_seq_length must be at most {MAX_SEQ_LENGTH:,} (no base model "
                                      f"tunedrop fine-tunes reads longer examples), got {self.max_seq_length:,}.")
        if not 0 < self.learning_rate < 1:
            raise TrainingConfigError(f"{source}: learning_rate must be in (0, 1), got {self.learning_rate}.")
        if not 0 <= self.test_fraction < 1:
            raise TrainingConfigError(f"{source}: test_fraction must be in [0, 1), got {self.test_fraction}.")
        if self.base_model and not _MODEL_NAME.fullmatch(self.base_model):
            raise TrainingConfigError(f"{source}: base_model {self.base_model!r}: give a model name (letters, digits, "
                                      "'.', '_', '-'), such as Phi-3-mini-4k-instruct.")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise TrainingConfigError(
                f"{source}: lr_scheduler_type {self.lr_scheduler_type!r}: use cosine, linear or constant."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def display_name(self, model_name: str) -> str:
        """The job's display name, built the way the seed notebook builds it."""
        deepspeed = f"ds{self.deepspeed_stage}" if self.apply_deepspeed else "nods"
        lora = "lora" if self.apply_lora else "nolora"
        return (
            f"{model_name}-ultrachat-bs{self.per_device_train_batch_size}-{self.lr_scheduler_type}"
            f"-{deepspeed}-{lora}-save_limit{self.save_total_limit}-seqlen{self.max_seq_length}"
        )


def _coerce(f, value: Any, source: str):
    kind = type(f.default)
    try:
        return to_kind(kind, value)
    except (TypeError, ValueError):
        raise TrainingConfigError(
            f"{source}: {f.name} must be a {kind.__name__}, got {value!r}."
        ) from None


def describe() -> list[tuple[str, str, str]]:
    """(parameter, default, help) for every training parameter: the README's table."""
    return [(f.name, str(f.default).lower() if isinstance(f.default, bool) else str(f.default), f.metadata["help"])
            for f in fields(TrainingConfig)]
