"""Timer trigger through the local host: schedules, the admin invoke API, the schedule monitor."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from azure.storage.blob import BlobServiceClient

from tests.host import sample_app
from tests.host.conftest import wait_for
from tunedrop.host import HostConfigError
from tunedrop.host.timer import Schedule


def test_ncrontab_schedules():
    start = datetime(2024, 1, 1, 0, 0, 7, tzinfo=timezone.utc)
    assert Schedule("0 */5 * * * *").next_after(start) == datetime(2024, 1, 1, 0, 5, 0, tzinfo=timezone.utc)
    assert Schedule("*/10 * * * * *").next_after(start) == datetime(2024, 1, 1, 0, 0, 10, tzinfo=timezone.utc)
    assert Schedule("*/5 * * * *").next_after(start) == datetime(2024, 1, 1, 0, 5, 0, tzinfo=timezone.utc)
    assert Schedule("00:00:30").next_after(start) == start + timedelta(seconds=30)
    # NCRONTAB: day-of-month and day-of-week must both match (2024-03-01 is a Friday)
    assert Schedule("0 0 0 1 * FRI").next_after(start) == datetime(2024, 3, 1, tzinfo=timezone.utc)
    for bad in ("* * *", "0 0 99 * * *"):
        with pytest.raises(HostConfigError):
            Schedule(bad)


def test_timer_fires_on_schedule(make_host):
    make_host("every_second")
    wait_for(lambda: len(sample_app.CALLS["every_second"]) >= 2, timeout=5)
    assert sample_app.CALLS["every_second"][0] is False  # past_due


def test_run_on_startup(make_host):
    make_host("on_startup")
    wait_for(lambda: sample_app.CALLS["on_startup"] == [False])


def test_admin_invoke_runs_a_timer_function_without_overlap(make_host):
    host = make_host("yearly", "items")
    url = f"{host.base_url}/admin/functions/yearly"
    assert httpx.post(url, json={"input": ""}).status_code == 401
    assert httpx.post(url, json={"input": ""}, headers={"x-functions-key": host.function_key}).status_code == 401
    for _ in range(2):
        assert httpx.post(url, json={"input": ""}, headers={"x-functions-key": host.master_key}).status_code == 202
    calls = wait_for(lambda: len(sample_app.CALLS["yearly"]) == 2 and sample_app.CALLS["yearly"])
    assert all(c["class"] == "TimerRequest" and c["past_due"] is False and not c["overlapping"] for c in calls)

    master = {"x-functions-key": host.master_key}
    assert httpx.post(f"{host.base_url}/admin/functions/missing", json={}, headers=master).status_code == 404
    assert httpx.post(f"{host.base_url}/admin/functions/items", json={}, headers=master).status_code == 400


def test_missed_occurrence_runs_past_due_on_startup(make_host, azurite, sample_env):
    host_id = "pastdue-" + sample_env["SAMPLE_QUEUE"][-8:]
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    hosts = service.get_container_client("azure-webjobs-hosts")
    if not hosts.exists():
        hosts.create_container()
    status = hosts.get_blob_client(f"timers/{host_id}/Host.Functions.yearly/status")
    missed = datetime.now(timezone.utc) - timedelta(hours=1)
    status.upload_blob(json.dumps({"Last": (missed - timedelta(days=365)).isoformat(), "Next": missed.isoformat(),
                                   "LastUpdated": missed.isoformat()}), overwrite=True)

    environ = {**sample_env, "AzureWebJobsStorage": azurite.connection_string}
    make_host("yearly", environ=environ, host_id=host_id)
    call = wait_for(lambda: sample_app.CALLS["yearly"] and sample_app.CALLS["yearly"][0])
    assert call["past_due"] is True and call["status"]["Next"]
    updated = wait_for(lambda: (doc := json.loads(status.download_blob().readall()))["Next"] != missed.isoformat() and doc)
    assert datetime.fromisoformat(updated["Next"]) > datetime.now(timezone.utc)
