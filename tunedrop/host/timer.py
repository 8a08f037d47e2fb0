"""Timer trigger: NCRONTAB schedules run like the Functions host's timer listener.

Mirrors: 6-field NCRONTAB with seconds first ("0 */5 * * * *"; 5-field cron accepted too) or a
TimeSpan interval ("00:05:00"), in UTC, day-of-month and day-of-week both having to match as in
NCRONTAB; ``%NAME%`` schedules; ``runOnStartup``; the next occurrence is computed after each run,
so runs never overlap (a per-function lock also keeps admin invocations from overlapping, like the
host's singleton lock); the schedule monitor: when ``AzureWebJobsStorage`` holds a connection
string and ``useMonitor`` is on (by default for schedules of a minute or more), the status blob
``azure-webjobs-hosts/timers/<hostId>/Host.Functions.<name>/status`` records Last/Next, and a
missed occurrence found at startup runs at once with ``past_due=True``.
Differences: no WEBSITE_TIME_ZONE support (always UTC); never retried, as in the host.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.meta import Datum
from azure.functions.timer import TimerRequestConverter
from azure.storage.blob import BlobServiceClient
from croniter import croniter

from tunedrop.host.config import _TIMESPAN, HOST_CLIENT_OPTIONS, HostConfigError, parse_timespan, resolve_settings
from tunedrop.host.invoke import FunctionSpec
from tunedrop.host.listener import HostContext

log = logging.getLogger("tunedrop.host")

HOSTS_CONTAINER = "azure-webjobs-hosts"
API_REASON = "This function was programmatically called via the host APIs."


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Schedule:
    """An NCRONTAB expression (seconds first) or a TimeSpan interval."""

    def __init__(self, expression: str):
        self.expression = expression.strip()
        self.interval_s = parse_timespan(self.expression) if _TIMESPAN.match(self.expression) else None
        if self.interval_s is None:
            count = len(self.expression.split())
            if count not in (5, 6):
                raise HostConfigError(f"Timer schedule {expression!r}: NCRONTAB needs 6 fields "
                                      "({second} {minute} {hour} {day} {month} {day-of-week}).")
            self._cron_kwargs = {"day_or": False, "second_at_beginning": count == 6}
            if not croniter.is_valid(self.expression, second_at_beginning=count == 6):
                raise HostConfigError(f"Timer schedule {expression!r} is not a valid NCRONTAB expression.")
        elif self.interval_s <= 0:
            raise HostConfigError(f"Timer schedule {expression!r}: the interval must be positive.")

    def next_after(self, when: datetime) -> datetime:
        if self.interval_s is not None:
            return when + timedelta(seconds=self.interval_s)
        return croniter(self.expression, when, **self._cron_kwargs).get_next(datetime)

    def period_s(self) -> float:
        first = self.next_after(utcnow())
        return (self.next_after(first) - first).total_seconds()


class TimerListener:
    def __init__(self, spec: FunctionSpec, ctx: HostContext):
        self.spec = spec
        self.ctx = ctx
        self.schedule = Schedule(resolve_settings(spec.trigger["schedule"], ctx.environ, f"Function {spec.name}"))
        self.run_on_startup = bool(spec.trigger.get("runOnStartup"))
        self._last: datetime | None = None
        self._status_blob = None
        use_monitor = spec.trigger.get("useMonitor")
        if use_monitor is None:
            use_monitor = self.schedule.period_s() >= 60
        connection = ctx.environ.get("AzureWebJobsStorage", "")
        if use_monitor and "=" in connection:
            service = BlobServiceClient.from_connection_string(connection, **HOST_CLIENT_OPTIONS)
            self._hosts_container = service.get_container_client(HOSTS_CONTAINER)
            self._status_blob = self._hosts_container.get_blob_client(f"timers/{ctx.host_id}/{spec.function_id}/status")
        self._thread = threading.Thread(target=self._run, name=f"listener-{spec.name}", daemon=True)

    def describe(self) -> str:
        return f"timerTrigger ({self.schedule.expression})"

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        status = self._read_status()
        if status and status.get("Next") and datetime.fromisoformat(status["Next"]) < utcnow():
            log.info("Function '%s' is past due on startup. Executing now.", self.spec.log_name)
            self.fire(past_due=True)
        elif self.run_on_startup:
            log.info("Function '%s' is configured to run on startup. Executing now.", self.spec.log_name)
            self.fire()
        next_time = self.schedule.next_after(utcnow())
        while not self.ctx.stopping.wait(max(0.0, (next_time - utcnow()).total_seconds())):
            self.fire(reason=f"Timer fired at {utcnow().isoformat()}", occurrence=next_time)
            next_time = self.schedule.next_after(max(utcnow(), next_time))

    def fire(self, *, past_due: bool = False, reason: str | None = None, occurrence: datetime | None = None) -> None:
        """One invocation with a func.TimerRequest, never two at once for this function."""
        with self.spec.lock:
            occurrence = occurrence or utcnow()
            following = self.schedule.next_after(occurrence)
            info = {"IsPastDue": past_due, "Schedule": {"AdjustForDST": True},
                    "ScheduleStatus": {"Last": (self._last or datetime.min.replace(tzinfo=timezone.utc)).isoformat(),
                                       "Next": following.isoformat(), "LastUpdated": utcnow().isoformat()}}
            self.ctx.invoker.invoke(
                self.spec, reason or f"Timer fired at {utcnow().isoformat()}",
                lambda: TimerRequestConverter.decode(Datum(json.dumps(info), "json"), trigger_metadata=None))
            self._last = occurrence
            self._write_status({"Last": occurrence.isoformat(), "Next": following.isoformat(),
                                "LastUpdated": utcnow().isoformat()})

    def _read_status(self) -> dict | None:
        if self._status_blob is None:
            return None
        try:
            return json.loads(self._status_blob.download_blob().readall())
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            log.warning("Timer status for '%s' could not be read: %s", self.spec.log_name, exc)
            return None

    def _write_status(self, status: dict) -> None:
        if self._status_blob is None:
            return
        try:
            try:
                self._status_blob.upload_blob(json.dumps(status), overwrite=True)
            except ResourceNotFoundError:
                try:
                    self._hosts_container.create_container()
                except ResourceExistsError:
                    pass
                self._status_blob.upload_blob(json.dumps(status), overwrite=True)
        except Exception as exc:
            log.warning("Timer status for '%s' could not be written: %s", self.spec.log_name, exc)
