"""The run store: one record per dropped dataset version, a forward-only state machine.

Modelled on idempotency utilities such as Powertools': the record is created with a
conditional insert (the same blob version always maps to the same run id), every change is
an ETag-conditional write, and a transition that arrives late or twice changes nothing.

    received -> validating -> rejected
                           -> submitted -> running -> succeeded -> registered -> deploying -> deployed -> torn_down
    any non-final state    -> failed
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, ClassVar

log = logging.getLogger("tunedrop.runs")

PARTITION = "run"

class RunState(StrEnum):
    """Where a run is; stored and shown as its value."""

    RECEIVED = "received"
    VALIDATING = "validating"
    REJECTED = "rejected"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    REGISTERED = "registered"
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    TORN_DOWN = "torn_down"
    FAILED = "failed"
    CANCELED = "canceled"


# The states by name, as the rest of the code reads them (runs.DEPLOYED).
(RECEIVED, VALIDATING, REJECTED, SUBMITTED, RUNNING, SUCCEEDED, REGISTERED, DEPLOYING, DEPLOYED, TORN_DOWN,
 FAILED, CANCELED) = RunState

#: The happy path, in order: a transition to a state at or before the current one is stale.
ORDER = (RECEIVED, VALIDATING, SUBMITTED, RUNNING, SUCCEEDED, REGISTERED, DEPLOYING, DEPLOYED, TORN_DOWN)
FINAL = (REJECTED, FAILED, TORN_DOWN, CANCELED)
#: Where a run stopped short: ``failed_in`` says where it was; `retry` carries it on from there.
STOPPED = (FAILED, CANCELED)
#: What `cancel` stops: everything before the model serves (a deployed run is put to sleep, not canceled).
CANCELABLE = (RECEIVED, VALIDATING, SUBMITTED, RUNNING, SUCCEEDED, REGISTERED, DEPLOYING)

TRANSITIONS: dict[str, tuple[str, ...]] = {
    RECEIVED: (VALIDATING, FAILED, CANCELED),
    VALIDATING: (REJECTED, SUBMITTED, FAILED, CANCELED),
    # A job's completion event may overtake its "running" event.
    SUBMITTED: (RUNNING, SUCCEEDED, FAILED, CANCELED),
    RUNNING: (SUCCEEDED, FAILED, CANCELED),
    SUCCEEDED: (REGISTERED, FAILED, CANCELED),
    REGISTERED: (DEPLOYING, FAILED, CANCELED),
    DEPLOYING: (DEPLOYED, TORN_DOWN, FAILED, CANCELED),
    # A deployed endpoint found dead fails visibly (and can be retried).
    DEPLOYED: (TORN_DOWN, FAILED),
    REJECTED: (),
    FAILED: (),
    TORN_DOWN: (),
    CANCELED: (),
}


class RunStoreError(Exception):
    """Base class of run store errors."""


class RunNotFound(RunStoreError):
    def __init__(self, run_id: str):
        super().__init__(f"No run {run_id!r}: list runs with `tunedrop status`.")
        self.run_id = run_id


class InvalidTransition(RunStoreError):
    """The state machine does not allow this move (not a duplicate: a real conflict)."""

    def __init__(self, run_id: str, current: str, target: str):
        super().__init__(f"Run {run_id}: cannot go from {current} to {target}.")
        self.current, self.target = current, target


class ConcurrentUpdate(RunStoreError):
    """Other writers kept winning the ETag race; the caller should retry later."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def run_id_for(container: str, blob_name: str, etag: str) -> str:
    """The run id of one blob version: readable stem + hash of container, name and ETag."""
    digest = hashlib.sha256(f"{container}/{blob_name}@{etag.strip(chr(34))}".encode()).hexdigest()[:12]
    parts = blob_name.split("/")
    stem = parts[-1].split(".", 1)[0].lower()
    if stem == "train" and len(parts) > 1:  # DIR/train.jsonl of a pair: the folder names the dataset
        stem = parts[-2].lower()
    stem = re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:40] or "dataset"
    return f"{stem}-{digest}"


def is_stale(current: str, target: str) -> bool:
    """True when ``target`` is where the run already is or has been (a duplicate or late event)."""
    if current == target:
        return True
    if current in (REJECTED, FAILED, CANCELED):
        return True
    if current in ORDER and target in ORDER:
        return ORDER.index(target) < ORDER.index(current)
    return False


