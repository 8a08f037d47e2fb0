"""Azure ML run events from Event Grid -> move the run; on success register and begin deploying.

An exception makes Event Grid deliver the event again (at least once, for up to a day), so only
errors a retry can cure are raised; events for other jobs, steps or workspaces are acknowledged.
"""

import logging

import azure.functions as func

from shared.events import RunEvent
from shared.pipeline import get_pipeline
from shared.runs import InvalidTransition

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.job_events")


@bp.event_grid_trigger(arg_name="event")
def job_events(event: func.EventGridEvent) -> None:
    run_event = RunEvent.from_function_event(event)
    try:
        run = get_pipeline().on_run_event(run_event)
    except InvalidTransition as exc:
        log.warning("event %s: %s (acknowledged; a retry cannot change it)", run_event.id, exc)
        return
    if run is not None:
        log.info("event %s (%s): run %s is %s", run_event.id, run_event.run_status, run.run_id, run.state)
