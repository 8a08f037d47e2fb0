"""A small FunctionApp with one function per trigger kind, for the local host's tests.

Each function appends what it received to ``CALLS[<function name>]``; names of containers and
queues come from app settings (``%SAMPLE_CONTAINER%``...) so every test has its own.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob_ext

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

CALLS: dict[str, list] = collections.defaultdict(list)
_lock = threading.Lock()


def record(name: str, value) -> None:
    with _lock:
        CALLS[name].append(value)


def reset() -> None:
    with _lock:
        CALLS.clear()


@app.route(route="items/{id:int}/{tag?}", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def items(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    record("items", context.invocation_id)
    doc = {"id": req.route_params.get("id"), "tag": req.route_params.get("tag"), "method": req.method,
           "q": req.params.get("q"), "body": req.get_body().decode(), "url": req.url}
    return func.HttpResponse(json.dumps(doc), status_code=201, mimetype="application/json",
                             headers={"X-Sample": "yes"})


@app.route(route="secret")  # the app's default auth level: FUNCTION
def secret(req: func.HttpRequest) -> str:
    return "the secret"


@app.route(route="admin-only", auth_level=func.AuthLevel.ADMIN)
def admin_only(req: func.HttpRequest) -> str:
    return "admin"


@app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("boom-internal-detail")


@app.route(route="slow", auth_level=func.AuthLevel.ANONYMOUS)
async def slow(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(float(req.params.get("s", "1")))
    return func.HttpResponse("slow done")


@app.event_grid_trigger(arg_name="event")
def on_event(event: func.EventGridEvent) -> None:
    record("on_event", {"id": event.id, "type": event.event_type, "subject": event.subject, "topic": event.topic,
                        "data": event.get_json(), "time": event.event_time, "class": type(event).__name__})
    if event.subject == "fail":
        raise RuntimeError("event failed")


@app.timer_trigger(schedule="* * * * * *", arg_name="timer")
def every_second(timer: func.TimerRequest) -> None:
    record("every_second", timer.past_due)


_running = {"yearly": 0}


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", use_monitor=True)
def yearly(timer: func.TimerRequest) -> None:
    with _lock:
        _running["yearly"] += 1
        overlapping = _running["yearly"] > 1
    time.sleep(0.3)
    with _lock:
        _running["yearly"] -= 1
    record("yearly", {"past_due": timer.past_due, "status": timer.schedule_status, "class": type(timer).__name__,
                      "overlapping": overlapping})


@app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer", run_on_startup=True, use_monitor=False)
def on_startup(timer: func.TimerRequest) -> None:
    record("on_startup", timer.past_due)


@app.blob_trigger(arg_name="client", path="%SAMPLE_CONTAINER%/{name}", connection="SAMPLE_STORAGE")
def on_blob(client: blob_ext.BlobClient) -> None:
    data = client.download_blob().readall()
    record("on_blob", {"name": client.blob_name, "data": data, "class": type(client)})
    if data.startswith(b"fail"):
        raise RuntimeError("blob failed")


@app.blob_trigger(arg_name="stream", path="%SAMPLE_CONTAINER%/streams/{name}.txt", connection="SAMPLE_STORAGE")
def on_stream(stream: func.InputStream) -> None:
    record("on_stream", {"name": stream.name, "data": stream.read(), "length": stream.length, "uri": stream.uri})


@app.queue_trigger(arg_name="msg", queue_name="%SAMPLE_QUEUE%", connection="SAMPLE_STORAGE")
def on_message(msg: func.QueueMessage) -> None:
    body = msg.get_body().decode()
    record("on_message", {"id": msg.id, "body": body, "dequeue_count": msg.dequeue_count,
                          "inserted": msg.insertion_time})
    if body == "fail" or (body == "fail-once" and msg.dequeue_count == 1):
        raise RuntimeError("message failed")


@app.queue_trigger(arg_name="text", queue_name="%SAMPLE_QUEUE%-text", connection="SAMPLE_STORAGE")
async def on_text(text: str) -> None:
    await asyncio.sleep(0)
    record("on_text", text)
