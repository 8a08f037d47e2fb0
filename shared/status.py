"""The job statuses tunedrop reads from a fine-tuning platform, in one place.

Azure ML's spelling is the canonical one (azure-ai-ml's REST enum `JobStatus`); the local backend
speaks it too. Azure ML itself is not consistent about case (its RunStatusChanged sample says
"failed"), so every status read from outside goes through :func:`job_status` first.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    NOT_STARTED = "NotStarted"
    STARTING = "Starting"
    PROVISIONING = "Provisioning"
    PREPARING = "Preparing"
    QUEUED = "Queued"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    CANCEL_REQUESTED = "CancelRequested"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"
    NOT_RESPONDING = "NotResponding"
    PAUSED = "Paused"
    UNKNOWN = "Unknown"
    #: Not Azure ML's: the job does not exist (tunedrop's answer to a 404).
    NOT_FOUND = "NotFound"


#: On its way: Azure ML reports several statuses before Running.
ACTIVE = (JobStatus.NOT_STARTED, JobStatus.QUEUED, JobStatus.PREPARING, JobStatus.PROVISIONING, JobStatus.STARTING,
          JobStatus.RUNNING, JobStatus.FINALIZING)
#: Ended unsuccessfully: the run fails with the job's reason.
ENDED_BADLY = (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.NOT_FOUND)
#: After these a job never changes again.
TERMINAL = (JobStatus.COMPLETED, *ENDED_BADLY)

_BY_LOWER = {status.value.lower(): status for status in JobStatus}


def job_status(value) -> JobStatus | str:
    """A status in its canonical spelling, whatever the case it came in ("failed" -> JobStatus.FAILED);
    an SDK enum is read by its value. An unknown status is kept as given (stripped)."""
    text = str(getattr(value, "value", value) or "").strip()
    return _BY_LOWER.get(text.lower(), text)
