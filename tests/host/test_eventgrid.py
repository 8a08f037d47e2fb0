"""Event Grid trigger through the local host's webhook, as Event Grid (or a local job) calls it."""

from __future__ import annotations

from datetime import datetime

import httpx

from tests.host import sample_app


def _event(subject: str, run_id: str) -> dict:
    return {"id": f"evt-{run_id}",
            "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws",
            "subject": subject, "eventType": "Microsoft.MachineLearningServices.RunCompleted",
            "eventTime": "2024-05-01T10:00:00.1234567Z", "dataVersion": "2",
            "data": {"experimentName": "tunedrop", "runId": run_id, "runTags": {"tunedrop_run": "r1"}}}


def _post(host, body, event_type: str | None = "Notification", function: str = "on_event", **kwargs):
    headers = {"aeg-event-type": event_type} if event_type else {}
    return httpx.post(f"{host.base_url}/runtime/webhooks/EventGrid", params={"functionName": function},
                      headers=headers, **({"content": body} if isinstance(body, bytes) else {"json": body}), **kwargs)


def test_subscription_validation_handshake(make_host):
    host = make_host("on_event")
    validation = [{"id": "v1", "topic": "t", "subject": "", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                   "eventTime": "2024-05-01T10:00:00Z", "dataVersion": "1", "data": {"validationCode": "code-123"}}]
    response = _post(host, validation, "SubscriptionValidation")
    assert response.status_code == 200 and response.json() == {"validationResponse": "code-123"}
    assert sample_app.CALLS["on_event"] == []


def test_notifications_are_delivered_one_event_per_invocation(make_host):
    host = make_host("on_event")
    response = _post(host, [_event("experiments/e/runs/a", "a"), _event("experiments/e/runs/b", "b")])
    assert response.status_code == 202  # what the Event Grid extension answers
    calls = sample_app.CALLS["on_event"]
    assert [c["id"] for c in calls] == ["evt-a", "evt-b"]
    first = calls[0]
    assert first["class"] == "EventGridEvent" and first["type"] == "Microsoft.MachineLearningServices.RunCompleted"
    assert first["subject"] == "experiments/e/runs/a" and first["data"]["runTags"] == {"tunedrop_run": "r1"}
    assert isinstance(first["time"], datetime) and first["topic"].endswith("/workspaces/ws")

    assert _post(host, _event("experiments/e/runs/c", "c")).status_code == 202  # a single object
    assert sample_app.CALLS["on_event"][-1]["id"] == "evt-c"


def test_a_failing_event_gives_500_so_event_grid_retries(make_host):
    host = make_host("on_event")
    response = _post(host, [_event("ok", "1"), _event("fail", "2")])
    assert response.status_code == 500 and response.content == b""
    assert len(sample_app.CALLS["on_event"]) == 2


def test_bad_requests(make_host):
    host = make_host("on_event", "items")
    assert _post(host, b"{not json").status_code == 400
    assert _post(host, [_event("s", "1")], event_type=None).status_code == 400
    assert _post(host, [_event("s", "1")], function="missing").status_code == 404
    assert _post(host, [_event("s", "1")], function="items").status_code == 404  # not an Event Grid function
    assert _post(host, [], "Unsubscribe").status_code == 202
    assert sample_app.CALLS["on_event"] == []
