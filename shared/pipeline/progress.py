"""Where a run is, for people following it (the status page, `tunedrop drop --wait`, `tunedrop status`):
its state, the bytes validation has read, the job's phase, step, loss curve and time left (from the
backend: shared/backends/base.py ``job_progress``), how long its deployment has taken, and each webhook
with its delivery. Read-only; reading it changes nothing."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from shared import runs
from shared.backends.base import BackendError
from shared.runs import Run

log = logging.getLogger("tunedrop.pipeline.progress")


def _seconds_since(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return round((runs.utcnow() - datetime.fromisoformat(iso)).total_seconds(), 1)
    except ValueError:
        return None


def run_progress(pipeline, run: Run) -> dict[str, Any]:
    """The run's progress, as the `/api/runs/{run_id}/progress` route answers it."""
    from shared.webhooks import DeliveryLedger

    progress: dict[str, Any] = {"run_id": run.run_id, "state": run.state, "in_state_s": _seconds_since(run.updated_at)}
    if run.state in (runs.RECEIVED, runs.VALIDATING):
        progress["validation"] = {"bytes": run.validated_bytes, "total_bytes": run.dataset_bytes}
    if run.job_name:
        try:
            progress["training"] = pipeline.backend.job_progress(run.job_name)
        except BackendError as exc:
            progress["training"] = {"error": f"{exc} ({exc.code})"}
    if run.state == runs.DEPLOYING:
        progress["deploy"] = {"endpoint_name": run.endpoint_name, "cycle": run.cycle,
                              "elapsed_s": _seconds_since(run.deploy_started_at)}
    try:
        progress["webhooks"] = DeliveryLedger(pipeline.settings, pipeline.storage).of_run(run.run_id)
    except Exception as exc:  # noqa: BLE001 - informative only
        log.info("run %s: webhook deliveries not read: %s", run.run_id, exc)
        progress["webhooks"] = []
    return progress


def describe(progress: dict[str, Any]) -> str:
    """One line: where the run is now (the CLI prints it, and redraws it while it waits)."""
    state = progress.get("state", "?")
    training = progress.get("training") or {}
    if state in (runs.RECEIVED, runs.VALIDATING) and progress.get("validation"):
        read, total = progress["validation"]["bytes"], progress["validation"]["total_bytes"]
        return f"validating: {_size(read)} of {_size(total)} read" if total else "validating"
    if state in (runs.SUBMITTED, runs.RUNNING) or (state == runs.SUCCEEDED and training):
        phase = training.get("phase") or state
        if training.get("total_steps"):
            line = f"training ({phase}): step {training.get('step', 0)}/{training['total_steps']}"
            if training.get("loss") is not None:
                line += f", loss {training['loss']:.4g}"
            if training.get("eta_s") is not None and phase == "training":
                line += f", ~{_duration(training['eta_s'])} left"
            return line
        return f"training ({phase})" + (f": {training['studio_url']}" if training.get("studio_url") else "")
    if state == runs.DEPLOYING and progress.get("deploy"):
        return f"deploying: {_duration(progress['deploy'].get('elapsed_s') or 0)} so far"
    return state


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
