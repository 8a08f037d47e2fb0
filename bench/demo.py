"""End to end: the phases `tunedrop demo` reports (validate, train, register, deploy, first answer,
teardown, and wake -> first answer: a sleeping run's first 200 beside the first deploy) on
SmolLM2-135M-Instruct, as a user sees them.

    .venv/bin/python bench/demo.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-demo-") as tmp:
        done = subprocess.run([sys.executable, "-m", "tunedrop.cli", "demo"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TUNEDROP_STATE_DIR": tmp})
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        print("\n".join(lines[-20:]))
        sys.exit(done.returncode)
    start = next(i for i, line in enumerate(lines) if line.startswith("Phase"))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith("total"))
    print("\n".join(lines[start:end + 1]).rstrip())
    print(next(line for line in lines if "Fine-tuned model answers" in line).split("] ", 1)[1])


if __name__ == "__main__":
    main()
