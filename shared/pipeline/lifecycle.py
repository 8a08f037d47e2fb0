"""A served model's sleep and wake: the idle timer tears a deployed run's endpoint down (it sleeps, its
model stays registered); a score request or `deploy` wakes it into a new deployment cycle; `undeploy`
puts it to sleep at once.

A cycle is recorded on the run (``cycle``, and ``"cycle": n`` on the history entry that opens it) and
each cycle deploys under an endpoint name of its own (:func:`endpoint_name_for`), so what is left of an
earlier cycle's endpoint can never be taken for the new one. The wake is the one move from `torn_down`
back to `deploying`, made only on request and ETag-conditionally: of fifty requests at once exactly one
wakes the run, the others find it waking.
"""

from __future__ import annotations

from shared import runs
from shared.backends.base import BackendError, ModelRef, endpoint_name_for
from shared.pipeline.gate import describe
from shared.pipeline.jobs import JobSteps
from shared.pipeline.steps import log
from shared.runs import Run


class LifecycleError(Exception):
    """The run cannot be deployed or put to sleep from where it is; the message names its state."""


class Lifecycle(JobSteps):
    def wake(self, run_id: str, reason: str) -> Run:
        """Begin a sleeping run's next deployment cycle (``reason``: what asked, for the record and the
        webhook); the sweeper finishes it as any deployment. A run that is not asleep is returned as it is."""
        run = self.store.get(run_id)
        if run.state != runs.TORN_DOWN:
            return run
        woken = self.store.wake(run, endpoint_name_for(run_id, run.cycle + 1))
        if woken is None:  # another request woke it first
            return self.store.get(run_id)
        self.outbox.publish(run_id, "endpoint.waking", {"state": woken.state, "endpoint_name": woken.endpoint_name,
                                                        "cycle": woken.cycle, "reason": reason},
                            sequence=len(woken.history), retry=woken.retries, cycle=woken.cycle)
        log.info("run %s: waking (cycle %d, %s) as endpoint %s", run_id, woken.cycle, reason, woken.endpoint_name)
        try:
            self.backend.begin_deploy(woken, ModelRef(woken.model_name, woken.model_version))
        except BackendError as exc:
            if exc.retryable:
                raise  # still deploying with nothing begun: the sweeper's deploy timeout, or a retry, ends it
            return self._fail(woken, str(exc), exc.code) or self.store.get(run_id)
        return woken

    def deploy(self, run_id: str, force: bool = False, by: str = "") -> Run:
        """Wake a sleeping run on purpose (`tunedrop deploy`), or deploy a model the quality gate held back
        (``force``; ``by`` says who asked, for the record). A run deploying or deployed is left as it is."""
        run = self.store.get(run_id)
        if run.state in (runs.DEPLOYING, runs.DEPLOYED):
            return run
        if run.state == runs.REGISTERED:
            gate = run.gate or {}
            if gate and not gate.get("passed") and not gate.get("forced_by"):
                if not force:
                    raise LifecycleError(f"Run {run_id} is gated ({describe(gate)}): deploy it anyway with "
                                         f"`tunedrop deploy {run_id} --force`.")
                run = self.store.update(run_id, gate={**gate, "forced_by": by or "api"})
                log.warning("run %s: gated model deployed anyway (--force, by %s)", run_id, by or "api")
            return self.advance(run)
        if run.state != runs.TORN_DOWN:
            raise LifecycleError(f"Run {run_id} is {run.state}: only a sleeping (torn_down) run can be deployed "
                                 "again" + ("; `tunedrop retry` carries a failed one on" if run.state in runs.STOPPED
                                            else "") + ".")
        return self.wake(run_id, "deploy")

    def undeploy(self, run_id: str) -> Run:
        """Put a deployed (or deploying) run to sleep now: its endpoint is deleted, its model stays; the next
        score or `deploy` wakes it. A sleeping run is left as it is."""
        run = self.store.get(run_id)
        if run.state == runs.TORN_DOWN:
            return run
        if run.state not in (runs.DEPLOYED, runs.DEPLOYING):
            raise LifecycleError(f"Run {run_id} is {run.state}: only a deployed run can be put to sleep.")
        self.backend.delete_endpoint(run.endpoint_name)
        moved = self._move(run_id, runs.TORN_DOWN, "endpoint.torn_down",
                           {"endpoint_name": run.endpoint_name, "reason": "undeploy", "cycle": run.cycle})
        return moved or self.store.get(run_id)
