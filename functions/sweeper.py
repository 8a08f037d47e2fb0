"""Timer -> finish deployments that became ready, tear down idle endpoints, reconcile stale jobs.

Timer triggers are never retried and run on one instance at a time; each sweep starts from the
run store, so a missed tick is made up by the next one. Locally a model server's ready event finishes
its deployment first (job_events); the sweep is then the safety net, as it is the only way in Azure.
"""

import logging

import azure.functions as func

from shared.pipeline import get_pipeline

bp = func.Blueprint()
log = logging.getLogger("tunedrop.functions.sweeper")


@bp.timer_trigger(arg_name="timer", schedule="%TUNEDROP_SWEEP_SCHEDULE%", run_on_startup=False, use_monitor=False)
def sweeper(timer: func.TimerRequest) -> None:
    result = get_pipeline().sweep()
    if any((result.ready, result.torn_down, result.failed, result.advanced, result.errors)):
        log.info("sweep: ready=%s torn_down=%s failed=%s advanced=%s errors=%d",
                 result.ready, result.torn_down, result.failed, result.advanced, len(result.errors))
