"""Scoring latency: through the HTTP function (local host -> score -> model server) against calling
the model server directly, at concurrency 1 and 16, interleaved in one run so both see the same
machine. Trains a tiny adapter on SmolLM2 first (a few steps) so a real endpoint serves.

    .venv/bin/python bench/scoring.py [--base-model smollm2-135m-instruct] [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = {"input_data": {"input_string": [{"role": "user", "content": "What is the capital of Italy?"}],
                       "parameters": {"max_new_tokens": 8, "do_sample": False}}}


def deploy(base_model: str, state_dir: Path):
    """Azurite, the local host, and one deployed run of the sample dataset."""
    import function_app
    from shared import runs
    from shared.settings import Settings
    from shared.storage import default_storage, reset_default_storage
    from tunedrop.azurite import Azurite, free_port
    from tunedrop.host import LocalHost
    from tunedrop.local import embedded_environment

    azurite = Azurite.start()
    port = free_port()
    env = embedded_environment(azurite.connection_string, state_dir=state_dir, port=port)
    env.update({"TUNEDROP_BASE_MODEL": base_model, "TUNEDROP_IDLE_MINUTES": "600",
                "TUNEDROP_SWEEP_SCHEDULE": "*/1 * * * * *",
                "TUNEDROP_TRAINING_OVERRIDES": json.dumps({"max_steps": 4, "max_seq_length": 64})})
    os.environ.update(env)
    reset_default_storage()
    settings = Settings.from_env()
    host = LocalHost(function_app.app, environ=env, port=port, root=ROOT, state_dir=state_dir, poll_interval_s=0.3)
    host.start()
    container = default_storage().ensure_container(settings.training_container)
    sample = ROOT / "samples" / "chat-sample.jsonl"
    etag = container.get_blob_client(sample.name).upload_blob(sample.read_bytes())["etag"]
    run_id = runs.run_id_for(settings.training_container, sample.name, etag)
    store = runs.RunStore.from_settings(settings)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        run = store.find(run_id)
        if run and run.state == runs.DEPLOYED:
            return azurite, host, settings, run
        if run and run.state in (runs.FAILED, runs.REJECTED):
            raise RuntimeError(run.error)
        time.sleep(0.5)
    raise TimeoutError("no deployed endpoint within 10 minutes")


def timed(client, url: str, headers: dict) -> float:
    started = time.perf_counter()
    reply = client.post(url, json=BODY, headers=headers, timeout=120)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    return elapsed


def measure(targets: dict[str, tuple[str, dict]], concurrency: int, requests: int) -> dict[str, dict]:
    """Interleave the targets in rounds so both see the same machine state."""
    import httpx

    results = {name: [] for name in targets}
    walls = {name: 0.0 for name in targets}
    limits = httpx.Limits(max_connections=concurrency * 2)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for url, headers in targets.values():  # warm-up
            timed(client, url, headers)
        rounds = max(1, requests // concurrency)
        for _ in range(rounds):
            for name, (url, headers) in targets.items():
                started = time.perf_counter()
                results[name] += list(pool.map(lambda _, u=url, h=headers: timed(client, u, h), range(concurrency)))
                walls[name] += time.perf_counter() - started
    out = {}
    for name, samples in results.items():
        samples.sort()
        out[name] = {"p50_ms": statistics.median(samples) * 1000,
                     "p95_ms": samples[int(0.95 * (len(samples) - 1))] * 1000,
                     "rps": len(samples) / walls[name], "n": len(samples)}
    return out


def run(base_model: str = "smollm2-135m-instruct", requests: int = 48) -> list[dict]:
    import tempfile

    from shared.backends.local import LocalBackend

    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-") as tmp:
        azurite, host, settings, run_ = deploy(base_model, Path(tmp))
        try:
            backend = LocalBackend(settings)
            target = backend.scoring_target(run_.endpoint_name)
            targets = {
                "direct to model server": (target.url, {"Authorization": f"Bearer {target.key}"}),
                "through the score function": (f"{host.base_url}/api/runs/{run_.run_id}/score",
                                               {"x-functions-key": host.function_key}),
            }
            rows = []
            for concurrency in (1, 16):
                figures = measure(targets, concurrency, requests if concurrency == 1 else requests * 4)
                direct = figures["direct to model server"]
                for name, f in figures.items():
                    rows.append({"concurrency": concurrency, "path": name, **f,
                                 "p50_added_pct": 100 * (f["p50_ms"] / direct["p50_ms"] - 1)})
            return rows
        finally:
            LocalBackend(settings).stop_all()
            host.stop()
            azurite.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    rows = run(args.base_model, args.requests)
    print(f"{'scoring':<30} {'conc':>4} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'p50 added':>10}")
    for r in rows:
        print(f"{r['path']:<30} {r['concurrency']:>4} {r['n']:>5} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['rps']:7.2f} {r['p50_added_pct']:9.1f}%")


if __name__ == "__main__":
    main()
