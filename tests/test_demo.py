"""`tunedrop demo` as a user runs it (on the tiny model, so it takes seconds, not minutes)."""

import os
import subprocess
import sys

from tunedrop.local import PROJECT_ROOT


def test_demo_runs_the_whole_loop_and_cleans_up(model_cache, tmp_path):
    env = {**os.environ, "TUNEDROP_MODEL_CACHE": str(model_cache), "TUNEDROP_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tunedrop.cli", "demo", "--base-model", "tiny-random",
                           "--timeout", "240"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for line in ("run is submitted", "run is succeeded", "run is registered", "run is deployed",
                 "Fine-tuned model answers", "run is torn_down", "the same answer as before it slept",
                 "wake -> first answer", "Demo succeeded"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "signature failures: 0" in out and "Webhooks received and verified: 10" in out  # 8, + waking, ready
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == []  # no trainer, model server or Azurite of the demo's left running
