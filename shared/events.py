"""Azure ML run events (Event Grid schema), typed: read by `job_events`, sent by the local backend.

Microsoft's own samples spell the data keys both camelCase and PascalCase, `runType` may be null,
`runTags` empty and `runStatus` lower case ("failed"), so keys are read case-insensitively, missing
ones are tolerated and statuses are put in their canonical spelling.

One event type is the local backend's own: :data:`DEPLOYMENT_READY`, which a local model server posts
the moment it serves, so that its run is finished at once instead of at the next sweep. Azure ML online
deployments publish no such event (the workspace's Event Grid subscriptions carry only the two run event
types), so in Azure the sweeper is what finds a deployment ready.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from shared.status import JobStatus, job_status

RUN_COMPLETED = "Microsoft.MachineLearningServices.RunCompleted"
RUN_STATUS_CHANGED = "Microsoft.MachineLearningServices.RunStatusChanged"
RUN_EVENT_TYPES = (RUN_COMPLETED, RUN_STATUS_CHANGED)
#: A local model server's word that it serves (local backend only). Only a hint: the app checks the
#: deployment itself before the run moves (shared/pipeline/sweep.py, ``on_deployment_ready``).
DEPLOYMENT_READY = "Tunedrop.Local.DeploymentReady"

#: Tag put on every fine-tune job so its events lead back to the tunedrop run.
RUN_ID_TAG = "tunedrop_run_id"

#: The statuses an event can end a job with.
TERMINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)


def _lower_keys(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in (mapping or {}).items()}


@dataclass(frozen=True)
class RunEvent:
    """One Azure ML run event, whatever the casing of its data keys."""

    id: str
    event_type: str
    topic: str
    subject: str
    data: Mapping[str, Any]

    @classmethod
    def from_function_event(cls, event) -> "RunEvent":
        """From a ``func.EventGridEvent``."""
        data = event.get_json()
        return cls(
            id=event.id or "",
            event_type=event.event_type or "",
            topic=event.topic or "",
            subject=event.subject or "",
            data=data if isinstance(data, Mapping) else {},
        )

    def to_json(self) -> bytes:
        """The event as one queue message (job_events hands it on to the worker)."""
        return json.dumps({"id": self.id, "eventType": self.event_type, "topic": self.topic, "subject": self.subject,
                           "data": dict(self.data)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "RunEvent":
        """From :meth:`to_json`'s bytes, or from one event in the Event Grid schema."""
        event = json.loads(raw)
        if not isinstance(event, Mapping):
            raise ValueError("an event is a JSON object")
        data = event.get("data")
        return cls(id=str(event.get("id") or ""), event_type=str(event.get("eventType") or ""),
                   topic=str(event.get("topic") or ""), subject=str(event.get("subject") or ""),
                   data=data if isinstance(data, Mapping) else {})

    @property
    def _data(self) -> dict[str, Any]:
        return _lower_keys(self.data)

    @property
    def is_run_event(self) -> bool:
        return self.event_type in RUN_EVENT_TYPES

    @property
    def is_deployment_ready(self) -> bool:
        return self.event_type == DEPLOYMENT_READY

    @property
    def endpoint_name(self) -> str:
        """The endpoint a :data:`DEPLOYMENT_READY` event is about."""
        return str(self._data.get("endpointname") or "")

    def foreign_to(self, workspace_id: str) -> str:
        """Why this event is none of the app's business, or "" when it is: it is not a run event, or
        it comes from another workspace than ``workspace_id`` (the topic Event Grid names)."""
        if not self.is_run_event:
            return f"type {self.event_type} is not a run event"
        if self.topic.lower() != workspace_id.lower():
            return f"from another workspace ({self.topic})"
        return ""

    @property
    def run_id(self) -> str:
        """The Azure ML run (job) name; from the data, else from the subject."""
        value = self._data.get("runid")
        if value:
            return str(value)
        parts = self.subject.split("/")
        return parts[-1] if len(parts) >= 4 and parts[-2] == "runs" else ""

    @property
    def experiment_name(self) -> str:
        return str(self._data.get("experimentname") or "")

    @property
    def run_type(self) -> str:
        return str(self._data.get("runtype") or "")

    @property
    def run_tags(self) -> dict[str, Any]:
        tags = self._data.get("runtags")
        return dict(tags) if isinstance(tags, Mapping) else {}

    @property
    def run_properties(self) -> dict[str, Any]:
        props = self._data.get("runproperties")
        return dict(props) if isinstance(props, Mapping) else {}

    @property
    def tunedrop_run_id(self) -> str:
        """The tunedrop run this job belongs to, from the job's tags (any casing); for a
        :data:`DEPLOYMENT_READY` event, the run whose endpoint it is."""
        if self.is_deployment_ready:
            return str(self._data.get("tunedroprunid") or "")
        return str(_lower_keys(self.run_tags).get(RUN_ID_TAG, "") or "")

    @property
    def run_status(self) -> str:
        """`Completed` for RunCompleted; else the reported `runStatus` in its canonical spelling
        (Microsoft's sample sends "failed"; this says "Failed")."""
        if self.event_type == RUN_COMPLETED:
            return JobStatus.COMPLETED
        return job_status(self._data.get("runstatus"))

    @property
    def is_terminal(self) -> bool:
        return self.run_status in TERMINAL_STATUSES


def run_event(
    *,
    status: str,
    topic: str,
    job_name: str,
    experiment_name: str,
    run_tags: Mapping[str, str],
    run_properties: Mapping[str, str] | None = None,
    experiment_id: str | None = None,
) -> dict[str, Any]:
    """An event shaped exactly as Azure ML publishes it to Event Grid (Event Grid schema)."""
    experiment_id = experiment_id or str(uuid.uuid5(uuid.NAMESPACE_URL, experiment_name))
    data: dict[str, Any] = {
        "experimentId": experiment_id,
        "experimentName": experiment_name,
        "runId": job_name,
        "runType": "azureml.PipelineRun",
        "runTags": dict(run_tags),
        "runProperties": dict(run_properties or {}),
    }
    if status == JobStatus.COMPLETED:
        event_type = RUN_COMPLETED
    else:
        event_type = RUN_STATUS_CHANGED
        data["runStatus"] = status
    return {
        "id": str(uuid.uuid4()),
        "topic": topic,
        "subject": f"experiments/{experiment_id}/runs/{job_name}",
        "eventType": event_type,
        "eventTime": datetime.now(timezone.utc).isoformat(),
        "data": data,
        "dataVersion": "2",
        "metadataVersion": "1",
    }


def deployment_ready_event(*, endpoint_name: str, run_id: str) -> dict[str, Any]:
    """A local model server's :data:`DEPLOYMENT_READY` event (Event Grid schema) for ``endpoint_name``, the
    endpoint of tunedrop run ``run_id``."""
    return {
        "id": str(uuid.uuid4()),
        "topic": "tunedrop/local",
        "subject": f"endpoints/{endpoint_name}",
        "eventType": DEPLOYMENT_READY,
        "eventTime": datetime.now(timezone.utc).isoformat(),
        "data": {"endpointName": endpoint_name, "tunedropRunId": run_id},
        "dataVersion": "1",
        "metadataVersion": "1",
    }
