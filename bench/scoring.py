"""Scoring latency and requests/s at concurrency 1 and 16, interleaved in one run so every target sees the
same machine: the batching model server directly, the same through the HTTP function (local host -> score ->
model server), and the model server as it was before batching (``--turns-ref``: requests took turns, one
forward pass each; its whole ``shared/`` package at that commit, started on the same model with the same
concurrency). Trains a tiny adapter on SmolLM2 first (a few steps) so a real endpoint serves.

Then the model server's limits (issue 15), against the server as it was before them (its source at
``--baseline-ref``, one lock, no prompt check) started on the same model: how long a ~1 MB prompt
takes to be refused, and the p50 latency of a short request while a long one (512 tokens) runs.
Figures are printed, never asserted.

    .venv/bin/python bench/scoring.py [--base-model smollm2-135m-instruct] [--requests 48]
                                      [--short-requests 8] [--baseline-ref 69dec77] [--turns-ref cce88a3]
                                      [--limits-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = {"input_data": {"input_string": [{"role": "user", "content": "What is the capital of Italy?"}],
                       "parameters": {"max_new_tokens": 8, "do_sample": False}}}
#: What the throughput rounds ask: a different question each (as users send), through the same chat template.
COUNTRIES = ["Italy", "France", "Spain", "Norway", "Japan", "Chile", "Kenya", "Canada", "Egypt", "Peru", "India",
             "Poland", "Ghana", "Nepal", "Cuba", "Iran", "Mali"]


def body(i: int) -> dict:
    return {"input_data": {"input_string": [{"role": "user", "content": f"What is the capital of {COUNTRIES[i % 17]}? "
                                             f"(request {i})"}],
                           "parameters": {"max_new_tokens": 8, "do_sample": False}}}
LONG = {"input_data": {"input_string": [{"role": "user", "content": "Write a very long story about a dragon."}],
                       "parameters": {"max_new_tokens": 512, "do_sample": False}}}
#: ~1 MB of prompt, under the 1 MB body limit: the user's report (issue 15).
HUGE = {"input_data": {"input_string": [{"role": "user", "content": "tell me more " * 80_000}],
                       "parameters": {"max_new_tokens": 50}}}
#: The last commit whose model server had no limits (one lock, prompts unchecked, max_new_tokens clamped).
BASELINE_REF = "69dec77"
#: The last commit whose model server generated requests taking turns (no batching): issue 18's baseline.
TURNS_REF = "cce88a3"


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


def timed(client, url: str, headers: dict, i: int = 0) -> float:
    started = time.perf_counter()
    reply = client.post(url, json=body(i), headers=headers, timeout=120)
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
        for r in range(rounds):
            asked = range(r * concurrency, (r + 1) * concurrency)  # the same questions for every target
            for name, (url, headers) in targets.items():
                started = time.perf_counter()
                results[name] += list(pool.map(lambda i, u=url, h=headers: timed(client, u, h, i), asked))
                walls[name] += time.perf_counter() - started
    out = {}
    for name, samples in results.items():
        samples.sort()
        out[name] = {"p50_ms": statistics.median(samples) * 1000,
                     "p95_ms": samples[int(0.95 * (len(samples) - 1))] * 1000,
                     "rps": len(samples) / walls[name], "n": len(samples)}
    return out


def _server_args(settings, endpoint_name: str, state: Path) -> tuple[list[str], Path]:
    """The model server's arguments for the deployed endpoint's model and key (its port chosen here)."""
    from tunedrop.azurite import free_port

    ep_dir = Path(settings.state_dir).resolve() / "endpoints" / endpoint_name
    info, port = json.loads((ep_dir / "endpoint.json").read_text()), free_port()
    return ["--model-uri", info["model_uri"], "--tracking-uri", settings.effective_tracking_uri, "--port", str(port),
            "--key-file", str(ep_dir / "key"), "--state-file", str(state),
            "--model-cache-dir", str(Path(settings.model_cache_dir).expanduser())], port


def _launch(command: list[str], cwd: Path, pythonpath: Path, state: Path, log_path: Path, port: int, what: str):
    """Starts a baseline server and waits for its state file to say ready: (process, url) or None."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text()).get("state") == "ready":
            return process, f"http://127.0.0.1:{port}/score"
        time.sleep(0.2)
    process.kill()
    print(f"no baseline: {what} did not start (see {log_path})", file=sys.stderr)
    return None