@dataclass
class Run:
    run_id: str
    state: str = RECEIVED
    dataset_container: str = ""
    dataset_blob: str = ""
    dataset_etag: str = ""
    dataset_bytes: int = 0
    validated_bytes: int = 0  # read so far by validation (recorded every few seconds while it runs)
    test_blob: str = ""  # a train/test pair's test half (same container), used as given; "" = split the dataset
    test_etag: str = ""
    content_sha256: str = ""
    created_at: str = ""
    updated_at: str = ""
    base_model: str = ""
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    job_name: str = ""
    display_name: str = ""
    metrics: dict = field(default_factory=dict)
    model_name: str = ""
    model_version: str = ""
    endpoint_name: str = ""
    deploy_started_at: str = ""
    deployed_at: str = ""
    last_scored_at: str = ""
    error: str = ""
    failed_in: str = ""
    claims: int = 0  # validation take-overs after a crashed claimer
    retries: int = 0  # user retries of a failed run; part of job names and webhook ids
    cycle: int = 0  # deployment cycles after the first: each wake from sleep deploys under a new endpoint name
    gate: dict = field(default_factory=dict)  # the quality gate's figures and verdict (see shared/pipeline/gate.py)
    history: list = field(default_factory=list)
    etag: str = field(default="", repr=False)

    _JSON_FIELDS: ClassVar[tuple[str, ...]] = ("config", "report", "metrics", "gate", "history")

    @classmethod
    def from_entity(cls, entity) -> "Run":
        values: dict[str, Any] = {"run_id": entity["RowKey"]}
        for f in fields(cls):
            if f.name in ("run_id", "etag") or entity.get(f.name) is None:
                continue
            value = entity[f.name]
            values[f.name] = json.loads(value) if f.name in cls._JSON_FIELDS and value else value
        values = {k: v for k, v in values.items() if v != ""} | {"run_id": entity["RowKey"]}
        run = cls(**values)
        run.etag = getattr(entity, "metadata", {}).get("etag", "")
        return run

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {"PartitionKey": PARTITION, "RowKey": self.run_id}
        for f in fields(self):
            if f.name in ("run_id", "etag"):
                continue
            value = getattr(self, f.name)
            entity[f.name] = json.dumps(value, separators=(",", ":")) if f.name in self._JSON_FIELDS else value
        return entity

    def public(self) -> dict[str, Any]:
        """What the status route and the CLI show (no ETag; the record never holds secrets)."""
        data = asdict(self)
        data.pop("etag", None)
        return data

    def at(self, state: str) -> str | None:
        """When the run entered ``state`` (ISO time), from its history."""
        for entry in self.history:
            if entry.get("state") == state:
                return entry.get("at")
        return None


