"""How fast this machine fine-tunes each local base model, measured by the jobs themselves: the figures behind
the validation report's training estimate, so that it says what a run here will take, not a typical figure.

Each completed local job records its training throughput (tokens/s in the optimisation loop) and its fixed
cost (loading the model, the two evaluations, saving: the job's wall time less its training time) in
``throughput.json`` in the model cache, per base model. A new figure within DRIFT of the cached one is
averaged in; further off (another machine, other threads, a new version), it replaces it. Read by ingest,
written by the trainer (atomically, under a file lock); a missing or broken file means "not measured yet".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILE = "throughput.json"
#: A measurement this far from the cached figure replaces it instead of being averaged in.
DRIFT = 0.3


def _path(cache_dir: Path | str) -> Path:
    return Path(cache_dir).expanduser() / FILE


def measured(cache_dir: Path | str | None, base_model: str) -> dict[str, Any] | None:
    """The cached figures for ``base_model``: tokens_per_s, overhead_s, runs, measured_at; None if none."""
    if not cache_dir:
        return None
    try:
        figures = json.loads(_path(cache_dir).read_text()).get(base_model)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(figures, dict) or not isinstance(figures.get("tokens_per_s"), (int, float)) \
            or figures["tokens_per_s"] <= 0:
        return None
    return figures


def record(cache_dir: Path | str, base_model: str, tokens_per_s: float, overhead_s: float) -> dict[str, Any]:
    """Fold one job's figures into the cache; returns what is cached now."""
    path = _path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            everything = json.loads(path.read_text())
        except (OSError, ValueError):
            everything = {}
        if not isinstance(everything, dict):
            everything = {}
        old = measured(cache_dir, base_model)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if old and abs(tokens_per_s - old["tokens_per_s"]) <= DRIFT * old["tokens_per_s"]:
            runs = int(old.get("runs", 1))
            new = {"tokens_per_s": (old["tokens_per_s"] * runs + tokens_per_s) / (runs + 1),
                   "overhead_s": (float(old.get("overhead_s", overhead_s)) * runs + overhead_s) / (runs + 1),
                   "runs": runs + 1, "measured_at": now}
        else:  # the first, or the machine changed: start again from this job
            new = {"tokens_per_s": tokens_per_s, "overhead_s": overhead_s, "runs": 1, "measured_at": now}
        everything[base_model] = {k: round(v, 2) if isinstance(v, float) else v for k, v in new.items()}
        tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(everything, indent=2) + "\n")
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_UN)
    return everything[base_model]
