"""The seed notebook's vocabulary for Azure ML: the names it uses, the parameters it passes to
`chat_completion_pipeline` (merged with the foundation model's `model_specific_defaults` and the run's
overrides), the pipeline's display name, and the VM-size allow lists a registry model carries.

Pure functions of a TrainingConfig and a model's tags: no Azure call, no `azure.ai.ml` import.
"""

from __future__ import annotations

import ast
from typing import Any

from shared.backends.base import BackendError
from shared.training import TrainingConfig

PIPELINE_COMPONENT = "chat_completion_pipeline"
DEPLOYMENT_NAME = "demo"
#: Sizes the seed refuses for fine-tuning when the model has no `finetune_compute_allow_list` tag.
UNSUPPORTED_FINETUNE_SIZES = ("standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r")
#: The parameters the seed always passes (training + optimisation), before `model_specific_defaults`.
SEED_PARAMETERS = ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
                   "lr_scheduler_type", "apply_lora", "apply_deepspeed", "deepspeed_stage")
#: Further TrainingConfig fields the pipeline component takes; passed only when a run overrides them.
OPTIONAL_PARAMETERS = ("gradient_accumulation_steps", "num_nodes_finetune", "save_total_limit", "max_seq_length",
                       "lora_r", "lora_alpha", "lora_dropout", "max_steps", "seed")


def _text(value) -> str:
    """An SDK enum or string as its plain value ("Failed", not "ProvisioningState.FAILED")."""
    return str(getattr(value, "value", value) or "")


def _literal(value: str, what: str):
    """A model tag holding a Python literal (as the seed reads it with ast.literal_eval)."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise BackendError(f"The foundation model's tag {what} is not a Python literal: {value[:200]!r}.",
                           code="bad_model_tag") from None


#: Where a registry model lists the VM sizes it supports: the tag the seed reads, or, since the
#: azureml registry moved them (azureml-assets #5150, 2026-06), system metadata `supportedComputes`.
ALLOW_LISTS = {"inference": ("inference_compute_allow_list", "inferenceComputes"),
               "finetune": ("finetune_compute_allow_list", "finetuneComputes")}


def allow_list(model, kind: str) -> list[str] | None:
    """The VM sizes ``model`` allows for ``kind`` ("inference" or "finetune"), or None when it names none."""
    tag, field = ALLOW_LISTS[kind]
    tags = model.tags or {}
    if tag in tags:
        sizes = _literal(tags[tag], tag)
    else:
        # azure-ai-ml 1.35 keeps it as Model._system_metadata (filled from the REST version when present)
        metadata = getattr(model, "system_metadata", None) or getattr(model, "_system_metadata", None) or {}
        supported = metadata.get("supportedComputes") or {} if isinstance(metadata, dict) else {}
        sizes = supported.get(field)
        if sizes is None:
            return None
    if not isinstance(sizes, (list, tuple)):
        raise BackendError(f"The foundation model's {tag} is not a list: {str(sizes)[:200]!r}.", code="bad_model_tag")
    return [str(size) for size in sizes]


def _seed_value(name: str, value: Any) -> Any:
    """A TrainingConfig value as the seed passes it: booleans as "true"/"false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def seed_display_name(model_name: str, params: dict[str, Any], gpus_per_node: int) -> str:
    """The pipeline's display name, computed from the merged parameters exactly as the seed does."""
    batch = (int(params.get("per_device_train_batch_size", 1)) * int(params.get("gradient_accumulation_steps", 1))
             * int(gpus_per_node) * int(params.get("num_nodes_finetune", 1)))
    ds = f"ds{params.get('deepspeed_stage', '2')}" if str(params.get("apply_deepspeed", "false")) == "true" else "nods"
    lora = "lora" if str(params.get("apply_lora", "false")) == "true" else "nolora"
    return (f"{model_name}-ultrachat-bs{batch}-{params.get('lr_scheduler_type', 'linear')}-{ds}-{lora}"
            f"-save_limit{params.get('save_total_limit', -1)}-seqlen{params.get('max_seq_length', -1)}")


def finetune_parameters(config: TrainingConfig, model_tags: dict[str, str]) -> dict[str, Any]:
    """The seed's parameters, updated by the model's `model_specific_defaults`, then by the run's overrides.

    A run override is a TrainingConfig field whose value differs from the default (blob metadata or
    TUNEDROP_TRAINING_OVERRIDES); it wins over the model's defaults.
    """
    defaults = TrainingConfig()
    params = {name: _seed_value(name, getattr(config, name)) for name in SEED_PARAMETERS}
    if "model_specific_defaults" in model_tags:
        specific = _literal(model_tags["model_specific_defaults"], "model_specific_defaults")
        if not isinstance(specific, dict):
            raise BackendError("The foundation model's tag model_specific_defaults is not a dict.", code="bad_model_tag")
        params.update(specific)
    for name in (*SEED_PARAMETERS, *OPTIONAL_PARAMETERS):
        value = getattr(config, name)
        if value != getattr(defaults, name) and not (name == "max_steps" and value <= 0):
            params[name] = _seed_value(name, value)
    return params
