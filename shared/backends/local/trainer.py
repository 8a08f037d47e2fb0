"""The local backend's fine-tune job: ``python -m shared.backends.local.trainer JOB_DIR``.

``JOB_DIR/job.json``::

    {"job_name", "run_id" (tunedrop's), "experiment_name", "base_model", "model_cache_dir",
     "dataset": {"container", "blob", "etag" (or null), optional "test": {"blob", "etag"}},
     "config": TrainingConfig.to_dict(),
     "tracking_uri", "events_url" (or null), "workspace_id",
     optional "artifact_location" (for a new experiment; default: mlartifacts/ beside a SQLite
     database), optional "events_attempts" (default 5),
     optional "limits": {"max_eval_examples", "max_dataset_bytes", ...} (default: the settings in
     the environment the backend spawned it with), optional "workers" (a step's micro-batches computed side
     by side, workers.py; 0 or absent: one per core)}

The job reports as an Azure ML job does: ``JOB_DIR/status.json`` (Running, then Completed,
Failed or Canceled on SIGTERM) and Azure ML-shaped run events posted to ``events_url``. It
downloads the dataset blob version (``TUNEDROP_STORAGE``), reads it within the dataset limits,
splits it (or takes a pair's test half as given), applies LoRA to the base
model and trains with a plain torch loop (loss on assistant tokens only), logs params, per-step
metrics and the resulting model (artifact path ``model``, an MLflow model with an MLmodel file)
to MLflow. Exit code 0 when completed, 1 otherwise.

It evaluates at most ``max_eval_examples`` held-out examples, the seeded sample the Azure ML split
writer writes as the test file (shared/split.py), and logs how many of how many (params
``test_examples``, ``eval_examples``, ``eval_sampled``, ``max_eval_examples``). With ``max_steps``
it tokenises a seeded sample of the training examples those steps can use, not all of them.

The job's pieces live beside it: job_data.py (the dataset limits, the data read within them),
examples.py (conversations to token ids and batches), steps.py (the step maths: schedule, loss,
evaluation) and reporting.py (log, status file, events).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from shared.backends.local.examples import collate, encode_conversation, length_grouped_batches
from shared.backends.local.job_data import Data, job_limits, load_data
from shared.backends.local.reporting import Progress, log, now, post_event, write_json_atomic
from shared.backends.local.steps import adamw, evaluate, lr_factor, use_bf16
from shared.backends.local.workers import StepWorkers, plan
from shared.events import RUN_ID_TAG, run_event
from shared.throughput import record
from shared.training import TrainingConfig

#: When this process started its work (before torch is imported): a job's wall time counts from here.
PROCESS_STARTED = time.monotonic()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_ARTIFACT_PATH = "model"
MODEL_INFO_FILE = "tunedrop_model.json"


class JobCanceled(Exception):
    """The job received SIGTERM."""


# -- the job -----------------------------------------------------------------------------------


class Job:
    def __init__(self, job_dir: Path):
        self.dir = job_dir
        self.spec = json.loads((job_dir / "job.json").read_text())
        self.status_path = job_dir / "status.json"
        self.started_at = now()
        self.mlflow_run_id: str | None = None
        self._poster: threading.Thread | None = None
        self.progress = Progress(job_dir / "progress.json")
        self.workers: StepWorkers | None = None

    def status(self, state: str, **fields: Any) -> None:
        write_json_atomic(
            self.status_path, {"state": state, "pid": os.getpid(), "started_at": self.started_at, **fields}
        )

    def event(self, status: str, run_properties: dict[str, str] | None = None, wait: bool = True) -> None:
        """Post a run event; ``wait=False`` posts in the background (joined before the next event)."""
        spec = self.spec
        if self._poster is not None:
            self._poster.join()
            self._poster = None
        event = run_event(
            status=status,
            topic=spec.get("workspace_id", ""),
            job_name=spec["job_name"],
            experiment_name=spec["experiment_name"],
            run_tags={RUN_ID_TAG: spec["run_id"]},
            run_properties=run_properties,
        )
        attempts = int(spec.get("events_attempts") or 5)
        if wait:
            post_event(spec.get("events_url"), event, attempts=attempts)
        else:
            self._poster = threading.Thread(
                target=post_event, args=(spec.get("events_url"), event), kwargs={"attempts": attempts}, daemon=True
            )
            self._poster.start()

    def run(self) -> int:
        self.status("Running")
        self.event("Running", wait=False)  # training need not wait for an unreachable host
        try:
            metrics = self.train()
        except BaseException as exc:
            canceled = isinstance(exc, (JobCanceled, KeyboardInterrupt))
            state = "Canceled" if canceled else "Failed"
            message = "canceled" if canceled else one_line(exc)
            if not canceled:
                traceback.print_exc(file=sys.stderr)
            log(f"job {state.lower()}: {message}")
            self._end_mlflow("KILLED" if canceled else "FAILED")
            self.status(state, error=message, mlflow_run_id=self.mlflow_run_id, ended_at=now())
            self.event(state, {"mlflow_run_id": self.mlflow_run_id} if self.mlflow_run_id else None)
            return 1
        self._record_throughput(metrics)
        self.status("Completed", mlflow_run_id=self.mlflow_run_id, metrics=metrics, ended_at=now())
        self.event("Completed", {"mlflow_run_id": self.mlflow_run_id})
        log(f"job completed: mlflow run {self.mlflow_run_id}")
        return 0

    def _record_throughput(self, metrics: dict[str, Any]) -> None:
        """This machine's figures for the next estimates (shared/throughput.py): the loop's tokens/s, and the rest
        of the job's wall time since it was submitted (start-up, imports, loading, evaluations, saving). Best
        effort: never fails the job."""
        trained, counted = metrics.get("train_runtime_s"), getattr(self, "counted_tokens", None)
        if not trained or not counted or self.spec.get("record_throughput") is False:  # a benchmark's job: not
            return  # the user's workload, so not the figure their next estimate should use
        rate = counted / trained  # in the estimate's own tokens: what the next estimate divides by
        try:
            # From the job's submission (its job.json), so that the process's start-up and imports count too
            submitted = (self.dir / "job.json").stat().st_mtime
            wall = max(time.time() - submitted, time.monotonic() - PROCESS_STARTED)
            cached = record(self.spec.get("model_cache_dir") or Path.home() / ".cache" / "tunedrop",
                            self.spec["base_model"], float(rate), max(0.0, wall - trained))
            log(f"throughput here: {cached['tokens_per_s']:.0f} tokens/s, {cached['overhead_s']:.0f} s overhead "
                f"({cached['runs']} run(s))")
        except OSError as exc:
            log(f"throughput not recorded: {exc}")

    def _counted_as_estimated(self, config: TrainingConfig, rows: list, steps: int) -> float | None:
        """The tokens this job trained, counted as the validation report counts them (message contents with the
        validator's tokenizer and overheads, each example cut to max_seq_length), so that the throughput it
        records is in the estimate's own units: the chat template's own tokens (SmolLM2's adds a default
        system prompt) are then part of the rate, not missing from the estimate."""
        from shared.datasets.token_count import TokenCounter
        from shared.tokens import find_tokenizer

        counting = find_tokenizer(self.spec["base_model"], self.spec.get("model_cache_dir"))
        if counting is None or not rows:
            return None
        counter = TokenCounter(counting, config.max_seq_length)
        for index, conversation in enumerate(rows):
            messages = conversation.get("messages", []) if isinstance(conversation, dict) else conversation
            counter.add(index, [str(m.get("content", "")) for m in messages if isinstance(m, dict)])
        examples = steps * config.per_device_train_batch_size * config.gradient_accumulation_steps
        return counter.kept_so_far() / len(rows) * min(examples, len(rows) * config.num_train_epochs)

    def _end_mlflow(self, status: str) -> None:
        if "mlflow" in sys.modules and self.mlflow_run_id:
            try:
                sys.modules["mlflow"].end_run(status=status)
            except Exception:
                pass

    def train(self) -> dict[str, Any]:
        """Load the data, build the model, run the loop, save: the local counterpart of the pipeline job."""
        config = TrainingConfig().with_overrides(self.spec.get("config") or {}, source="job config")
        self.progress.update("loading")
        data = load_data(self.spec, self.dir, config, job_limits(self.spec))
        model, tokenizer, train_set, test_set = self._build(config, data.train, data.evaluated)
        try:
            metrics = self._loop(config, model, tokenizer, train_set, test_set, data)
        finally:
            if self.workers is not None:
                self.workers.close()
        self.progress.update("saving")
        self._save(config, model, tokenizer)
        self.counted_tokens = self._counted_as_estimated(config, data.train, metrics.get("train_steps", 0))
        self.progress.update("done", eval_loss=metrics.get("eval_loss"))
        log(f"train_runtime_s {metrics['train_runtime_s']:.1f} "
            f"train_tokens_per_second {metrics['train_tokens_per_second']:.0f}")
        return metrics

    def _build(self, config: TrainingConfig, train_rows: list, test_rows: list):
        """(model with LoRA adapters when asked, tokenizer, encoded train set, encoded test set)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import torch

        from shared.backends.local.models import resolve_base_model
        from shared.model_cache import MARKER

        torch.set_num_threads(os.cpu_count() or 1)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        cache_dir = self.spec.get("model_cache_dir") or str(Path.home() / ".cache" / "tunedrop")
        if not (Path(cache_dir) / self.spec["base_model"] / MARKER).exists():  # its first use on this machine
            self.progress.update("converting base model, first use only")
        base_dir = resolve_base_model(self.spec["base_model"], Path(cache_dir))
        self.progress.update("loading")
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        train_set = [e for e in (encode_conversation(tokenizer, m, config.max_seq_length) for m in train_rows) if e]
        test_set = [e for e in (encode_conversation(tokenizer, m, config.max_seq_length) for m in test_rows) if e]
        if not train_set:
            raise ValueError("no training example has an assistant message within max_seq_length")

        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model.config.use_cache = False
        if config.apply_lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=config.lora_r,
                    lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    target_modules=list(LORA_TARGETS),
                    task_type="CAUSAL_LM",
                ),
            )
            from shared.backends.local.lean_lora import make_lean

            make_lean(model)
        return model, tokenizer, train_set, test_set

    def _loop(self, config: TrainingConfig, model, tokenizer, train_set: list, test_set: list,
              data: Data) -> dict[str, Any]:
        """The optimisation loop, logged to MLflow step by step; returns the run's metrics."""
        import mlflow
        import torch

        spec = self.spec
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        bf16 = use_bf16()
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in trainable)

        bs = config.per_device_train_batch_size
        accum = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(math.ceil(len(train_set) / bs) / accum)
        total_steps = steps_per_epoch * config.num_train_epochs
        if config.max_steps > 0:
            total_steps = min(total_steps, config.max_steps)
        workers, threads = plan(int(spec.get("workers") or 0), accum)
        self.workers = StepWorkers(workers, threads)
        optimizer = adamw(trainable, config.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(config.lr_scheduler_type, s, total_steps)
        )
        eval_batches = [
            collate(test_set[k : k + config.per_device_eval_batch_size], pad_id)
            for k in range(0, len(test_set), config.per_device_eval_batch_size)
        ]

        mlflow.set_tracking_uri(spec["tracking_uri"])
        mlflow.set_experiment(experiment_id=ensure_experiment(spec))
        run = mlflow.start_run(
            run_name=spec["job_name"], tags={RUN_ID_TAG: spec["run_id"], "job_name": spec["job_name"]}
        )
        self.mlflow_run_id = run.info.run_id
        mlflow.log_params(
            {
                **config.to_dict(),
                "base_model": spec["base_model"],
                "train_examples": data.train_examples,
                "train_examples_tokenised": len(train_set),
                "test_examples": data.held_out,
                "eval_examples": len(test_set),
                "eval_sampled": data.eval_sampled,
                "max_eval_examples": data.max_eval_examples,
                "trainable_parameters": n_trainable,
                "total_steps": total_steps,
                "bf16_autocast": bf16,
                "workers": workers,
                "threads_per_worker": threads,
            }
        )
        metrics: dict[str, Any] = {"train_examples": data.train_examples, "test_examples": data.held_out,
                                   "eval_examples": len(test_set)}
        self.progress.update("evaluating_base", total_steps=total_steps, step=0)
        initial = evaluate(model, eval_batches, bf16, self.workers)
        self.progress.update("training", eval_loss_initial=initial)
        if initial is not None:
            metrics["eval_loss_initial"] = initial
            mlflow.log_metric("eval_loss_initial", initial, step=0)
            log(f"eval_loss_initial {initial:.4f}")

        log(f"training {total_steps} steps, {n_trainable:,} trainable parameters, {'bf16' if bf16 else 'fp32'}, "
            f"{workers} worker(s) x {threads} thread(s)")
        model.train()
        rng = random.Random(config.seed)
        lengths = [len(ids) for ids, _ in train_set]
        step, tokens_seen, losses = 0, 0, []
        started = time.perf_counter()
        self.progress.update("training")
        for _ in range(config.num_train_epochs):
            if step >= total_steps:
                break
            # A step's examples are of similar lengths: little padding, and its workers finish together
            windows = [[collate([train_set[i] for i in group[k : k + bs]], pad_id) for k in range(0, len(group), bs)]
                       for group in length_grouped_batches(lengths, bs * accum, rng)]
            for window in windows:
                if step >= total_steps:
                    break
                step_started = time.perf_counter()
                targets = sum(b.targets for b in window)
                if not targets:
                    continue
                loss_total = self.workers.gradients(model, trainable, window, targets, bf16)
                tokens_seen += sum(b.tokens for b in window)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss_total)
                window_tokens = sum(b.tokens for b in window)
                rate = window_tokens / max(1e-9, time.perf_counter() - step_started)
                mlflow.log_metrics({"train_loss": loss_total, "learning_rate": lr}, step=step)
                spent = time.perf_counter() - started
                self.progress.update(loss_point=(step, loss_total), step=step, loss=round(loss_total, 5),
                                     tokens_per_s=round(tokens_seen / max(1e-9, spent)),
                                     eta_s=round(spent / step * (total_steps - step), 1))
                log(f"step {step}/{total_steps} loss {loss_total:.4f} lr {lr:.2e} {rate:.0f} tok/s")
        runtime = time.perf_counter() - started
        metrics.update(
            {
                "train_loss": losses[-1] if losses else None,
                "train_loss_mean": sum(losses) / len(losses) if losses else None,
                "train_steps": step,
                "train_runtime_s": runtime,
                "train_tokens": tokens_seen,
                "train_tokens_per_second": tokens_seen / runtime if runtime > 0 else 0.0,
            }
        )
        self.progress.update("evaluating", eta_s=0.0)
        final = evaluate(model, eval_batches, bf16, self.workers)
        if final is not None:
            metrics["eval_loss"] = final
            log(f"eval_loss {final:.4f}")
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in metrics.items()
                if v is not None and k not in ("eval_loss_initial", "train_loss")
            },
            step=step,
        )
        return metrics

    def _save(self, config: TrainingConfig, model, tokenizer) -> None:
        """The trained model (adapters or weights) as an MLflow model folder, logged to the run."""
        import mlflow
        from mlflow.models import Model

        out = self.dir / "model"
        out.mkdir(exist_ok=True)
        model.config.use_cache = True  # as saved for inference
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        info = {"base_model": self.spec["base_model"], "adapter": bool(config.apply_lora)}
        (out / MODEL_INFO_FILE).write_text(json.dumps(info) + "\n")
        # An MLmodel file makes the folder an MLflow model: register_model("runs:/<id>/model") accepts it.
        mlmodel = Model(artifact_path=MODEL_ARTIFACT_PATH, run_id=self.mlflow_run_id)
        mlmodel.add_flavor("tunedrop", **info)
        mlmodel.save(str(out / "MLmodel"))
        mlflow.log_artifacts(str(out), artifact_path=MODEL_ARTIFACT_PATH)
        mlflow.end_run()


def artifact_location(spec: dict[str, Any]) -> str | None:
    """Where a new experiment keeps its artifacts: ``artifact_location`` from job.json, else
    ``mlartifacts`` beside a SQLite tracking database (never ./mlruns in the working directory)."""
    if spec.get("artifact_location"):
        return str(spec["artifact_location"])
    uri = str(spec["tracking_uri"])
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_absolute():
            return (db.parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(spec: dict[str, Any]) -> str:
    """The experiment's id, creating it (with its artifact location) if it does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(spec["tracking_uri"])
    name = spec["experiment_name"]
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(spec))
    except MlflowException:  # created by a concurrent job meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}"[:500] if first else type(exc).__name__


def _on_sigterm(signum, frame):
    raise JobCanceled()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m shared.backends.local.trainer JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(args[0]).resolve()
    try:
        job = Job(job_dir)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        try:
            write_json_atomic(job_dir / "status.json", {"state": "Failed", "error": one_line(exc), "ended_at": now()})
        except OSError:
            pass
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    return job.run()


if __name__ == "__main__":
    sys.exit(main())
