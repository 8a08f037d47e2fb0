"""The maths of a training step: learning-rate schedule, bf16 autocast, the loss and evaluation.

torch loads only when one of these runs.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

from shared.backends.local.examples import IGNORE_INDEX, Batch
from shared.coerce import to_bool


def lr_factor(kind: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def use_bf16() -> bool:
    """bf16 autocast (fp32 master weights) where the CPU computes bf16 natively; TUNEDROP_LOCAL_BF16=0/1 forces it."""
    forced = os.environ.get("TUNEDROP_LOCAL_BF16", "").strip()
    if forced:
        return to_bool(forced)
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(enabled: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def adamw(parameters, lr: float):
    """AdamW, fused into one kernel per step where this torch has it for the parameters' device (it does for
    CPUs since torch 2.4): the same update as the per-tensor loop, with fewer passes over the LoRA weights."""
    import torch

    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


def batch_loss_sum(model, batch: Batch):
    """Summed cross-entropy over the batch's target tokens (logits computed only where needed)."""
    import torch
    import torch.nn.functional as F

    targets_next = batch.labels[:, 1:]
    keep = torch.zeros_like(batch.labels, dtype=torch.bool)
    keep[:, :-1] = targets_next != IGNORE_INDEX
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False
    ).logits
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets_next[keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def loss_sums(model, batches: Iterable[Batch], bf16: bool = False) -> tuple[float, int]:
    """(summed loss, target tokens) over ``batches``, without gradients, on the calling thread."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad(), autocast(bf16):
        for batch in batches:
            if batch.targets:
                total += float(batch_loss_sum(model, batch))
                count += batch.targets
    return total, count


def evaluate(model, batches: Iterable[Batch], bf16: bool = False, workers=None) -> float | None:
    """Mean loss per target token over ``batches`` in eval mode; shared out by ``workers``
    (:class:`shared.backends.local.workers.StepWorkers`) where given."""
    was_training = model.training
    model.eval()
    try:
        total, count = workers.loss_sums(model, list(batches), bf16) if workers else loss_sums(model, batches, bf16)
    finally:
        model.train(was_training)
    return total / count if count else None
