"""The local backend, the embedded default: real LoRA fine-tunes and model servers on this machine.

A job is a trainer process (``python -m shared.backends.local.trainer``) in its own session, never
run inside a function call; it logs to MLflow and reports its lifecycle as Azure ML's Event Grid
events. An endpoint is a model-server process (``python -m shared.backends.local.server``) with
its own port and key; once it serves it writes ``ready`` to its state file and posts a "deployment
ready" event to the events URL, so the run is finished at once rather than at the next sweep. Everything
lives under the state dir:

    jobs/<job>/       job.json, status.json (written by the trainer), train.log
    endpoints/<ep>/   endpoint.json, key (0600), state.json (written by the server), server.log
    mlflow.db, mlartifacts/
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.backends.base import (
    DEPLOY_CREATING,
    DEPLOY_FAILED,
    DEPLOY_MISSING,
    DEPLOY_READY,
    BackendError,
    DeploymentInfo,
    JobInfo,
    ModelRef,
    ScoringTarget,
    endpoint_name_for,
    job_name_for,
)
from shared.backends.local.job_data import LIMIT_SETTINGS
from shared.events import RUN_ID_TAG
from shared.status import JobStatus

log = logging.getLogger("tunedrop.backends.local")

PROJECT_ROOT = Path(__file__).resolve().parents[3]
EXPERIMENT = "tunedrop"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def _started(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot, /proc/<pid>/stat field 22), or None where
    it cannot be read. A pid and this tell one process from a later one given the same pid: pids are reused
    (this machine's pid_max is 32768), and a pid file outlives its process (a crash, a reboot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, started: str | None = None) -> bool:
    """Whether process ``pid`` runs, and is the one that started at ``started`` when that is known."""
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own exited children (else they linger as zombies)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but is it the recorded one?
        pass
    return started is None or _started(pid) in (None, started)


def _terminate(pid: int | None, grace_s: float = 10.0, started: str | None = None) -> None:
    """SIGTERM the process group of ``pid`` (the process it recorded, never a later one with its pid), then
    SIGKILL if it lingers past ``grace_s``."""
    if not _alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _recorded(record: dict) -> tuple[int | None, str | None]:
    """(pid, start time) of a process as a pid file records it."""
    return record.get("pid"), record.get("started")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(module: str, args: list[str], log_path: Path) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,  # outlives the function invocation, killable as a group
        )
    return process.pid


class LocalBackend:
    name = "local"

    def __init__(self, settings):
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.jobs_dir = self.state_dir / "jobs"
        self.endpoints_dir = self.state_dir / "endpoints"
        self.logs_dir = self.state_dir / "logs"  # a deleted endpoint's server log, kept for the run's error

    # ---- jobs -------------------------------------------------------------------------------

    def check_base_model(self, name: str) -> None:
        from shared.backends.local.models import CHOICES

        if name not in CHOICES:
            raise BackendError(f"base_model {name!r} is not a local model: use one of {', '.join(CHOICES)}.",
                               code="unknown_base_model")

    def submit_finetune(self, run, config) -> str:
        job_name = job_name_for(run.run_id, run.retries)
        job_dir = self.jobs_dir / job_name
        job_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(job_dir / ".lock"):
            status = _read_json(job_dir / "status.json")
            if status.get("state") in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED) \
                    or _alive(*_recorded(_read_json(job_dir / "pid.json"))):
                log.info("job %s already exists (%s), not submitting again", job_name, status.get("state", "starting"))
                return job_name
            spec = {
                "job_name": job_name,
                "run_id": run.run_id,
                "experiment_name": EXPERIMENT,
                "base_model": run.base_model or self.settings.effective_base_model,
                "model_cache_dir": str(Path(self.settings.model_cache_dir).expanduser().resolve()),
                "dataset": {"container": run.dataset_container, "blob": run.dataset_blob, "etag": run.dataset_etag,
                            **({"test": {"blob": run.test_blob, "etag": run.test_etag}} if run.test_blob else {})},
                "config": config.to_dict(),
                "tracking_uri": self.settings.effective_tracking_uri,
                "events_url": self.settings.events_url or None,
                "workspace_id": self.settings.workspace_id,
                # the dataset limits this app's settings set, whatever the trainer's environment says
                "limits": {name: getattr(self.settings, name) for name in LIMIT_SETTINGS},
                "workers": self.settings.local_train_workers,
            }
            _write_json(job_dir / "job.json", spec)
            pid = _spawn("shared.backends.local.trainer", [str(job_dir)], job_dir / "train.log")
            _write_json(job_dir / "pid.json", {"pid": pid, "started": _started(pid)})
        log.info("job %s submitted (trainer pid %d)", job_name, pid)
        return job_name

    def get_job(self, job_name: str) -> JobInfo:
        job_dir = self.jobs_dir / job_name
        if not (job_dir / "job.json").exists():
            return JobInfo(job_name, JobStatus.NOT_FOUND, error="No such job.")
        status = _read_json(job_dir / "status.json")
        state = status.get("state")
        if state in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
            return JobInfo(job_name, state, error=status.get("error", ""), metrics=status.get("metrics", {}))
        if not _alive(*_recorded(_read_json(job_dir / "pid.json"))):
            return JobInfo(job_name, JobStatus.FAILED,
                           error=f"Trainer process exited without a result; see {job_dir / 'train.log'}.")
        return JobInfo(job_name, JobStatus.RUNNING, metrics=status.get("metrics", {}))

    def job_progress(self, job_name: str) -> dict:
        """The trainer's ``progress.json``: phase, step of total_steps, loss so far and each step's, time left."""
        return _read_json(self.jobs_dir / job_name / "progress.json")

    def cancel_job(self, job_name: str) -> None:
        """SIGTERM the trainer (it records Canceled and ends its MLflow run); SIGKILL if it lingers."""
        pid, started = _recorded(_read_json(self.jobs_dir / job_name / "pid.json"))
        if _alive(pid, started):
            log.info("job %s: stopping its trainer (pid %d)", job_name, pid)
            threading.Thread(target=_terminate, args=(pid,), kwargs={"started": started},
                             daemon=True).start()  # never wait on the grace period

    # ---- model registry (MLflow) --------------------------------------------------------------

    def _mlflow(self):
        from mlflow import MlflowClient

        # A client of its own: mlflow.set_tracking_uri() would also set MLFLOW_TRACKING_URI in this
        # process's environment, where the app's settings would then read it.
        uri = self.settings.effective_tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register_model(self, run) -> ModelRef:
        from mlflow.exceptions import MlflowException

        status = _read_json(self.jobs_dir / run.job_name / "status.json")
        mlflow_run_id = status.get("mlflow_run_id")
        if status.get("state") != JobStatus.COMPLETED or not mlflow_run_id:
            raise BackendError(f"Job {run.job_name} has no completed model to register.", code="job_not_completed")
        name = self.settings.model_name_for(run.base_model)
        client = self._mlflow()
        with _file_lock(self.state_dir / "registry.lock"):
            existing = client.search_model_versions(f"name = '{name}' and tags.{RUN_ID_TAG} = '{run.run_id}'")
            if existing:
                return ModelRef(name, str(existing[0].version))
            try:
                client.create_registered_model(name, description="Fine-tuned by tunedrop from dropped chat datasets.")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{client.get_run(mlflow_run_id).info.artifact_uri}/model"
            version = client.create_model_version(
                name,
                source,
                run_id=mlflow_run_id,
                tags={
                    RUN_ID_TAG: run.run_id,
                    "job_name": run.job_name,
                    "dataset_container": run.dataset_container,
                    "dataset_blob": run.dataset_blob,
                    "dataset_etag": run.dataset_etag,
                    "base_model": run.base_model,
                },
                description=(
                    f"{run.base_model} fine-tuned on {run.dataset_container}/{run.dataset_blob} "
                    f"(ETag {run.dataset_etag}) by job {run.job_name} for tunedrop run {run.run_id}."
                ),
            )
        return ModelRef(name, str(version.version))

    # ---- endpoints ----------------------------------------------------------------------------

    def begin_deploy(self, run, model: ModelRef) -> str:
        endpoint = endpoint_name_for(run.run_id, run.cycle)
        ep_dir = self.endpoints_dir / endpoint
        ep_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(ep_dir / ".lock"):
            info = _read_json(ep_dir / "endpoint.json")
            if info and _alive(*_recorded(info)):
                return endpoint
            key_file = ep_dir / "key"
            if not key_file.exists():
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_urlsafe(32))
            (ep_dir / "state.json").unlink(missing_ok=True)
            port = _free_port()
            model_uri = f"models:/{model.name}/{model.version}"
            args = ["--model-uri", model_uri, "--tracking-uri", self.settings.effective_tracking_uri,
                    "--port", str(port), "--key-file", str(key_file), "--state-file", str(ep_dir / "state.json"),
                    "--model-cache-dir", str(Path(self.settings.model_cache_dir).expanduser().resolve()),
                    # the server's limits (TUNEDROP_MAX_NEW_TOKENS ... TUNEDROP_SERVER_PREFIX_CACHE_TOKENS)
                    "--max-new-tokens", str(self.settings.max_new_tokens),
                    "--max-prompt-tokens", str(self.settings.max_prompt_tokens),
                    "--generation-timeout-s", str(self.settings.generation_timeout_s),
                    "--concurrency", str(self.settings.server_concurrency),
                    "--queue", str(self.settings.server_queue),
                    "--prefix-cache-tokens", str(self.settings.server_prefix_cache_tokens)]
            if self.settings.events_url:  # it says when it is ready, so the run is finished at once (the sweep
                # is the safety net); the local host's Event Grid route takes no key, so the URL holds no secret
                args += ["--events-url", self.settings.events_url, "--endpoint-name", endpoint, "--run-id", run.run_id]
            pid = _spawn("shared.backends.local.server", args, ep_dir / "server.log")
            _write_json(ep_dir / "endpoint.json", {"pid": pid, "started": _started(pid), "port": port,
                                                   "model_uri": model_uri, "run_id": run.run_id})
        log.info("endpoint %s: model server starting on port %d (pid %d)", endpoint, port, pid)
        return endpoint

    def get_deployment(self, endpoint_name: str) -> DeploymentInfo:
        ep_dir = self.endpoints_dir / endpoint_name
        info = _read_json(ep_dir / "endpoint.json")
        if not info:
            return DeploymentInfo(DEPLOY_MISSING, error="No such endpoint.")
        state = _read_json(ep_dir / "state.json")
        if state.get("state") == "failed":
            return DeploymentInfo(DEPLOY_FAILED, error=state.get("error", "model server failed"), error_code="ServerFailed")
        if not _alive(*_recorded(info)):
            return DeploymentInfo(DEPLOY_FAILED, error=f"Model server exited; see {self.kept_log(endpoint_name)}.",
                                  error_code="ServerExited")
        if state.get("state") == "ready":
            return DeploymentInfo(DEPLOY_READY)
        return DeploymentInfo(DEPLOY_CREATING)

    def activate(self, endpoint_name: str) -> None:
        """A local endpoint has one deployment, which takes all traffic once it listens."""

    def kept_log(self, endpoint_name: str) -> Path:
        """Where an endpoint's server log stays once the endpoint is deleted (a failed run's error names it)."""
        return self.logs_dir / f"{endpoint_name}.server.log"

    def delete_endpoint(self, endpoint_name: str) -> None:
        ep_dir = self.endpoints_dir / endpoint_name
        info = _read_json(ep_dir / "endpoint.json")
        pid, started = _recorded(info)
        _terminate(pid, started=started)
        if (ep_dir / "server.log").exists():
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.replace(ep_dir / "server.log", self.kept_log(endpoint_name))
        if ep_dir.exists():
            shutil.rmtree(ep_dir, ignore_errors=True)

    def stop_all(self) -> None:
        """Stop every trainer and model server under the state dir (the demo's and tests' clean-up)."""
        for pid_file in [*self.jobs_dir.glob("*/pid.json"), *self.endpoints_dir.glob("*/endpoint.json")]:
            pid, started = _recorded(_read_json(pid_file))
            _terminate(pid, grace_s=5, started=started)

    def scoring_target(self, endpoint_name: str) -> ScoringTarget:
        ep_dir = self.endpoints_dir / endpoint_name
        info = _read_json(ep_dir / "endpoint.json")
        if not info:
            raise BackendError(f"Endpoint {endpoint_name} does not exist.", code="endpoint_missing")
        return ScoringTarget(f"http://127.0.0.1:{info['port']}/score", (ep_dir / "key").read_text().strip())