class RunStore:
    """Runs in an Azure Table (Azurite locally)."""

    def __init__(self, table_client):
        self._table = table_client
        self._ensured = False

    @classmethod
    def from_settings(cls, settings, storage=None) -> "RunStore":
        from shared.storage import default_storage

        storage = storage or default_storage()
        return cls(storage.table_service.get_table_client(settings.runs_table))

    def _ensure_table(self) -> None:
        if self._ensured:
            return
        from azure.core.exceptions import ResourceExistsError

        try:
            self._table.create_table()
        except ResourceExistsError:
            pass
        self._ensured = True

    def create(self, run: Run) -> tuple[Run, bool]:
        """Insert ``run`` unless a run with its id exists; returns (the stored run, created)."""
        from azure.core.exceptions import ResourceExistsError

        self._ensure_table()
        now = utcnow().isoformat()
        run.created_at = run.created_at or now
        run.updated_at = now
        run.history = run.history or [{"state": run.state, "at": now}]
        try:
            meta = self._table.create_entity(run.to_entity())
        except ResourceExistsError:
            return self.get(run.run_id), False
        run.etag = meta.get("etag", "")
        return run, True

    def get(self, run_id: str) -> Run:
        from azure.core.exceptions import ResourceNotFoundError

        self._ensure_table()
        try:
            return Run.from_entity(self._table.get_entity(PARTITION, run_id))
        except ResourceNotFoundError:
            raise RunNotFound(run_id) from None

    def find(self, run_id: str) -> Run | None:
        try:
            return self.get(run_id)
        except RunNotFound:
            return None

    def list(self, states: tuple[str, ...] | None = None, content_sha256: str | None = None) -> list[Run]:
        self._ensure_table()
        query = f"PartitionKey eq '{PARTITION}'"
        if states:
            query += " and (" + " or ".join(f"state eq '{s}'" for s in states) + ")"
        if content_sha256:
            query += f" and content_sha256 eq '{content_sha256}'"  # a hex digest: nothing to escape
        runs = [Run.from_entity(e) for e in self._table.query_entities(query)]
        return sorted(runs, key=lambda r: r.created_at)

    def save(self, run: Run) -> Run:
        """Write ``run`` if nobody changed it since it was read; raises ConcurrentUpdate otherwise."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError
        from azure.data.tables import UpdateMode

        run.updated_at = utcnow().isoformat()
        try:
            meta = self._table.update_entity(
                run.to_entity(), mode=UpdateMode.REPLACE, etag=run.etag, match_condition=MatchConditions.IfNotModified
            )
        except ResourceModifiedError:
            raise ConcurrentUpdate(f"Run {run.run_id} changed while it was being updated.") from None
        run.etag = meta.get("etag", "")
        return run

    def transition(self, run_id: str, target: str, *, attempts: int = 8, **changes: Any) -> Run | None:
        """Move a run to ``target`` with ``changes``; None if that move is stale (duplicate/late).

        Raises InvalidTransition for a move the state machine forbids, ConcurrentUpdate if
        other writers keep winning.
        """
        for _ in range(attempts):
            run = self.get(run_id)
            if target not in TRANSITIONS[run.state]:
                if is_stale(run.state, target):
                    log.info("run %s: %s -> %s is stale, ignored", run_id, run.state, target)
                    return None
                raise InvalidTransition(run_id, run.state, target)
            for key, value in changes.items():
                setattr(run, key, value)
            if target in STOPPED:
                run.failed_in = run.state
            run.state = target
            run.history = [*run.history, {"state": target, "at": utcnow().isoformat()}]
            try:
                return self.save(run)
            except ConcurrentUpdate:
                continue
        raise ConcurrentUpdate(f"Run {run_id}: gave up moving to {target} after {attempts} conflicting writes.")

    def update(self, run_id: str, *, attempts: int = 8, **changes: Any) -> Run:
        """Change fields other than the state, ETag-conditionally."""
        for _ in range(attempts):
            run = self.get(run_id)
            for key, value in changes.items():
                setattr(run, key, value)
            try:
                return self.save(run)
            except ConcurrentUpdate:
                continue
        raise ConcurrentUpdate(f"Run {run_id}: gave up updating after {attempts} conflicting writes.")

    def claim(self, run: Run, lease: timedelta, now: datetime | None = None) -> Run | None:
        """Take a run for validation: received -> validating, or a validating run whose claimer went
        quiet for longer than ``lease`` (it crashed). None when someone else holds it or it moved on."""
        for _ in range(8):
            if run.state == RECEIVED:
                try:
                    return self.transition(run.run_id, VALIDATING, attempts=1)
                except ConcurrentUpdate:
                    pass
            elif run.state == VALIDATING and (now or utcnow()) - datetime.fromisoformat(run.updated_at) > lease:
                run.claims += 1
                try:
                    return self.save(run)
                except ConcurrentUpdate:
                    pass
            else:
                return None
            run = self.get(run.run_id)
        return None

    def reopen(self, run: Run, target: str, **changes: Any) -> Run | None:
        """Retry a failed run from ``target`` (the one backwards move there is, and only on request).

        None when the run is no longer the failed one that was read (someone else retried it).
        """
        if run.state not in STOPPED:
            return None
        for key, value in changes.items():
            setattr(run, key, value)
        run.retries += 1
        run.state = target
        run.error = ""
        run.history = [*run.history, {"state": target, "at": utcnow().isoformat(), "retry": run.retries}]
        try:
            return self.save(run)
        except ConcurrentUpdate:
            return None

    def wake(self, run: Run, endpoint_name: str) -> Run | None:
        """Start a new deployment cycle of a sleeping (torn-down) run: torn_down -> deploying, ``cycle`` + 1,
        under ``endpoint_name``. The one move back to an earlier state besides `reopen`, made only on request
        (a score, `deploy`); ETag-conditional, so of many requests at once exactly one wakes it. None when
        the run is not the sleeping one that was read."""
        if run.state != TORN_DOWN:
            return None
        now = utcnow().isoformat()
        run.cycle += 1
        run.state = DEPLOYING
        run.endpoint_name = endpoint_name
        run.deploy_started_at, run.deployed_at, run.last_scored_at, run.error = now, "", "", ""
        run.history = [*run.history, {"state": DEPLOYING, "at": now, "cycle": run.cycle}]
        try:
            return self.save(run)
        except ConcurrentUpdate:
            return None

    def release(self, run: Run, error: str) -> Run:
        """Give a claimed run back (validating -> received) after a failure, so a retry can claim it. The record
        may have changed since it was claimed (validation records its progress on it): read again then; a run
        no longer validating (cancelled meanwhile) is left as it is."""
        for _ in range(8):
            if run.state != VALIDATING:
                return run
            run.state = RECEIVED
            run.error = error
            run.history = [*run.history, {"state": RECEIVED, "at": utcnow().isoformat(), "error": error}]
            try:
                return self.save(run)
            except ConcurrentUpdate:
                run = self.get(run.run_id)
        raise ConcurrentUpdate(f"run {run.run_id}: could not release it after 8 tries")

