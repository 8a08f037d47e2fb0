"""The sweeper's rounds (a timer): finish deployments that became ready, tear down idle endpoints,
and reconcile what an event or a crashed function left behind.

A local model server also says when it is ready (a ``DEPLOYMENT_READY`` event, shared/events.py):
:meth:`Sweeper.on_deployment_ready` finishes that one deployment at once, by the same rule as the sweep
(:meth:`Sweeper._finish_if_ready`). Azure ML sends no such event; there the sweep is what finds a
deployment ready, and locally it stays the safety net for an event that never came."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared import faults, runs
from shared.backends.base import DEPLOY_CREATING, DEPLOY_MISSING, DEPLOY_READY, DeploymentInfo
from shared.events import RunEvent
from shared.pipeline.ingest import CLAIM_LEASE, Ingest
from shared.pipeline.jobs import JobSteps
from shared.pipeline.steps import log
from shared.runs import Run, utcnow
from shared.status import JobStatus

#: How long a deploying run's endpoint may not exist yet (the request that woke it is still beginning it).
BEGIN_GRACE = timedelta(minutes=2)


@dataclass
class SweepResult:
    ready: list[str] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    advanced: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Sweeper(Ingest, JobSteps):
    def sweep(self, now: datetime | None = None) -> SweepResult:
        """Finish ready deployments, tear down idle endpoints, reconcile jobs whose events were lost."""
        now = now or utcnow()
        result = SweepResult()
        steps = {
            runs.RECEIVED: self._sweep_claimed,
            runs.VALIDATING: self._sweep_claimed,
            runs.DEPLOYING: self._sweep_deploying,
            runs.DEPLOYED: self._sweep_deployed,
            runs.SUBMITTED: self._sweep_job,
            runs.RUNNING: self._sweep_job,
            runs.SUCCEEDED: self._sweep_advance,
            runs.REGISTERED: self._sweep_advance,
        }
        for run in self.store.list(tuple(steps)):
            try:
                steps[run.state](run, now, result)
            except Exception as exc:  # one broken run must not stop the sweep of the others
                log.exception("sweep: run %s (%s) failed", run.run_id, run.state)
                result.errors.append(f"{run.run_id}: {type(exc).__name__}: {exc}")
        return result

    def _sweep_claimed(self, run: Run, now: datetime, result: SweepResult) -> None:
        """A claim whose function died (worker crash, timeout): ingest again once the claim lapsed.

        The blob trigger will not fire again for a version it considers processed, so the sweeper
        is what finishes it; the backend then finds a job an earlier attempt already submitted.
        """
        from azure.core.exceptions import ResourceNotFoundError

        if now - datetime.fromisoformat(run.updated_at) <= CLAIM_LEASE:
            return
        blob = self.storage.blob_service.get_blob_client(run.dataset_container, run.dataset_blob)
        try:
            etag = blob.get_blob_properties().etag
        except ResourceNotFoundError:
            etag = None
        if etag != run.dataset_etag:
            reason = "was deleted" if etag is None else "was overwritten (its new version is a new run)"
            if self._fail(run, f"The dataset {reason} before validation finished.", "superseded"):
                result.failed.append(run.run_id)
            return
        self.ingest(blob, now=now)
        result.advanced.append(run.run_id)

    def on_deployment_ready(self, event: RunEvent) -> Run | None:
        """A local model server says it serves: finish its run's deployment now, not at the next sweep.

        The event is a hint, never trusted: it counts only for the endpoint its run is deploying now (an
        earlier cycle's endpoint, an unknown run or a run that moved on change nothing), and only when the
        backend itself says the deployment is ready. A duplicate or late event finds the run deployed and
        changes nothing; an event that never came is made up by the sweep. The run when this call moved it,
        else None."""
        run = self.store.find(event.tunedrop_run_id) if event.tunedrop_run_id else None
        if run is None or run.state != runs.DEPLOYING or not event.endpoint_name \
                or run.endpoint_name != event.endpoint_name:
            why = ("no such run" if run is None else f"run {run.run_id} is {run.state}" if run.state != runs.DEPLOYING
                   else f"run {run.run_id} deploys {run.endpoint_name}")
            log.info("event %s: endpoint %s ready: %s, ignored", event.id, event.endpoint_name or "?", why)
            return None
        moved = self._finish_if_ready(run, self.backend.get_deployment(run.endpoint_name), utcnow())
        if moved is not None:
            log.info("event %s: run %s is deployed (endpoint %s ready)", event.id, run.run_id, run.endpoint_name)
        return moved

    def _finish_if_ready(self, run: Run, info: DeploymentInfo, now: datetime) -> Run | None:
        """The one rule that finishes a deploying run: only when the backend says its deployment is ready,
        give it all traffic and move the run to deployed, with the ``endpoint.ready`` webhook. The run when
        this call moved it; None when it is not ready, or another call (the sweep, an event) moved it first."""
        if info.state != DEPLOY_READY:
            return None
        self.backend.activate(run.endpoint_name)
        return self._move(run.run_id, runs.DEPLOYED, "endpoint.ready",
                          {"endpoint_name": run.endpoint_name, "score_path": f"/api/runs/{run.run_id}/score"},
                          deployed_at=now.isoformat())

    def _sweep_deploying(self, run: Run, now: datetime, result: SweepResult) -> None:
        info = self.backend.get_deployment(run.endpoint_name)
        if info.state == DEPLOY_READY:
            if self._finish_if_ready(run, info, now):
                result.ready.append(run.run_id)
            return
        started = datetime.fromisoformat(run.deploy_started_at or run.updated_at)
        timed_out = now - started > timedelta(minutes=self.settings.deploy_timeout_minutes)
        if info.state == DEPLOY_CREATING and not timed_out:
            return
        if info.state == DEPLOY_MISSING and now - started < BEGIN_GRACE:
            return  # a wake moves the run first, then begins the endpoint: give the one that woke it time
        if info.state == DEPLOY_CREATING:  # timed out: nothing is left costing money
            error, code = (f"Deployment not ready after {self.settings.deploy_timeout_minutes:g} minutes; its endpoint "
                           "was deleted. Raise TUNEDROP_DEPLOY_TIMEOUT_MINUTES if it needs longer, then retry."), "deploy_timeout"
        else:
            error, code = info.error or "The deployment failed.", info.error_code or "deployment_failed"
        self.backend.delete_endpoint(run.endpoint_name)
        if self._fail(run, error, code):
            result.failed.append(run.run_id)

    def _sweep_deployed(self, run: Run, now: datetime, result: SweepResult) -> None:
        last_used = datetime.fromisoformat(run.last_scored_at or run.deployed_at or run.updated_at)
        idle = now - last_used
        if idle < timedelta(minutes=self.settings.idle_minutes):
            self._check_health(run, result)
            return
        self.backend.delete_endpoint(run.endpoint_name)
        faults.point("after_delete")
        if self._move(run.run_id, runs.TORN_DOWN, "endpoint.torn_down",
                      {"endpoint_name": run.endpoint_name, "idle_minutes": round(idle.total_seconds() / 60, 2)}):
            result.torn_down.append(run.run_id)

    def _check_health(self, run: Run, result: SweepResult) -> None:
        """A deployed endpoint that stopped serving (its server died, Azure deleted or failed it) fails the
        run visibly, with a webhook, instead of answering 503 for ever; `retry` deploys it again."""
        info = self.backend.get_deployment(run.endpoint_name)
        if info.state in (DEPLOY_READY, DEPLOY_CREATING):  # creating: Azure is updating it, still serving
            return
        code = info.error_code or ("endpoint_missing" if info.state == DEPLOY_MISSING else "endpoint_failed")
        self.backend.delete_endpoint(run.endpoint_name)
        if self._fail(run, f"Endpoint {run.endpoint_name} stopped serving: {(info.error or info.state).rstrip('.')}. "
                           f"`tunedrop retry {run.run_id}` deploys the model again.", code):
            result.failed.append(run.run_id)

    def _sweep_job(self, run: Run, now: datetime, result: SweepResult) -> None:
        job = self.backend.get_job(run.job_name)
        if job.is_terminal:
            moved = self._on_job_status(run, job.status, job)
            if moved is not None and moved.state == runs.FAILED:
                result.failed.append(run.run_id)
            else:
                result.advanced.append(run.run_id)
            return
        submitted = datetime.fromisoformat(run.at(runs.SUBMITTED) or run.created_at)
        if now - submitted > timedelta(minutes=self.settings.job_timeout_minutes):
            if self._fail(run, f"Job {run.job_name} still {job.status} after {self.settings.job_timeout_minutes:g} "
                               "minutes; it was canceled. Raise TUNEDROP_JOB_TIMEOUT_MINUTES if it needs longer, "
                               "then retry.", "job_timeout"):
                result.failed.append(run.run_id)
        elif job.status == JobStatus.RUNNING and run.state == runs.SUBMITTED:
            self._move(run.run_id, runs.RUNNING, "run.running", {"job_name": run.job_name})

    def _sweep_advance(self, run: Run, now: datetime, result: SweepResult) -> None:
        # Left behind by a crash between registration steps: carry on from where it stopped.
        if now - datetime.fromisoformat(run.updated_at) > timedelta(minutes=2):
            self.advance(run)
            result.advanced.append(run.run_id)
