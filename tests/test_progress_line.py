"""The progress line `tunedrop drop --wait` and `tunedrop status` print, from the progress route's answer, and
how it is drawn: redrawn in place on a terminal, a line per phase (at most every few seconds) elsewhere."""

from __future__ import annotations

import pytest

from shared.pipeline.progress import describe
from tunedrop.client import ApiError
from tunedrop.follow import QUIET_EVERY_S, bar, follow, fraction


def test_each_phase_reads_as_people_expect():
    assert describe({"run_id": "r", "state": "validating", "validation": {"bytes": 3 * 2**20, "total_bytes": 10 * 2**20}}) \
        == "validating: 3.0 MB of 10.0 MB read"
    training = {"phase": "training", "step": 12, "total_steps": 60, "loss": 1.23456, "eta_s": 75.2}
    assert describe({"run_id": "r", "state": "running", "training": training}) == \
        "training (training): step 12/60, loss 1.235, ~1 min 15 s left"
    azure = {"phase": "running", "studio_url": "https://ml.azure.com/runs/x"}
    assert describe({"run_id": "r", "state": "running", "training": azure}) == "training (running): https://ml.azure.com/runs/x"
    assert describe({"run_id": "r", "state": "deploying", "deploy": {"elapsed_s": 7.6}}) == "deploying: 8 s so far"
    assert describe({"run_id": "r", "state": "deployed"}) == "deployed"
    assert fraction({"state": "running", "training": training}) == pytest.approx(0.2)
    assert bar(0.5, 0) == "[############............]" and bar(None, 3) == "[   =" + " " * 20 + "]"


class FakeApi:
    """The run's progress as the route would answer it, one answer a poll; 404 until the run exists."""

    def __init__(self, answers):
        self.answers = list(answers)

    def progress(self, run_id):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is None:
            raise ApiError(404, "HTTP 404: No run.")
        return {"run_id": run_id, **answer}

    def run(self, run_id):
        return {"run_id": run_id, "state": self.answers[0]["state"], "gate": {}}


def step(n):
    return {"state": "running", "training": {"phase": "training", "step": n, "total_steps": 10, "loss": 2.0, "eta_s": 10 - n}}


def test_off_a_terminal_a_line_per_phase_and_no_more_often_than_every_few_seconds():
    now = [0.0]
    printed = []
    answers = [None, {"state": "validating", "validation": {"bytes": 0, "total_bytes": 100}}, *[step(n) for n in range(1, 10)],
               {"state": "deployed"}]
    run = follow(FakeApi(answers), "r", lambda line="", nl=True: printed.append(line), interactive=False,
                 timeout_s=60, poll_s=1.0, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert run["state"] == "deployed"
    assert printed[0] == "waiting for the blob trigger" and printed[1].startswith("validating")
    steps = [line for line in printed if line.startswith("training")]
    assert steps[0].startswith("training (training): step 1/10") and len(steps) == 1 + 9 // int(QUIET_EVERY_S)
    assert printed[-1] == "deployed"


def test_on_a_terminal_the_line_is_redrawn_in_place_and_a_run_that_never_ends_times_out():
    now = [0.0]
    drawn = []
    with pytest.raises(TimeoutError, match="still running after 3 s"):
        follow(FakeApi([step(1), step(2)]), "r", lambda text="", nl=True: drawn.append(text), interactive=True,
               timeout_s=3, poll_s=1.0, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert all(text.startswith("\r[") for text in drawn[:-1]) and "step 2/10" in drawn[-2] and drawn[-1] == ""
