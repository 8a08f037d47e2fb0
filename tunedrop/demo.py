"""`tunedrop demo`: the seed notebook's whole workflow, driven by events, on this machine.

It starts its own Azurite (in memory), a webhook receiver that verifies every signature, and the
local Functions host; drops the sample dataset; then only watches: every step after the drop is
done by the app's own functions, as it would be in Azure.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tunedrop.local import PROJECT_ROOT
from tunedrop.receiver import PostReceiver

#: The demo trains with the base model's own defaults (shared/model_defaults.py), as `tunedrop up` does; only
#: its clock is quicker: a fast sweeper and a short idle time, so that it also shows teardown and wake (a ready
#: deployment does not wait for the sweeper: its model server's ready event finishes it).
DEMO_IDLE_MINUTES = 0.25
DEMO_SWEEP_SCHEDULE = "*/3 * * * * *"
#: How often the demo prints a moving run's progress line.
PROGRESS_EVERY_S = 4.0

PHASES = (  # (label, from state, to state)
    ("validate + submit", "received", "submitted"),
    ("fine-tune (LoRA)", "submitted", "succeeded"),
    ("register model", "succeeded", "registered"),
    ("deploy endpoint", "registered", "deployed"),
    ("idle -> torn down", "deployed", "torn_down"),
)


class Clock:
    def __init__(self):
        self.start = time.monotonic()

    def __call__(self) -> str:
        return f"[{time.monotonic() - self.start:6.1f}s]"


class WebhookReceiver:
    """Receives the app's webhooks, verifies them with the standardwebhooks package, prints them."""

    def __init__(self, secret: str, clock: Clock):
        from standardwebhooks.webhooks import Webhook

        self.events: list[dict] = []
        self.failures = 0
        self._verifier = Webhook(secret)
        self._clock = clock
        self._post = PostReceiver(self._receive, "/tunedrop")
        self.url = self._post.url

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        try:
            payload = self._verifier.verify(body, headers)
        except Exception:
            self.failures += 1
            return 400
        self.events.append(payload)
        print(f"{self._clock()}   webhook {payload['type']:<20} signature verified", flush=True)
        return 204

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def stop(self) -> None:
        self._post.close()


def _step(clock: Clock, text: str) -> None:
    print(f"{clock()} {text}", flush=True)


_PREPARE = """
import json, sys
from pathlib import Path
from shared.backends.local.models import load_for_inference, resolve_base_model
from shared.backends.local.server import Generator
path = resolve_base_model(sys.argv[1], Path(sys.argv[2]))
model, tokenizer = load_for_inference(path)
answer = Generator(model, tokenizer, sys.argv[1]).generate(
    [{"role": "user", "content": sys.argv[3]}], {"max_new_tokens": 60, "do_sample": False})
print(json.dumps(answer["text"]))
"""


def _prepare_model(base_model: str, cache_dir: Path, prompt: str) -> tuple[float, str]:
    """Convert the gguf once into the cache and ask the base model the demo's question, for contrast.

    In a child process: the demo itself (and the host it runs) stays free of torch.
    """
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _PREPARE, base_model, str(cache_dir), prompt], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if done.returncode != 0:
        raise RuntimeError(f"preparing {base_model} failed:\n{done.stderr[-2000:]}")
    return time.monotonic() - started, json.loads(done.stdout.strip().splitlines()[-1])