def start_baseline(ref: str, settings, endpoint_name: str, workdir: Path):
    """The model server as it was at ``ref`` (its server.py alone, over today's package), on the endpoint's model
    and key; (process, url) or None."""
    try:
        source = subprocess.run(["git", "show", f"{ref}:shared/backends/local/server.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline: {ref}'s server.py cannot be read ({exc})", file=sys.stderr)
        return None
    script, state = workdir / "server_baseline.py", workdir / "baseline.state.json"
    script.write_text(source)
    args, port = _server_args(settings, endpoint_name, state)
    return _launch([sys.executable, str(script), *args], ROOT, ROOT, state, workdir / "baseline.log", port,
                   f"{ref}'s server")


def start_at_ref(ref: str, settings, endpoint_name: str, workdir: Path):
    """The model server of commit ``ref`` (its whole ``shared/`` package) on the endpoint's model, key and limits;
    (process, url) or None."""
    tree = workdir / f"shared-{ref}"
    tree.mkdir()
    try:
        archive = subprocess.run(["git", "archive", ref, "shared"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline: {ref}'s shared/ cannot be read ({exc})", file=sys.stderr)
        return None
    state = workdir / f"{ref}.state.json"
    args, port = _server_args(settings, endpoint_name, state)
    limits = ["--concurrency", str(settings.server_concurrency), "--queue", str(settings.server_queue)]
    return _launch([sys.executable, "-m", "shared.backends.local.server", *args, *limits], tree, tree, state,
                   workdir / f"{ref}.log", port, f"{ref}'s server")


def limit_figures(url: str, key: str, short_requests: int, huge_timeout_s: float = 30) -> dict:
    """Seconds to refuse ~1 MB of prompt; p50/max latency of short requests while a long one always runs."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    out: dict = {}
    stop = threading.Event()
    long_runs: list[float] = []

    def keep_one_long_running():
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.post(url, json=LONG, headers=headers)
                long_runs.append(time.perf_counter() - started)

    with httpx.Client(timeout=300) as client:
        client.post(url, json=BODY, headers=headers).raise_for_status()  # warm
        background = threading.Thread(target=keep_one_long_running, daemon=True)
        background.start()
        time.sleep(1.0)  # the long one is generating
        samples = []
        for _ in range(short_requests):
            started = time.perf_counter()
            client.post(url, json=BODY, headers=headers).raise_for_status()
            samples.append(time.perf_counter() - started)
        stop.set()
        background.join(600)
        out["short_p50_s"] = statistics.median(samples)
        out["short_max_s"] = max(samples)
        out["long_s"] = statistics.median(long_runs) if long_runs else float("nan")
        started = time.perf_counter()
        try:
            reply = client.post(url, json=HUGE, headers=headers, timeout=huge_timeout_s)
            out["huge"] = f"HTTP {reply.status_code} {reply.json().get('code', '')}".strip()
        except httpx.TimeoutException:
            out["huge"] = f"no answer in {huge_timeout_s:g} s (still generating)"
        out["huge_s"] = time.perf_counter() - started
    return out


def limits(settings, endpoint_name: str, short_requests: int, baseline_ref: str | None, workdir: Path) -> dict:
    from shared.backends.local import LocalBackend

    target = LocalBackend(settings).scoring_target(endpoint_name)
    figures = {"with the limits": limit_figures(target.url, target.key, short_requests)}
    baseline = start_baseline(baseline_ref, settings, endpoint_name, workdir) if baseline_ref else None
    if baseline:
        process, url = baseline
        try:
            figures[f"before ({baseline_ref})"] = limit_figures(url, target.key, short_requests)
        finally:
            process.kill()  # it may still be generating on the huge prompt: that is the defect
            process.wait()
    return figures


def run(base_model: str = "smollm2-135m-instruct", requests: int = 48, short_requests: int = 8,
        baseline_ref: str | None = BASELINE_REF, limits_only: bool = False,
        turns_ref: str | None = TURNS_REF) -> tuple[list[dict], dict]:
    import tempfile

    from shared.backends.local import LocalBackend

    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-") as tmp:
        azurite, host, settings, run_ = deploy(base_model, Path(tmp))
        before = None
        try:
            backend = LocalBackend(settings)
            target = backend.scoring_target(run_.endpoint_name)
            key = {"Authorization": f"Bearer {target.key}"}
            targets = {"model server (batching)": (target.url, key),
                       "through the score function": (f"{host.base_url}/api/runs/{run_.run_id}/score",
                                                      {"x-functions-key": host.function_key})}
            if turns_ref and not limits_only:
                before = start_at_ref(turns_ref, settings, run_.endpoint_name, Path(tmp))
                if before:
                    targets[f"server before ({turns_ref})"] = (before[1], key)
            rows = []
            for concurrency in () if limits_only else (1, 16):
                figures = measure(targets, concurrency, requests if concurrency == 1 else requests * 4)
                base = figures.get(f"server before ({turns_ref})", figures["model server (batching)"])
                for name, f in figures.items():
                    rows.append({"concurrency": concurrency, "path": name, **f,
                                 "x_rps": f["rps"] / base["rps"], "x_p50": f["p50_ms"] / base["p50_ms"]})
            if before:
                before[0].kill()
                before[0].wait()
                before = None
            return rows, limits(settings, run_.endpoint_name, short_requests, baseline_ref, Path(tmp))
        finally:
            if before:
                before[0].kill()
            LocalBackend(settings).stop_all()
            host.stop()
            azurite.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--short-requests", type=int, default=8, help="short requests sent while a long one runs")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the server before its limits; '' none")
    parser.add_argument("--turns-ref", default=TURNS_REF, help="git ref of the server before batching; '' none")
    parser.add_argument("--limits-only", action="store_true", help="only the model server's limits")
    args = parser.parse_args()
    rows, limit_rows = run(args.base_model, args.requests, args.short_requests, args.baseline_ref or None,
                           args.limits_only, args.turns_ref or None)
    if rows:
        print(f"{'8 tokens, a question each':<32} {'conc':>4} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} "
              f"{'x req/s':>8} {'x p50':>6}   (x: against the server before batching, same concurrency)")
    for r in rows:
        print(f"{r['path']:<32} {r['concurrency']:>4} {r['n']:>5} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['rps']:7.2f} {r['x_rps']:8.2f} {r['x_p50']:6.2f}")
    print(f"\n{'model server':<24} {'~1 MB prompt':<44} {'short p50 s':>11} {'short max s':>11} {'long s':>7}"
          "   (short: 8 tokens, sent while a 512-token request runs)")
    for name, f in limit_rows.items():
        huge = f"{f['huge']} in {f['huge_s']:.3f} s"
        print(f"{name:<24} {huge:<44} {f['short_p50_s']:11.2f} {f['short_max_s']:11.2f} {f['long_s']:7.1f}")


if __name__ == "__main__":
    main()
