"""Queue trigger through the local host, polling Azurite: delivery, retries, poison queue."""

from __future__ import annotations

import json

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from shared.storage import Storage
from tests.host import sample_app
from tests.host.conftest import wait_for


@pytest.fixture
def queue(azurite, sample_env):
    """The sample queue, written the way the app writes it (shared.storage: base64 messages)."""
    client = Storage({"TUNEDROP_STORAGE": azurite.connection_string}).queue(sample_env["SAMPLE_QUEUE"])
    client.create_queue()
    return client


def _bodies():
    return [(c["body"], c["dequeue_count"]) for c in sample_app.CALLS["on_message"]]


def _empty(client) -> bool:
    return not client.peek_messages(max_messages=1)


def test_message_is_delivered_and_deleted(make_host, queue):
    make_host("on_message")
    queue.send_message(b"hello")
    call = wait_for(lambda: sample_app.CALLS["on_message"] and sample_app.CALLS["on_message"][0])
    assert call["body"] == "hello" and call["dequeue_count"] == 1 and call["id"] and call["inserted"] is not None
    wait_for(lambda: _empty(queue))


def test_failure_is_retried_with_a_higher_dequeue_count(make_host, queue):
    make_host("on_message", visibility_timeout_s=0)
    queue.send_message(b"fail-once")
    wait_for(lambda: len(_bodies()) == 2)
    assert _bodies() == [("fail-once", 1), ("fail-once", 2)]
    wait_for(lambda: _empty(queue))


def test_poison_queue_after_max_dequeue_count_from_host_json(make_host, queue, azurite, sample_env, tmp_path):
    root = tmp_path / "app"
    root.mkdir()
    queues = {"maxDequeueCount": 3, "visibilityTimeout": "00:00:00"}
    (root / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"queues": queues}}))
    make_host("on_message", root=root)
    queue.send_message(b"fail")
    poison = Storage({"TUNEDROP_STORAGE": azurite.connection_string}).queue(f"{sample_env['SAMPLE_QUEUE']}-poison")

    def poisoned():
        try:
            return poison.peek_messages(max_messages=1)
        except ResourceNotFoundError:
            return None

    assert wait_for(poisoned)[0].content == b"fail"  # same content, base64 as on the original queue
    assert _bodies() == [("fail", 1), ("fail", 2), ("fail", 3)]
    assert _empty(queue)


def test_str_parameter_async_function_and_undecodable_message(make_host, azurite, sample_env):
    name = f"{sample_env['SAMPLE_QUEUE']}-text"
    encoded = Storage({"TUNEDROP_STORAGE": azurite.connection_string}).queue(name)
    encoded.create_queue()
    make_host("on_text")
    raw = QueueClient.from_connection_string(azurite.connection_string, name)
    raw.send_message("not base64 !!")  # the host cannot decode it: poison at once, never invoked
    encoded.send_message("héllo".encode())
    wait_for(lambda: sample_app.CALLS["on_text"] == ["héllo"])
    poison = QueueClient.from_connection_string(azurite.connection_string, f"{name}-poison")
    wait_for(lambda: _peek_raw(poison) == ["not base64 !!"])
    assert sample_app.CALLS["on_text"] == ["héllo"]


def _peek_raw(client):
    try:
        return [m.content for m in client.peek_messages(max_messages=5)]
    except ResourceNotFoundError:
        return None