def run_demo(*, dataset: Path, prompt: str, base_model: str = "smollm2-135m-instruct", timeout_s: float = 900,
             verbose: bool = False, state_dir: Path | None = None) -> int:

    from shared import runs
    from shared.pipeline.gate import describe as describe_gate
    from shared.settings import Settings
    from shared.storage import reset_default_storage
    from shared.webhooks import new_secret
    from tunedrop.azurite import Azurite, free_port
    from tunedrop.client import ApiClient, ApiError
    from tunedrop.host import LocalHost, load_app
    from tunedrop.local import embedded_environment

    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    clock = Clock()
    state_dir = (state_dir or PROJECT_ROOT / ".tunedrop" / "demo").resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    print("tunedrop demo: the seed notebook's fine-tuning workflow, driven by events, on this machine.\n", flush=True)
    azurite = host = receiver = settings = None
    failed = True
    entered: dict[str, float] = {}
    answer_s = None
    wake_s = None
    try:
        _step(clock, "Starting Azurite (Blob, Queue, Table) in memory")
        azurite = Azurite.start()
        secret = new_secret()
        receiver = WebhookReceiver(secret, clock)
        port = free_port()
        env = embedded_environment(azurite.connection_string, state_dir=state_dir, port=port)
        env.update({
            "TUNEDROP_BASE_MODEL": base_model,
            "TUNEDROP_WEBHOOK_URLS": receiver.url,
            "TUNEDROP_WEBHOOK_SECRET": secret,
            "TUNEDROP_IDLE_MINUTES": str(DEMO_IDLE_MINUTES),
            "TUNEDROP_SWEEP_SCHEDULE": DEMO_SWEEP_SCHEDULE,
        })
        os.environ.update(env)
        reset_default_storage()
        settings = Settings.from_env()

        _step(clock, f"Preparing base model {base_model} (converted from gguf once, then loaded from the cache)")
        prepare_s, base_answer = _prepare_model(base_model, settings.model_cache_dir, prompt)
        _step(clock, f"  ready in {prepare_s:.1f} s; before fine-tuning it answers {prompt!r} with {base_answer!r}")

        app = load_app("function_app", PROJECT_ROOT)  # as the Functions worker loads it
        host = LocalHost(app, environ=env, port=port, root=PROJECT_ROOT, state_dir=state_dir, poll_interval_s=0.5)
        host.start()
        _step(clock, f"Local Functions host on http://127.0.0.1:{port}: "
                     + ", ".join(f.get_function_name() for f in app.get_functions()))

        from shared.storage import default_storage

        container = default_storage().ensure_container(settings.training_container)
        with open(dataset, "rb") as handle:
            result = container.get_blob_client(dataset.name).upload_blob(handle, overwrite=True)
        run_id = runs.run_id_for(settings.training_container, dataset.name, result["etag"])
        entered["received"] = time.monotonic()
        _step(clock, f"Dropped {dataset.name} into '{settings.training_container}'  ->  run {run_id}")

        store = runs.RunStore.from_settings(settings)
        deadline = time.monotonic() + timeout_s
        seen = {"received"}
        run = None
        follower = ApiClient(f"http://127.0.0.1:{port}", key=host.function_key)
        shown = {"line": "", "at": 0.0}

        def show_progress() -> None:
            """While it trains or deploys, the run's progress line (tunedrop drop --wait's), every few seconds."""
            from shared.pipeline.progress import describe as describe_progress

            if time.monotonic() - shown["at"] < PROGRESS_EVERY_S:
                return
            try:
                line = describe_progress(follower.progress(run_id))
            except ApiError:
                return
            if line != shown["line"] and line not in tuple(runs.RunState):
                _step(clock, f"  {line}")
                shown.update(line=line, at=time.monotonic())

        def wait_until(target: str) -> runs.Run:
            nonlocal run
            while time.monotonic() < deadline:
                run = store.find(run_id)
                if run is not None:
                    for entry in run.history:
                        state = entry["state"]
                        if state not in seen:
                            seen.add(state)
                            entered[state] = time.monotonic()
                            _step(clock, f"run is {state}" + (f": {run.error}" if state in ("failed", "rejected") else ""))
                            estimate = (run.report.get("stats") or {}).get("training") if state == runs.SUBMITTED else None
                            if estimate:
                                from shared.tokens import estimate_line

                                _step(clock, f"  the report's estimate: {estimate_line(estimate)}")
                    if run.state in (runs.SUBMITTED, runs.RUNNING, runs.DEPLOYING):
                        show_progress()
                    if run.state == target:
                        return run
                    gate = run.gate or {}
                    if run.state == runs.REGISTERED and gate and not gate.get("passed") and not gate.get("forced_by"):
                        _step(clock, f"{describe_gate(gate)}; the demo deploys it anyway: tunedrop deploy --force")
                        ApiClient(f"http://127.0.0.1:{port}", key=host.function_key).deploy(run_id, force=True)
                    if run.state in (runs.FAILED, runs.REJECTED):
                        raise RuntimeError(f"run {run_id} is {run.state}: {run.error}")
                time.sleep(0.25)
            raise TimeoutError(f"run {run_id} did not reach {target} within {timeout_s:.0f} s")

        run = wait_until(runs.DEPLOYED)
        metrics = run.metrics
        if metrics:
            _step(clock, "Training metrics from MLflow: " + ", ".join(
                f"{k}={metrics[k]:.4g}" for k in ("eval_loss_initial", "eval_loss", "train_tokens_per_second",
                                                   "train_runtime_s") if isinstance(metrics.get(k), (int, float))))
        _step(clock, describe_gate(run.gate).capitalize())
        _step(clock, f"Model {run.model_name} v{run.model_version} registered; endpoint {run.endpoint_name} ready")

        client = ApiClient(f"http://127.0.0.1:{port}", key=host.function_key)
        _step(clock, f"Scoring through the HTTP function: {prompt!r}")
        started = time.monotonic()
        answer = client.score(run_id, [{"role": "user", "content": prompt}], temperature=0.0, do_sample=False,
                              max_new_tokens=60)
        answer_s = time.monotonic() - started
        _step(clock, f"Fine-tuned model answers ({answer_s:.1f} s): {answer.get('output', answer)!r}")

        _step(clock, f"Waiting for the sweeper to tear the idle endpoint down (idle > {DEMO_IDLE_MINUTES * 60:.0f} s)")
        wait_until(runs.TORN_DOWN)
        webhook_deadline = time.monotonic() + 30
        while "endpoint.torn_down" not in receiver.types() and time.monotonic() < webhook_deadline:
            time.sleep(0.2)
        failed = "endpoint.torn_down" not in receiver.types()
        if failed:
            _step(clock, "the endpoint.torn_down webhook never arrived")
        else:
            # Asleep, not dead: the next request wakes it (503 + Retry-After while a new endpoint deploys).
            _step(clock, "Asking the sleeping run again: the request wakes it")
            woke = time.monotonic()
            again = None
            while again is None and time.monotonic() < deadline:
                try:
                    again = client.score(run_id, [{"role": "user", "content": prompt}], temperature=0.0,
                                         do_sample=False, max_new_tokens=60)
                except ApiError as exc:
                    if exc.status != 503:
                        raise
                    time.sleep(1.0)  # the API says Retry-After: 30; a demo looks more often
            if again is None:
                raise TimeoutError(f"run {run_id} did not wake within {timeout_s:.0f} s")
            wake_s = time.monotonic() - woke
            same = again.get("output") == answer.get("output")
            _step(clock, f"Woken model answers {wake_s:.1f} s after the first request: {again.get('output')!r}"
                  + (" (the same answer as before it slept)" if same else " (NOT the answer it gave before!)"))
            failed = not same
            client.undeploy(run_id)
            _step(clock, "`tunedrop undeploy`: asleep again, its model still registered")
    except Exception as exc:  # the demo's own boundary: say what broke, exit non-zero
        _step(clock, f"FAILED: {type(exc).__name__}: {exc}")
        failed = True
    finally:
        if host is not None:
            host.stop()
        if settings is not None:
            from shared.backends.local import LocalBackend

            LocalBackend(settings).stop_all()  # anything a failure mid-way left running
        if receiver is not None:
            receiver.stop()
        if azurite is not None:
            azurite.stop()

    print("\nPhase                    seconds", flush=True)
    for label, start, end in PHASES:
        if start in entered and end in entered:
            print(f"  {label:<22} {entered[end] - entered[start]:7.1f}")
    if answer_s is not None:
        print(f"  {'first answer':<22} {answer_s:7.1f}")
    if wake_s is not None:
        print(f"  {'wake -> first answer':<22} {wake_s:7.1f}")
    total = time.monotonic() - clock.start
    print(f"  {'total':<22} {total:7.1f}")
    if receiver is not None:
        print(f"\nWebhooks received and verified: {len(receiver.events)} ({', '.join(receiver.types())}); "
              f"signature failures: {receiver.failures}")
    print("\nDemo " + ("FAILED" if failed else "succeeded: endpoint torn down, nothing left running."), flush=True)
    return 1 if failed else 0

