"""The workflow of the seed notebook, split across events instead of blocking on each step.

    ingest(blob)          validate -> quarantine, or submit the fine-tune          (blob trigger)
    on_run_event(event)   job running / succeeded -> register -> begin deploy     (Event Grid)
    sweep()               deployments ready -> traffic; idle -> delete; reconcile (timer)

Every step is idempotent: the run store refuses stale transitions, the backend finds what an
earlier attempt made, and a webhook goes out only from the call that made the state change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared import faults, runs
from shared.backends import get_backend
from shared.backends.base import (
    DEPLOY_CREATING,
    DEPLOY_READY,
    BackendError,
    JobInfo,
    ModelRef,
    run_of_job,
)
from shared.events import RunEvent
from shared.intake import FORCE_KEY, SIDECAR_MAX_BYTES, SIDECAR_SUFFIX, check_dataset, forced
from shared.runs import Run, RunStore, utcnow
from shared.settings import Settings
from shared.status import ACTIVE, ENDED_BADLY, JobStatus, job_status
from shared.training import TrainingConfig
from shared.webhooks import Outbox

log = logging.getLogger("tunedrop.pipeline")

#: How long a validation claim holds before another delivery may take over (longest function run).
CLAIM_LEASE = timedelta(minutes=10)
#: How long a pair's train half waits for its test half before its run fails.
PAIR_WAIT = timedelta(hours=1)
REPORT_ISSUES_KEPT = 20


class RetryError(Exception):
    """The run cannot be retried; the message says why and what to do instead."""


@dataclass
class SweepResult:
    ready: list[str] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    advanced: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _compact(report: dict[str, Any]) -> dict[str, Any]:
    """The report as stored on the run record (Table properties are capped at 64 KiB)."""
    return {**report, "errors": report["errors"][:REPORT_ISSUES_KEPT], "warnings": report["warnings"][:REPORT_ISSUES_KEPT]}


class Pipeline:
    def __init__(self, settings: Settings, storage=None, backend=None, store: RunStore | None = None,
                 outbox: Outbox | None = None):
        from shared.storage import default_storage

        self.settings = settings
        self.storage = storage or default_storage()
        self._backend = backend
        self.store = store or RunStore.from_settings(settings, self.storage)
        self.outbox = outbox or Outbox(settings, self.storage)

    @property
    def backend(self):
        if self._backend is None:
            self._backend = get_backend(self.settings, self.storage)
        return self._backend

    # ---- helpers ------------------------------------------------------------------------------

    def _move(self, run_id: str, target: str, event_type: str | None, data: dict[str, Any] | None = None,
              **changes: Any) -> Run | None:
        """Transition and, only if this call made the change, publish its webhook."""
        moved = self.store.transition(run_id, target, **changes)
        if moved is not None and event_type:
            self.outbox.publish(run_id, event_type, {"state": moved.state, **(data or {})}, retry=moved.retries)
        return moved

    def _fail(self, run: Run, error: str, code: str = "") -> Run | None:
        log.warning("run %s failed in %s: %s", run.run_id, run.state, error)
        return self._move(run.run_id, runs.FAILED, "run.failed", {"error": error, "code": code, "failed_in": run.state},
                          error=error)

    def _sidecar(self, blob) -> tuple[str, bytes | None]:
        """(its name, its bytes or None) of the dataset's sidecar `<name>.tunedrop.json`."""
        from azure.core.exceptions import ResourceNotFoundError

        name = blob.blob_name + SIDECAR_SUFFIX
        client = self.storage.blob_service.get_blob_client(blob.container_name, name)
        try:
            return name, client.download_blob(offset=0, length=SIDECAR_MAX_BYTES + 1).readall()
        except ResourceNotFoundError:
            return name, None

    # ---- ingest -------------------------------------------------------------------------------

    def ingest(self, blob, now: datetime | None = None) -> Run | None:
        """One dataset blob version: claim its run, validate it streaming, then reject or submit.

        A train/test pair (:mod:`shared.datasets`) is one run, carried by its train half: the test
        half arriving passes the train half on; a train half alone waits (see PAIR_WAIT)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        from shared.datasets import pair_half

        try:
            props = blob.get_blob_properties()
        except ResourceNotFoundError:
            log.info("blob %s/%s is gone, nothing to ingest", blob.container_name, blob.blob_name)
            return None
        container, name, etag = blob.container_name, blob.blob_name, props.etag
        if name.endswith(SIDECAR_SUFFIX):
            log.info("blob %s is a sidecar of training parameters, read when its dataset is ingested", name)
            return None
        half = pair_half(name)
        partner, partner_props = self._partner(container, half) if half else (None, None)
        if half and half.half == "test":
            if partner is None:
                log.info("blob %s is a test half; its run starts when %s arrives", name, half.partner_hint)
                return None
            return self.ingest(partner, now=now)  # the train half carries the run
        test, test_props = partner, partner_props
        run_id = runs.run_id_for(container, name, etag)
        if test is not None:
            run_id = self._pair_run_id(run_id, container, name, etag, test_props.etag)
        run, created = self.store.create(Run(
            run_id, dataset_container=container, dataset_blob=name, dataset_etag=etag,
            dataset_bytes=props.size, base_model=self.settings.effective_base_model,
            test_blob=test.blob_name if test else "", test_etag=test_props.etag if test else "",
        ))
        if half and test is None:
            return self._wait_for_test(run, half.partner_hint, now)
        if test and run.state == runs.RECEIVED and run.test_etag != test_props.etag:
            run = self.store.update(run_id, test_blob=test.blob_name, test_etag=test_props.etag, error="")
        claimed = self.store.claim(run, CLAIM_LEASE, now=now)
        if claimed is None:
            log.info("run %s: already %s, duplicate delivery ignored", run_id, run.state)
            return run
        try:
            content = hashlib.sha256()

            def chunks(client, version):
                stream = client.download_blob(etag=version, match_condition=MatchConditions.IfNotModified)
                return (content.update(chunk) or chunk for chunk in stream.chunks())

            if claimed.test_blob:
                test = test or self.storage.blob_service.get_blob_client(container, claimed.test_blob)
            report, config = check_dataset(
                self.settings, (name, chunks(blob, etag)),
                (claimed.test_blob, chunks(test, claimed.test_etag)) if claimed.test_blob else None,
                metadata=props.metadata, sidecar=self._sidecar(blob), check_base_model=self.backend.check_base_model)
        except ResourceModifiedError:
            # Overwritten while we read it: the new version has its own run; this one ends here.
            return self._fail(claimed, "The blob was overwritten during validation; its new version is a new run.",
                              "superseded")
        except ResourceNotFoundError:
            return self._fail(claimed, "The dataset (or its test half) was deleted during validation; upload it "
                              "again.", "superseded")
        except Exception as exc:
            self.store.release(claimed, f"{type(exc).__name__}: {exc}")
            raise
        report_dict = report.to_dict()
        if not report.accepted:
            location = self._quarantine(blob, etag, run_id, report_dict)
            if claimed.test_blob:
                test = self.storage.blob_service.get_blob_client(container, claimed.test_blob)
                location["test_blob"] = self._quarantine(test, claimed.test_etag, run_id, None)["blob"]
            return self._move(run_id, runs.REJECTED, "run.rejected",
                              {"dataset": name, "report": report_dict, "summary": report.summary(), "quarantine": location},
                              report=_compact(report_dict), error=report.summary())
        earlier = self._same_content(run_id, content.hexdigest(), config)
        force = forced(props.metadata)
        if earlier is not None and not force:
            message = (f"Same content and training parameters as run {earlier.run_id} ({earlier.state}): nothing new "
                       f"to train. Set blob metadata {FORCE_KEY}=true to train it again.")
            report_dict = {**report_dict, "accepted": False, "error_count": 1,
                           "errors": [{"line": None, "code": "duplicate_dataset", "message": message, "field": None}]}
            return self._move(run_id, runs.REJECTED, "run.rejected",
                              {"dataset": name, "report": report_dict, "summary": message, "duplicate_of": earlier.run_id},
                              report=_compact(report_dict), error=message, content_sha256=content.hexdigest())
        claimed = self.store.update(run_id, content_sha256=content.hexdigest(),
                                    base_model=config.base_model or self.settings.effective_base_model)
        self.outbox.publish(run_id, "run.accepted", {"dataset": name, "report": report_dict, "summary": report.summary()})
        try:
            job_name = self.backend.submit_finetune(claimed, config)
            faults.point("after_submit")
        except BackendError as exc:
            if exc.retryable:
                self.store.release(claimed, str(exc))
                raise
            return self._fail(claimed, str(exc), exc.code)
        except Exception as exc:
            self.store.release(claimed, f"{type(exc).__name__}: {exc}")
            raise
        display_name = config.display_name(claimed.base_model)
        return self._move(run_id, runs.SUBMITTED, "run.submitted",
                          {"job_name": job_name, "display_name": display_name, "config": config.to_dict()},
                          job_name=job_name, display_name=display_name, config=config.to_dict(),
                          report=_compact(report_dict), error="")

    def _partner(self, container: str, half) -> tuple[Any, Any]:
        """(client, properties) of the other half of a train/test pair, or (None, None) while it is missing."""
        from azure.core.exceptions import ResourceNotFoundError

        for name in half.partner_names():
            client = self.storage.blob_service.get_blob_client(container, name)
            try:
                return client, client.get_blob_properties()
            except ResourceNotFoundError:
                continue
        return None, None

    def _pair_run_id(self, run_id: str, container: str, name: str, etag: str, test_etag: str) -> str:
        """The run of a pair: its train half's version's run, unless that run has already gone on
        with another version of the test half (or failed waiting for it). A replaced or late test
        half makes a new pair, which gets a run of its own, as any re-uploaded dataset does."""
        first = self.store.find(run_id)
        if first is None or first.state == runs.RECEIVED or first.test_etag == test_etag:
            return run_id
        return runs.run_id_for(container, name, f"{etag}+{test_etag}")

    def _wait_for_test(self, run: Run, partner: str, now: datetime | None) -> Run:
        """A train half whose test half has not arrived: the run waits in `received` (the test half's
        arrival, or the sweeper, picks it up) and fails once PAIR_WAIT has passed without it."""
        if run.state != runs.RECEIVED:
            return run
        waited = (now or utcnow()) - datetime.fromisoformat(run.created_at)
        if waited > PAIR_WAIT:
            return self._fail(run, f"Its test half {partner} did not arrive within {PAIR_WAIT.total_seconds() / 3600:g} "
                              f"h: upload it and the pair's run starts then (or upload the dataset as one file, "
                              "without .train, to have it split).", "missing_test_file") or self.store.get(run.run_id)
        message = f"Waiting for its test half {partner} (a train/test pair is used as given)."
        if run.error != message:
            run = self.store.update(run.run_id, error=message)
            log.info("run %s: %s", run.run_id, message)
        return run

    def _same_content(self, run_id: str, digest: str, config: TrainingConfig) -> Run | None:
        """An earlier run that trains (or trained) these exact bytes with these exact parameters."""
        for other in self.store.list(content_sha256=digest):
            if other.run_id != run_id and other.state not in (runs.REJECTED, runs.FAILED) \
                    and other.config == config.to_dict():
                return other
        return None

    def _quarantine(self, blob, etag: str, run_id: str, report: dict[str, Any] | None) -> dict[str, str]:
        """Move the rejected blob to the quarantine container, its report beside it."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        container = self.storage.ensure_container(self.settings.quarantine_container)
        base = f"{run_id}/{blob.blob_name.rsplit('/', 1)[-1]}"
        source = blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        container.upload_blob(base, source.chunks(), overwrite=True,
                              metadata={"run_id": run_id, "source": f"{blob.container_name}/{blob.blob_name}"})
        if report is not None:  # None for a pair's test half: the report is beside its train half
            container.upload_blob(f"{base}.report.json", json.dumps(report, indent=2).encode(), overwrite=True)
        try:
            blob.delete_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass  # overwritten or removed meanwhile: leave the newer version alone
        return {"container": self.settings.quarantine_container, "blob": base, "report": f"{base}.report.json"}

    # ---- job events -----------------------------------------------------------------------------

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
        """Move ``run`` for its job's ``status``; ``job`` when the caller already read it (no second read)."""
        status = job_status(status)
        if status in ACTIVE:
            return self._move(run.run_id, runs.RUNNING, "run.running", {"job_name": run.job_name})
        if status == JobStatus.COMPLETED:
            job = job or self.backend.get_job(run.job_name)
            moved = self._move(run.run_id, runs.SUCCEEDED, "run.succeeded",
                               {"job_name": run.job_name, "metrics": job.metrics}, metrics=job.metrics)
            return self.advance(moved or self.store.get(run.run_id))
        if status in ENDED_BADLY:
            job = job or self.backend.get_job(run.job_name)
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
                    endpoint = self.backend.begin_deploy(run, ModelRef(run.model_name, run.model_version))
                    faults.point("after_begin_deploy")
                    moved = self._move(run.run_id, runs.DEPLOYING, "endpoint.deploying", {"endpoint_name": endpoint},
                                       endpoint_name=endpoint, deploy_started_at=utcnow().isoformat())
                else:
                    return run
            except BackendError as exc:
                if exc.retryable:
                    raise
                return self._fail(run, str(exc), exc.code) or self.store.get(run.run_id)
            run = moved or self.store.get(run.run_id)
        return run

    # ---- retry --------------------------------------------------------------------------------

    def retry(self, run_id: str) -> Run:
        """Carry a failed run on from the step that failed: a new job, or registration/deployment again."""
        run = self.store.get(run_id)
        if run.state != runs.FAILED:
            raise RetryError(f"Run {run_id} is {run.state}; only a failed run can be retried.")
        if run.failed_in in (runs.SUBMITTED, runs.RUNNING):
            retry = run.retries + 1
            config = TrainingConfig().with_overrides(run.config, "run config")
            job_name = self.backend.submit_finetune(dataclasses.replace(run, retries=retry), config)
            reopened = self.store.reopen(run, runs.SUBMITTED, job_name=job_name, metrics={})
            if reopened is not None:
                self.outbox.publish(run_id, "run.submitted", {"state": runs.SUBMITTED, "job_name": job_name,
                                                              "retry": retry}, retry=retry)
            return reopened or self.store.get(run_id)
        if run.failed_in in (runs.SUCCEEDED, runs.REGISTERED, runs.DEPLOYING):
            if run.failed_in == runs.DEPLOYING and run.endpoint_name:
                self.backend.delete_endpoint(run.endpoint_name)
            target = runs.REGISTERED if run.failed_in == runs.DEPLOYING else run.failed_in
            reopened = self.store.reopen(run, target)
            return self.advance(reopened) if reopened is not None else self.store.get(run_id)
        raise RetryError(f"Run {run_id} failed while {run.failed_in or 'starting'}: upload the dataset again "
                         "(a new version of the blob is a new run).")

    # ---- sweeper ------------------------------------------------------------------------------

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

    def _sweep_deploying(self, run: Run, now: datetime, result: SweepResult) -> None:
        info = self.backend.get_deployment(run.endpoint_name)
        if info.state == DEPLOY_READY:
            self.backend.activate(run.endpoint_name)
            if self._move(run.run_id, runs.DEPLOYED, "endpoint.ready",
                          {"endpoint_name": run.endpoint_name, "score_path": f"/api/runs/{run.run_id}/score"},
                          deployed_at=now.isoformat()):
                result.ready.append(run.run_id)
            return
        started = datetime.fromisoformat(run.deploy_started_at or run.updated_at)
        timed_out = now - started > timedelta(minutes=self.settings.deploy_timeout_minutes)
        if info.state == DEPLOY_CREATING and not timed_out:
            return
        error = info.error or f"Deployment not ready after {self.settings.deploy_timeout_minutes:g} minutes."
        self.backend.delete_endpoint(run.endpoint_name)
        if self._fail(run, error, info.error_code or "deployment_failed"):
            result.failed.append(run.run_id)

    def _sweep_deployed(self, run: Run, now: datetime, result: SweepResult) -> None:
        last_used = datetime.fromisoformat(run.last_scored_at or run.deployed_at or run.updated_at)
        idle = now - last_used
        if idle < timedelta(minutes=self.settings.idle_minutes):
            return
        self.backend.delete_endpoint(run.endpoint_name)
        faults.point("after_delete")
        if self._move(run.run_id, runs.TORN_DOWN, "endpoint.torn_down",
                      {"endpoint_name": run.endpoint_name, "idle_minutes": round(idle.total_seconds() / 60, 2)}):
            result.torn_down.append(run.run_id)

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
            if self._fail(run, f"Job {run.job_name} still {job.status} after "
                               f"{self.settings.job_timeout_minutes:g} minutes.", "job_timeout"):
                result.failed.append(run.run_id)
        elif job.status == JobStatus.RUNNING and run.state == runs.SUBMITTED:
            self._move(run.run_id, runs.RUNNING, "run.running", {"job_name": run.job_name})

    def _sweep_advance(self, run: Run, now: datetime, result: SweepResult) -> None:
        # Left behind by a crash between registration steps: carry on from where it stopped.
        if now - datetime.fromisoformat(run.updated_at) > timedelta(minutes=2):
            self.advance(run)
            result.advanced.append(run.run_id)


_lock = threading.Lock()
_pipelines: dict[tuple, Pipeline] = {}


def get_pipeline() -> Pipeline:
    """The pipeline for the current settings, created once per process (clients are reused)."""
    from shared.storage import default_storage

    settings = Settings.from_env()
    storage = default_storage()
    key = (settings, id(storage))
    with _lock:
        if key not in _pipelines:
            _pipelines[key] = Pipeline(settings, storage)
        return _pipelines[key]
