"""Cold start of the Function App: `import function_app` in a fresh interpreter, best of N, and the
modules it loads, side by side with a naive app that imports azure.ai.ml and mlflow at the top
(what the seed notebook's code would do if pasted into a function).

    .venv/bin/python bench/coldstart.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "mlflow", "azure.ai.ml")

_PROBE = """
import json, sys, time
started = time.perf_counter()
{imports}
elapsed = time.perf_counter() - started
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"seconds": elapsed, "modules": len(sys.modules), "heavy": heavy}}))
"""

VARIANTS = {
    "function_app (ours)": "import function_app",
    "naive: azure.ai.ml + mlflow at import": "import azure.ai.ml, mlflow\nimport function_app",
}


def measure(imports: str, runs: int) -> dict:
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _PROBE.format(imports=imports, heavy=HEAVY)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(samples, key=lambda s: s["seconds"])
    return {"best_s": best["seconds"], "median_s": sorted(s["seconds"] for s in samples)[len(samples) // 2],
            "modules": best["modules"], "heavy": best["heavy"]}


def run(runs: int = 5) -> list[dict]:
    rows = [{"variant": name, **measure(code, runs)} for name, code in VARIANTS.items()]
    base = rows[1]["best_s"]
    for row in rows:
        row["vs_naive"] = row["best_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = run(args.runs)
    print(f"{'cold start':<40} {'best s':>8} {'median s':>9} {'modules':>8} {'x naive':>8}  heavy modules loaded")
    for r in rows:
        print(f"{r['variant']:<40} {r['best_s']:8.3f} {r['median_s']:9.3f} {r['modules']:8d} {r['vs_naive']:8.2f}  "
              f"{', '.join(r['heavy']) or '-'}")


if __name__ == "__main__":
    main()
