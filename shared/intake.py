"""The per-dataset override vocabulary: the sidecar file, blob metadata, the force flag, and the
training configuration they make together with the app's settings (read by
:func:`shared.datasets.check_dataset`)."""

from __future__ import annotations

import json
from typing import Any

from shared.coerce import to_bool
from shared.model_defaults import model_defaults
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
    """The seed's defaults < the base model's own defaults (shared/model_defaults.py) < TUNEDROP_TRAINING_OVERRIDES
    < the sidecar file < blob metadata. The base model is the one the layers end up naming (any of them may).

    A bad value raises TrainingConfigError whose ``field`` says which layer it came from."""
    per_blob = {k[len(OVERRIDE_PREFIX):].lower(): v for k, v in (metadata or {}).items()
                if k.lower().startswith(OVERRIDE_PREFIX) and k.lower() != FORCE_KEY}
    layers: list[tuple[str, str, dict[str, Any]]] = []  # (layer, source, overrides), lowest first
    if settings.training_overrides:
        try:
            overrides = json.loads(settings.training_overrides)
        except json.JSONDecodeError as exc:
            raise TrainingConfigError(f"TUNEDROP_TRAINING_OVERRIDES is not JSON: {exc.msg}.", field="settings") from None
        layers.append(("settings", "TUNEDROP_TRAINING_OVERRIDES", overrides))
    if sidecar:
        layers.append(("sidecar", sidecar_name, sidecar))
    layers.append(("metadata", "blob metadata", per_blob))
    try:
        forced(metadata)  # a force flag that is neither true nor false is refused here, with the overrides
    except TrainingConfigError as exc:
        exc.field = "metadata"
        raise
    config = _layered(TrainingConfig(), layers)  # first, to learn which base model the layers name
    defaults = model_defaults(config.base_model or settings.effective_base_model)
    return _layered(TrainingConfig().with_overrides(defaults, "the base model's defaults"), layers) if defaults else config


def _layered(config: TrainingConfig, layers: list[tuple[str, str, dict[str, Any]]]) -> TrainingConfig:
    for layer, source, overrides in layers:
        try:
            config = config.with_overrides(overrides, source)
        except TrainingConfigError as exc:
            exc.field = layer
            raise
    return config


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
