"""The quality gate: a fine-tuned model is deployed only if it does better than its base model on the
held-out examples (eval loss on assistant tokens, the same sampled held-out set for both), by at
least TUNEDROP_GATE_MARGIN. A model that does not stays `registered` (its model is kept), with a
`run.gated` webhook carrying both figures; `deploy --force` deploys it anyway and records who asked.

Where the job reported no base-model figure (an Azure ML pipeline without one), the gate says so in
the run's record (``"measured": false``) and lets the model through: no figure, no verdict.
"""

from __future__ import annotations

from typing import Any

from shared.runs import Run

#: The metric names both trainers log: the base model's held-out eval loss (before training) and the
#: fine-tuned model's (after).
BASE_METRIC = "eval_loss_initial"
TUNED_METRIC = "eval_loss"


def verdict(run: Run, margin: float) -> dict[str, Any]:
    """The gate's figures and whether the fine-tuned model passes, from the run's metrics."""
    base, tuned = run.metrics.get(BASE_METRIC), run.metrics.get(TUNED_METRIC)
    if not isinstance(base, (int, float)) or not isinstance(tuned, (int, float)):
        return {"measured": False, "passed": True, "margin": margin}
    return {"measured": True, "passed": tuned <= base - margin, "base_eval_loss": base,
            "fine_tuned_eval_loss": tuned, "margin": margin}


def describe(gate: dict[str, Any]) -> str:
    """One line for a CLI or the demo."""
    if not gate:
        return "quality gate: not reached yet"
    if not gate.get("measured"):
        return "quality gate: no base-model figure from the job; not gated"
    line = (f"quality gate: eval loss {gate['base_eval_loss']:.4g} (base) -> {gate['fine_tuned_eval_loss']:.4g} "
            f"(fine-tuned), margin {gate['margin']:g}: {'passed' if gate['passed'] else 'NOT better: gated'}")
    if gate.get("forced_by"):
        line += f"; deployed anyway (--force, by {gate['forced_by']})"
    return line
