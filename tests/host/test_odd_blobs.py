"""Odd blob names never stop the local host's blob scan (issue 15, item 3), on a real Azurite.

Azurite answers HTTP 500 to every listing page that would hold a name with a character XML cannot
carry (a control character), and a name with a '..' segment cannot be addressed by its URL (HTTP
clients resolve the segment away), so its receipt could not be written: before the fix either one
stopped every later blob from being ingested.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from click.testing import CliRunner

from tests.host import sample_app
from tests.host.conftest import wait_for
from tunedrop.host.blob import BlobListener


@pytest.fixture
def container(azurite, sample_env):
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(sample_env["SAMPLE_CONTAINER"])
    client.create_container()
    return client


def _handed(function="on_blob"):
    return [c["name"] for c in sample_app.CALLS[function]]


def test_azurite_really_fails_listings_that_hold_a_control_character(container, azurite):
    container.upload_blob("ok.txt", b"x")
    container.upload_blob("bad\x01name.txt", b"x")
    unretried = BlobServiceClient.from_connection_string(azurite.connection_string, retry_total=0)
    with pytest.raises(HttpResponseError) as failed:  # (the SDK's default retries take over a minute)
        list(unretried.get_container_client(container.container_name).list_blobs())
    assert failed.value.status_code == 500
    assert [b.name for b in container.list_blobs(name_starts_with="o")] == ["ok.txt"]


def test_names_azurite_cannot_list_are_found_handed_over_and_the_scan_goes_on(make_host, container, caplog):
    caplog.set_level(logging.INFO, logger="tunedrop.host")
    names = ["a.txt", "bad\x01name.txt", "bad\x02\x1fé.txt", "m.txt", "n\x0b😀.txt", "z.txt"]
    for name in names:
        container.upload_blob(name, b"data")
    make_host("on_blob")
    # Every listable blob, and the last of each row of unlistable ones (probing cannot tell the others apart).
    wait_for(lambda: sorted(_handed()) == sorted(set(names) - {"bad\x01name.txt"}), timeout=60)

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    report = next(m for m in logged if "'bad\\x02\\x1fé.txt'" in m)
    assert "HTTP 500" in report and "U+0002, U+001F" in report
    command = re.search(r"Delete it .*? with: (.*)$", report).group(1)
    assert "\x02" not in command and "\\x02" in command  # escaped, so it can be read and pasted
    subprocess.run(command, shell=True, check=True, timeout=60)  # the logged command really deletes it
    with pytest.raises(ResourceNotFoundError):
        container.get_blob_client("bad\x02\x1fé.txt").get_blob_properties()
    # Gone (as ingest's quarantine removes it), the one before it is found on the next scan.
    wait_for(lambda: "bad\x01name.txt" in _handed(), timeout=30)
    assert sorted(_handed()) == sorted(names)  # each once
    assert any("'bad\\x01name.txt'" in r.getMessage() for r in caplog.records)


def test_a_dot_segment_name_gets_its_receipt_and_does_not_stop_the_scan(make_host, container, caplog):
    container.upload_blob("streams\\..\\..\\x.txt", b"odd")  # storage keeps it as streams/../../x.txt
    container.upload_blob("streams/y.txt", b"plain")
    assert sorted(b.name for b in container.list_blobs()) == ["streams/../../x.txt", "streams/y.txt"]
    make_host("on_stream")
    wait_for(lambda: len(sample_app.CALLS["on_stream"]) == 2, timeout=30)
    got = {c["name"]: c["data"] for c in sample_app.CALLS["on_stream"]}
    where = container.container_name
    assert got == {f"{where}/streams/../../x.txt": b"odd", f"{where}/streams/y.txt": b"plain"}


def test_a_blob_whose_receipt_cannot_be_written_is_logged_and_skipped_not_the_scan(make_host, container, caplog,
                                                                                   monkeypatch):
    caplog.set_level(logging.INFO, logger="tunedrop.host")
    real = BlobListener._claim

    def claim(self, receipt):
        if receipt.blob_name.endswith("/b\nline.txt"):
            raise RuntimeError("receipt store refused")
        return real(self, receipt)

    monkeypatch.setattr(BlobListener, "_claim", claim)
    monkeypatch.setattr(BlobListener, "_receipt", lambda self, name, etag: _Receipt(self, name, etag))
    for name in ("a.txt", "b\nline.txt", "c.txt"):
        container.upload_blob(name, b"data")
    make_host("on_blob")
    wait_for(lambda: sorted(_handed()) == ["a.txt", "c.txt"], timeout=30)
    skipped = [r.getMessage() for r in caplog.records if "skipped blob" in r.getMessage()]
    assert len(skipped) == 1 and "'b\\nline.txt'" in skipped[0] and "receipt store refused" in skipped[0]


class _Receipt:
    """A receipt client named by the plain blob name, for the test above to pick one out."""

    def __init__(self, listener, name, etag):
        self._client = listener.service.get_blob_client(
            "azure-webjobs-hosts", f"blobreceipts/{listener.ctx.host_id}/{listener.spec.function_id}/{etag}/x/"
                                   f"{name.replace(chr(10), '_')}")
        self.blob_name = f"{etag}/{name}"

    def __getattr__(self, attr):
        return getattr(self._client, attr)


# -- the app on the local host: `tunedrop up` as the user ran it --------------------------------------


def _dataset(rows: int) -> bytes:
    line = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    return (line + "\n") * rows


@pytest.fixture
def app_host(storage_env, monkeypatch):
    import function_app
    from shared.storage import reset_default_storage
    from tunedrop.azurite import free_port
    from tunedrop.host import LocalHost
    from tunedrop.local import PROJECT_ROOT

    monkeypatch.setenv("TUNEDROP_BASE_MODEL", "tiny-random")
    monkeypatch.setenv("TUNEDROP_COUNT_TOKENS", "false")
    monkeypatch.setenv("TUNEDROP_WEBHOOK_URLS", "")
    reset_default_storage()
    host = LocalHost(function_app.app, environ=dict(os.environ), port=free_port(), root=PROJECT_ROOT,
                     state_dir=Path(storage_env["TUNEDROP_STATE_DIR"]), poll_interval_s=0.2,
                     functions=["ingest", "list_runs", "run_status"])
    with host:
        yield host


def test_odd_dataset_names_become_rejected_runs_in_quarantine_and_a_normal_one_is_still_ingested(
        app_host, storage_env, azurite, monkeypatch):
    from shared import runs
    from shared.settings import Settings
    from tunedrop.cli import cli

    settings = Settings.from_env()
    service = BlobServiceClient.from_connection_string(azurite.connection_string, retry_total=0)
    training = service.get_container_client(settings.training_container)
    wait_for(training.exists)  # the host makes it
    training.upload_blob("bad\x01name.jsonl", _dataset(20))
    training.upload_blob("..\\..\\windows\\x.jsonl", _dataset(20))  # kept as ../../windows/x.jsonl
    training.upload_blob("normal.jsonl", _dataset(3))  # read and validated: too few examples
    training.upload_blob("données-日本.jsonl", _dataset(3))  # a fine name: quarantined as it is (metadata escaped)

    store = runs.RunStore.from_settings(settings)
    done = wait_for(lambda: (lambda r: len(r) == 4 and all(x.state == runs.REJECTED for x in r) and r)(store.list()),
                    timeout=60)
    by_name = {run.dataset_blob: run for run in done}
    assert set(by_name) == {"bad\x01name.jsonl", "../../windows/x.jsonl", "normal.jsonl", "données-日本.jsonl"}
    for name in ("bad\x01name.jsonl", "../../windows/x.jsonl"):
        run = by_name[name]
        assert run.report["errors"][0]["code"] == "bad_blob_name" and repr(name) in run.error
    assert "control or invisible characters (U+0001)" in by_name["bad\x01name.jsonl"].error
    assert "'..' path segment" in by_name["../../windows/x.jsonl"].error
    assert by_name["normal.jsonl"].report["errors"][0]["code"] != "bad_blob_name"

    quarantined = sorted(b.name for b in service.get_container_client(settings.quarantine_container).list_blobs())
    odd, dots = by_name["bad\x01name.jsonl"].run_id, by_name["../../windows/x.jsonl"].run_id
    assert f"{odd}/bad%01name.jsonl" in quarantined and f"{odd}/bad%01name.jsonl.report.json" in quarantined
    assert f"{dots}/x.jsonl" in quarantined and f"{by_name['données-日本.jsonl'].run_id}/données-日本.jsonl" in quarantined
    assert list(training.list_blobs()) == []  # quarantined, so listings work again

    monkeypatch.setenv("TUNEDROP_API_URL", app_host.base_url)
    shown = CliRunner().invoke(cli, ["status"])
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.startswith(odd))
    assert "\x01" not in shown.output and "bad\\x01name.jsonl" in line and "rejected" in line and "not accepted" in line
