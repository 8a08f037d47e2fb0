"""Azure ML run events: Event Grid -> `job_events` (acknowledge fast) -> queue -> `job_event_worker`.

`job_events` answers Event Grid within its 30 s: it only queues the event (see shared/event_queue.py).
`job_event_worker` moves the run; on success it registers the model and begins the deployment. An
exception there makes the host deliver the message again (up to host.json's maxDequeueCount, then
`<queue>-poison`), so only errors a retry can cure are raised; events for other jobs, steps or
workspaces are acknowledged.

A local model server's "deployment ready" event (local backend only; Azure ML sends none) is acted on
here, at once: finishing one ready deployment takes a few reads and one conditional write (milliseconds),
and a queue would add its polling delay. Should it fail, the sweeper finishes the deployment as before.
"""

import logging

import azure.functions as func

from shared.event_queue import get_event_queue
from shared.events import RunEvent
from shared.pipeline import get_pipeline
from shared.runs import InvalidTransition
from shared.settings import STORAGE_CONNECTION, Settings

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.job_events")


@bp.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    run_event = RunEvent.from_function_event(event)
    if run_event.is_deployment_ready:
        get_pipeline().on_deployment_ready(run_event)
        return
    if get_event_queue(Settings.from_env()).put(run_event):
        log.info("event %s (%s, job %s): queued", run_event.id, run_event.run_status, run_event.run_id)


@bp.queue_trigger(arg_name="msg", queue_name="%TUNEDROP_JOB_EVENTS_QUEUE%", connection=STORAGE_CONNECTION)
def job_event_worker(msg: func.QueueMessage) -> None:
    run_event = RunEvent.from_json(msg.get_body())
    try:
        run = get_pipeline().on_run_event(run_event)
    except InvalidTransition as exc:
        log.warning("event %s: %s (acknowledged; a retry cannot change it)", run_event.id, exc)
        return
    if run is not None:
        log.info("event %s (%s): run %s is %s", run_event.id, run_event.run_status, run.run_id, run.state)
