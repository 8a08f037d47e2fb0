"""A run's job and model: job events move it (running, succeeded, failed), a succeeded run is
registered and its deployment begun, and a failed run is carried on from the step that failed."""

from __future__ import annotations

import dataclasses

from shared import faults, runs
from shared.backends.base import BackendError, JobInfo, ModelRef, run_of_job
from shared.events import RunEvent
from shared.pipeline.gate import describe, verdict
from shared.pipeline.steps import Steps, log
from shared.runs import Run, utcnow
from shared.status import ACTIVE, ENDED_BADLY, TERMINAL, JobStatus, job_status
from shared.training import TrainingConfig


class RetryError(Exception):
    """The run cannot be retried; the message says why and what to do instead."""


class CancelError(Exception):
    """The run cannot be canceled (it has finished); the message names its state and what to do instead."""


class JobSteps(Steps):
    def on_run_event(self, event: RunEvent) -> Run | None:
        """An Azure ML run event: move the run it belongs to; anything else is logged and acknowledged."""
        foreign = event.foreign_to(self.settings.workspace_id)
        if foreign:
            log.info("event %s: %s, ignored", event.id, foreign)
            return None
        run = self.run_for_event(event)
        if run is None:
            log.info("event %s: job %s is not a tunedrop run's current job, ignored", event.id, event.run_id)
            return None
        return self._on_job_status(run, event.run_status)

    def run_for_event(self, event: RunEvent) -> Run | None:
        """The run whose current job the event is about, or None.

        Found by the job's `tunedrop_run_id` tag, or, as Microsoft's samples show events with empty
        `runTags`, by the job's own name (`tunedrop-<run>`, `-r<n>` for a retry: see
        :func:`run_of_job`). Either way the event counts only when its job is the run's current job:
        a pipeline's child steps, a retried run's earlier job and a job that merely looks similar
        all change nothing.
        """
        named = run_of_job(event.run_id)
        for run_id in dict.fromkeys(filter(None, (event.tunedrop_run_id, named[0] if named else ""))):
            run = self.store.find(run_id)
            if run is not None and run.job_name and run.job_name == event.run_id:
                return run
        return None

    def _on_job_status(self, run: Run, status: str, job: JobInfo | None = None) -> Run | None:
        """Move ``run`` for its job's ``status``; ``job`` when the caller already read it (no second read).

        An event saying the job ended is checked against the job itself before the run moves on: Event
        Grid may deliver a forged, replayed or confused event, and a run must not succeed (or fail while
        its job trains on, spending) on an event's word alone."""
        status = job_status(status)
        if job is None and status in TERMINAL:
            job = self.backend.get_job(run.job_name)
            if job_status(job.status) != status:
                log.warning("run %s: an event says job %s is %s, the job says %s: acting on the job", run.run_id,
                            run.job_name, status, job.status)
            status = job_status(job.status)
        if status in ACTIVE:
            return self._move(run.run_id, runs.RUNNING, "run.running", {"job_name": run.job_name})
        if status == JobStatus.COMPLETED:
            moved = self._move(run.run_id, runs.SUCCEEDED, "run.succeeded",
                               {"job_name": run.job_name, "metrics": job.metrics}, metrics=job.metrics)
            return self.advance(moved or self.store.get(run.run_id))
        if status in ENDED_BADLY:
            reason = job.error or f"Job {run.job_name} ended {status}."
            return self._move(run.run_id, runs.FAILED, "run.failed",
                              {"error": reason, "code": f"job_{status.lower()}", "failed_in": run.state}, error=reason)
        log.info("run %s: job status %s, nothing to do", run.run_id, status)
        return run

    def advance(self, run: Run) -> Run:
        """Drive a succeeded run through registration and the start of its deployment."""
        for _ in range(4):
            try:
                if run.state == runs.SUCCEEDED:
                    model = self.backend.register_model(run)
                    faults.point("after_register")
                    moved = self._move(run.run_id, runs.REGISTERED, "model.registered",
                                       {"model_name": model.name, "model_version": model.version},
                                       model_name=model.name, model_version=model.version)
                elif run.state == runs.REGISTERED:
                    if not self._gate_open(run):
                        return self.store.get(run.run_id)
                    endpoint = self.backend.begin_deploy(run, ModelRef(run.model_name, run.model_version))
                    faults.point("after_begin_deploy")
                    moved = self._move(run.run_id, runs.DEPLOYING, "endpoint.deploying", {"endpoint_name": endpoint},
                                       endpoint_name=endpoint, deploy_started_at=utcnow().isoformat())
                    if moved is None and self.store.get(run.run_id).state == runs.CANCELED:
                        self.backend.delete_endpoint(endpoint)  # canceled while it was being begun
                else:
                    return run
            except BackendError as exc:
                if exc.retryable:
                    raise
                return self._fail(run, str(exc), exc.code) or self.store.get(run.run_id)
            run = moved or self.store.get(run.run_id)
        return run

    def _gate_open(self, run: Run) -> bool:
        """Whether the registered model may be deployed (shared/pipeline/gate.py): judged once, on the run's
        metrics, and recorded on the run; a gated model waits for `deploy --force`."""
        gate = run.gate or {}
        if gate:
            return bool(gate.get("passed") or gate.get("forced_by"))
        gate = verdict(run, self.settings.gate_margin)
        recorded = self.store.update(run.run_id, gate=gate)
        if not gate["passed"]:
            log.warning("run %s: %s", run.run_id, describe(gate))
            self.outbox.publish(run.run_id, "run.gated", {"state": recorded.state, **gate},
                                sequence=len(recorded.history), retry=recorded.retries, cycle=recorded.cycle)
        return gate["passed"]

    def cancel(self, run_id: str, by: str = "") -> Run:
        """Stop a run wherever it is before it serves: the job is cancelled, a deployment's endpoint deleted,
        a validation's result dropped. The run ends `canceled` (``failed_in`` says where); the dataset blob
        stays, and `retry` carries it on from there. ``by``: who asked (a key's name), for the record."""
        run = self.store.get(run_id)
        if run.state not in runs.CANCELABLE:
            hint = (f"put it to sleep with `tunedrop undeploy {run_id}`" if run.state == runs.DEPLOYED
                    else "there is nothing running to stop")
            raise CancelError(f"Run {run_id} is {run.state}: {hint}.")
        error = "Canceled" + (f" by {by}" if by else "") + "."
        moved = self.store.transition(run_id, runs.CANCELED, error=error)
        if moved is None:  # it finished meanwhile
            raise CancelError(f"Run {run_id} is {self.store.get(run_id).state}: there is nothing running to stop.")
        self.outbox.publish(run_id, "run.canceled", {"state": moved.state, "canceled_in": moved.failed_in,
                                                     **({"by": by} if by else {})},
                            sequence=len(moved.history), retry=moved.retries)
        # What the run had going where it was canceled (read after the move: nothing moves it on now).
        if moved.failed_in in (runs.SUBMITTED, runs.RUNNING) and moved.job_name:
            self.backend.cancel_job(moved.job_name)
        if moved.failed_in == runs.DEPLOYING and moved.endpoint_name:
            self.backend.delete_endpoint(moved.endpoint_name)
        log.info("run %s: canceled in %s%s", run_id, moved.failed_in, f" by {by}" if by else "")
        return moved

    def retry(self, run_id: str) -> Run:
        """Carry a failed or canceled run on from where it stopped: a new job, registration or deployment
        again, or (canceled during validation) the dataset validated again."""
        run = self.store.get(run_id)
        if run.state not in runs.STOPPED:
            raise RetryError(f"Run {run_id} is {run.state}; only a failed or canceled run can be retried.")
        if run.state == runs.CANCELED and run.failed_in in (runs.RECEIVED, runs.VALIDATING):
            reopened = self.store.reopen(run, runs.RECEIVED)
            if reopened is None:
                return self.store.get(run_id)
            blob = self.storage.blob_service.get_blob_client(run.dataset_container, run.dataset_blob)
            return self.ingest(blob) or self.store.get(run_id)
        if run.failed_in in (runs.SUBMITTED, runs.RUNNING):
            retry = run.retries + 1
            config = TrainingConfig().with_overrides(run.config, "run config")
            job_name = self.backend.submit_finetune(dataclasses.replace(run, retries=retry), config)
            reopened = self.store.reopen(run, runs.SUBMITTED, job_name=job_name, metrics={})
            if reopened is not None:
                self.outbox.publish(run_id, "run.submitted", {"state": runs.SUBMITTED, "job_name": job_name,
                                                              "retry": retry}, sequence=len(reopened.history), retry=retry)
            return reopened or self.store.get(run_id)
        if run.failed_in in (runs.SUCCEEDED, runs.REGISTERED, runs.DEPLOYING, runs.DEPLOYED):
            if run.failed_in in (runs.DEPLOYING, runs.DEPLOYED) and run.endpoint_name:
                self.backend.delete_endpoint(run.endpoint_name)
            target = runs.REGISTERED if run.failed_in in (runs.DEPLOYING, runs.DEPLOYED) else run.failed_in
            reopened = self.store.reopen(run, target)
            return self.advance(reopened) if reopened is not None else self.store.get(run_id)
        raise RetryError(f"Run {run_id} failed while {run.failed_in or 'starting'}: upload the dataset again "
                         "(a new version of the blob is a new run).")
