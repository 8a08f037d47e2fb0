"""Blob trigger through the local host, polling Azurite: receipts, overwrites, restarts, poison."""

from __future__ import annotations

import base64
import json

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient
from azure.storage.queue import QueueClient

from tests.host import sample_app
from tests.host.conftest import wait_for


@pytest.fixture
def container(azurite, sample_env):
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    client = service.get_container_client(sample_env["SAMPLE_CONTAINER"])
    client.create_container()
    return client


def _names(function="on_blob"):
    return [c["name"] for c in sample_app.CALLS[function]]


def test_each_blob_version_runs_once_and_again_when_overwritten(make_host, container, azurite):
    host = make_host("on_blob")
    container.upload_blob("a.txt", b"one")
    first = wait_for(lambda: sample_app.CALLS["on_blob"] and sample_app.CALLS["on_blob"][0])
    assert first == {"name": "a.txt", "data": b"one", "class": BlobClient}  # the SDK's, as in Azure

    container.upload_blob("b.txt", b"two")
    wait_for(lambda: "b.txt" in _names())
    assert _names().count("a.txt") == 1

    container.upload_blob("a.txt", b"three", overwrite=True)
    wait_for(lambda: _names().count("a.txt") == 2)
    assert sample_app.CALLS["on_blob"][-1]["data"] == b"three"

    etag = container.get_blob_client("a.txt").get_blob_properties().etag
    hosts = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("azure-webjobs-hosts")
    receipt = hosts.get_blob_client(f"blobreceipts/{host.host_id}/Host.Functions.on_blob/{etag}/{container.container_name}/a.txt")
    assert wait_for(lambda: receipt.get_blob_properties().metadata == {})  # completed


def test_receipts_survive_a_host_restart(make_host, container):
    first = make_host("on_blob")
    container.upload_blob("a.txt", b"one")
    wait_for(lambda: "a.txt" in _names())
    first.stop()

    make_host("on_blob")  # same host id
    container.upload_blob("c.txt", b"new")
    wait_for(lambda: "c.txt" in _names())  # a later scan than the one that saw a.txt again
    assert _names() == ["a.txt", "c.txt"]


def test_input_stream_binding_and_path_pattern(make_host, container):
    make_host("on_stream")
    container.upload_blob("streams/skip.csv", b"nope")
    container.upload_blob("streams/x.txt", b"stream data")
    call = wait_for(lambda: sample_app.CALLS["on_stream"] and sample_app.CALLS["on_stream"][0])
    assert call["name"] == f"{container.container_name}/streams/x.txt"
    assert call["data"] == b"stream data" and call["length"] == 11 and call["uri"].endswith("/streams/x.txt")
    container.upload_blob("streams/y.txt", b"y")
    wait_for(lambda: len(sample_app.CALLS["on_stream"]) == 2)
    assert not any(c["name"].endswith("skip.csv") for c in sample_app.CALLS["on_stream"])


def test_failing_blob_is_retried_then_poisoned(make_host, container, azurite):
    host = make_host("on_blob", max_dequeue_count=3)
    poison = QueueClient.from_connection_string(azurite.connection_string, "webjobs-blobtrigger-poison")
    container.upload_blob("bad.txt", b"fail please")
    wait_for(lambda: _names().count("bad.txt") == 3)

    def poison_message():
        try:
            messages = poison.peek_messages(max_messages=32)
        except ResourceNotFoundError:
            return None
        for message in messages:
            doc = json.loads(base64.b64decode(message.content))
            if doc["ContainerName"] == container.container_name:
                return doc
        return None

    doc = wait_for(poison_message)
    etag = container.get_blob_client("bad.txt").get_blob_properties().etag
    assert doc == {"Type": "BlobTrigger", "FunctionId": "Host.Functions.on_blob", "BlobType": "BlockBlob",
                   "ContainerName": container.container_name, "BlobName": "bad.txt", "ETag": etag}
    container.upload_blob("good.txt", b"fine")
    wait_for(lambda: "good.txt" in _names())
    assert _names().count("bad.txt") == 3  # not retried once poisoned
    assert host.listeners["on_blob"].describe().startswith("blobTrigger")
