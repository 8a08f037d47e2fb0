"""The backend protocol: what tunedrop asks of a fine-tuning platform.

Every call returns at once (a serverless function never waits on training or deployment) and
is idempotent: called again for the same run, it finds what the first call made by its
deterministic name or tag instead of making a second one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from shared.status import TERMINAL

if TYPE_CHECKING:
    from shared.runs import Run
    from shared.training import TrainingConfig

# Deployment states.
DEPLOY_CREATING = "creating"
DEPLOY_READY = "ready"
DEPLOY_FAILED = "failed"
DEPLOY_MISSING = "missing"


class BackendError(Exception):
    """A backend call failed in a way the run should record; ``code`` is stable, the message says what to do."""

    def __init__(self, message: str, code: str = "backend_error", retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True)
class JobInfo:
    name: str
    status: str
    error: str = ""
    metrics: dict = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True)
class DeploymentInfo:
    state: str
    error: str = ""
    error_code: str = ""


@dataclass(frozen=True)
class ScoringTarget:
    url: str
    key: str = field(repr=False)  # never printed, logged or returned
    headers: dict = field(default_factory=dict)  # extra request headers (Azure ML: the deployment to route to)
    #: "tunedrop": the endpoint also serves OpenAI chat completions at <url>/../v1/chat/completions (local);
    #: "azureml": it takes only the seed's request at <url>, so OpenAI requests are translated.
    format: str = "tunedrop"


class Backend(Protocol):
    name: str

    def check_base_model(self, name: str) -> None:
        """BackendError (code ``unknown_base_model``) when ``name`` cannot be fine-tuned here."""

    def submit_finetune(self, run: "Run", config: "TrainingConfig") -> str:
        """Start the fine-tune for ``run``; returns the job name (the same one on a repeated call)."""

    def get_job(self, job_name: str) -> JobInfo:
        """Status, error and metrics of a job."""

    def cancel_job(self, job_name: str) -> None:
        """Begin stopping a job, never waiting; a job that has ended or does not exist is not an error."""

    def job_progress(self, job_name: str) -> dict:
        """Where a job is, for people following it: its ``phase``, and what the platform tells (locally the step,
        loss curve and time left; Azure ML the job's studio page). Empty when nothing is known."""

    def register_model(self, run: "Run") -> ModelRef:
        """Register the job's output model with lineage to the run; the same version on a repeated call."""

    def begin_deploy(self, run: "Run", model: ModelRef) -> str:
        """Start creating the endpoint and deployment; returns the endpoint name, never waits."""

    def get_deployment(self, endpoint_name: str) -> DeploymentInfo:
        """Where the deployment is: creating, ready, failed or missing."""

    def activate(self, endpoint_name: str) -> None:
        """Send traffic to a ready deployment (Azure ML: 100 % to it)."""

    def delete_endpoint(self, endpoint_name: str) -> None:
        """Begin deleting the endpoint; a missing endpoint is not an error."""

    def scoring_target(self, endpoint_name: str) -> ScoringTarget:
        """URL and key to score against the endpoint."""


def endpoint_name_for(run_id: str, cycle: int = 0) -> str:
    """Azure ML endpoint names: 3-32 chars, letters, digits and '-', starting with a letter.

    Each deployment cycle of a run (a wake after teardown is a new cycle) gets a name of its own, so
    that what is left of an earlier cycle's endpoint (a deletion still under way) is never taken for it."""
    import hashlib

    digest = hashlib.sha256((run_id if not cycle else f"{run_id}:{cycle}").encode()).hexdigest()[:10]
    stem = "".join(c for c in run_id.split("-")[0] if c.isalnum())[:14] or "run"
    name = f"td-{stem}-{digest}"
    return name[:32]


JOB_PREFIX = "tunedrop-"


def job_name_for(run_id: str, retry: int = 0) -> str:
    """The job of a run's first try, then of each retry: found again by name, never made twice."""
    return f"{JOB_PREFIX}{run_id}" + (f"-r{retry}" if retry else "")


def run_of_job(job_name: str) -> tuple[str, int] | None:
    """(run id, retry) of a job that :func:`job_name_for` named, or None for any other name.

    A run id ends in 12 hex digits (:func:`shared.runs.run_id_for`), so a `-r<n>` retry suffix cannot
    be part of it; the answer is checked by naming the job again, so only an exact name matches.
    """
    if not job_name.startswith(JOB_PREFIX):
        return None
    rest = job_name[len(JOB_PREFIX):]
    stem, sep, retry = rest.rpartition("-r")
    candidates = [(rest, 0)]
    if sep and retry.isdigit() and not retry.startswith("0"):
        candidates.insert(0, (stem, int(retry)))
    for run_id, attempt in candidates:
        if run_id and job_name_for(run_id, attempt) == job_name:
            return run_id, attempt
    return None
