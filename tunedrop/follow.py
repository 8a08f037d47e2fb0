"""Following a run from the CLI (`tunedrop drop --wait`): a progress line through validation (bytes), training
(steps, loss, time left) and deployment, redrawn in place on a terminal and printed once per change
elsewhere (logs, CI), until the run serves or stops. Errors from the API become messages in the CLI."""

from __future__ import annotations

import time
from typing import Callable

from shared import runs
from shared.pipeline.progress import describe

#: Final states, and whether the run ended well.
ENDED = {runs.DEPLOYED: True, runs.REJECTED: False, runs.FAILED: False, runs.CANCELED: False}
BAR_WIDTH = 24
#: Not on a terminal, a progress line within the same phase is printed at most this often.
QUIET_EVERY_S = 5.0


def _phase(line: str) -> str:
    return line.split(":", 1)[0]


def fraction(progress: dict) -> float | None:
    """How far the current phase is (0..1), or None where it cannot be told (deploying)."""
    validation, training = progress.get("validation"), progress.get("training") or {}
    if validation and validation.get("total_bytes"):
        return min(1.0, validation["bytes"] / validation["total_bytes"])
    if progress.get("state") in (runs.SUBMITTED, runs.RUNNING) and training.get("total_steps"):
        return min(1.0, training.get("step", 0) / training["total_steps"])
    return None


def bar(done: float | None, tick: int) -> str:
    if done is None:  # a moving block: something is happening, how much is left is unknown
        position = tick % BAR_WIDTH
        return "[" + "".join("=" if i == position else " " for i in range(BAR_WIDTH)) + "]"
    filled = int(round(done * BAR_WIDTH))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def follow(client, run_id: str, echo: Callable[..., None], *, interactive: bool, timeout_s: float,
           poll_s: float = 1.0, sleep=time.sleep, clock=time.monotonic) -> dict:
    """Poll ``run_id``'s progress until it ends (or ``timeout_s``); returns the run's last record.
    A run not there yet (its blob trigger has not fired) is waited for."""
    from tunedrop.client import ApiError

    deadline = clock() + timeout_s
    last_line, tick, shown, printed_at = "", 0, "", 0.0
    while True:
        try:
            progress = client.progress(run_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            progress = {"state": "waiting for the blob trigger"}
        line = describe(progress) if "run_id" in progress else progress["state"]
        if interactive:
            shown = f"{bar(fraction(progress), tick)} {line}"
            echo("\r" + shown.ljust(len(last_line)), nl=False)
            last_line = shown
        elif line != last_line and (_phase(line) != _phase(last_line) or clock() - printed_at >= QUIET_EVERY_S):
            echo(line)  # not a terminal (a log, CI): a line when the phase changes, else at most every few seconds
            last_line, printed_at = line, clock()
        state = progress.get("state")
        if state in ENDED or (state == runs.REGISTERED and _gated(client, run_id)):
            if interactive:
                echo("")
            return client.run(run_id)
        if clock() >= deadline:
            if interactive:
                echo("")
            raise TimeoutError(f"run {run_id} is still {state} after {timeout_s:g} s")
        tick += 1
        sleep(poll_s)


def _gated(client, run_id: str) -> bool:
    gate = client.run(run_id).get("gate") or {}
    return bool(gate) and not gate.get("passed") and not gate.get("forced_by")
