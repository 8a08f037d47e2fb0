"""Local fine-tune throughput: our trainer against TRL's SFTTrainer configured for speed on this machine
(the baseline: gradient checkpointing off, bf16 autocast exactly where ours turns it on, i.e. on CPUs with
native bf16), and TRL at its defaults for reference (gradient checkpointing on). The same conversations of
mixed lengths (1 to 10 exchanges, 30 to 500 tokens), split, sequence length 512, LoRA (r=16 on all
projections), steps of 2 examples (batch 1, gradient accumulation 2, as SmolLM2's defaults) and steps (60
by default). All are judged by the same held-out loss (on assistant tokens, computed by one function);
tokens/s counts the tokens each trained on, over its training loop. TRL for speed runs both ways a user would
ask for steps of 2 (accumulating 2 examples, and one padded batch of 2); the faster is the baseline. Ours runs
as the app runs it (a step's two examples side by side, one per core), and once more with one worker, for what
that alone moves.

    .venv/bin/python -m pip install -r requirements-bench.txt   # TRL, for the baselines only
    .venv/bin/python bench/training.py [--steps 60] [--base-model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = {"num_train_epochs": 1, "learning_rate": 2e-4, "lr_scheduler_type": "cosine", "lora_r": 16,
          "lora_alpha": 32, "max_seq_length": 512, "gradient_accumulation_steps": 2, "test_fraction": 0.15,
          "seed": 42}


def cpu_stolen():
    """(stolen, all) CPU time in jiffies so far (/proc/stat): on a virtual machine, the hypervisor's "steal" is
    time this machine's cores were not running it, which makes a run slower for no reason of its own."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def timed(row: dict, measure) -> dict:
    """``row`` with what ``measure()`` returned and the share of CPU time stolen meanwhile."""
    stolen, total = cpu_stolen()
    row.update(measure())
    stolen_after, total_after = cpu_stolen()
    row["stolen"] = (stolen_after - stolen) / max(1, total_after - total)
    return row


def conversations(count: int) -> list[list[dict]]:
    """Chats of 1 to 10 exchanges (mixed lengths, 30 to 500 tokens), built from the sample's question/answer pairs."""
    import random

    pairs = [json.loads(line)["messages"] for line in (ROOT / "samples" / "chat-sample.jsonl").read_text().splitlines()]
    draw = random.Random(7)
    return [[m for k in range(draw.randint(1, 10)) for m in pairs[(i * 5 + k) % len(pairs)]] for i in range(count)]


def ours(rows, steps: int, base_model: str, cache: Path, tmp: Path, workers: int = 0) -> dict:
    """Our trainer as the local backend runs it: its own process, the dataset read from Azurite; ``workers``
    as TUNEDROP_LOCAL_TRAIN_WORKERS (0: one per core)."""
    from shared.storage import Storage
    from tunedrop.azurite import Azurite

    azurite = Azurite.start()
    try:
        env = {**os.environ, "TUNEDROP_STORAGE": azurite.connection_string, "HF_HUB_OFFLINE": "1"}
        storage = Storage(env)
        storage.blob_service.create_container("bench")
        data = "".join(json.dumps({"messages": m}) + "\n" for m in rows).encode()
        etag = storage.blob_service.get_blob_client("bench", "bench.jsonl").upload_blob(data)["etag"]
        job = tmp / f"job-{workers}"
        job.mkdir()
        (job / "job.json").write_text(json.dumps({
            "job_name": "bench", "run_id": "bench", "experiment_name": "bench", "base_model": base_model,
            "model_cache_dir": str(cache), "dataset": {"container": "bench", "blob": "bench.jsonl", "etag": etag},
            "config": {**CONFIG, "max_steps": steps}, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "events_url": None, "workspace_id": "bench", "record_throughput": False, "workers": workers}))
        subprocess.run([sys.executable, "-m", "shared.backends.local.trainer", str(job)], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((job / "status.json").read_text())["metrics"]
        return {"tokens_per_s": metrics["train_tokens_per_second"], "eval_loss": metrics["eval_loss"],
                "eval_loss_initial": metrics["eval_loss_initial"], "runtime_s": metrics["train_runtime_s"]}
    finally:
        azurite.stop()


_TRL = r"""
import json, os, sys, time
from pathlib import Path
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from shared.backends.local.models import resolve_base_model
from shared.backends.local.examples import collate, encode_conversation
from shared.backends.local.steps import evaluate
from shared.backends.local.trainer import LORA_TARGETS
from shared.split import split_examples

spec = json.loads(Path(sys.argv[1]).read_text())
world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: one process per core, each a share of a step
torch.set_num_threads(torch.get_num_threads())
config = spec["config"]
train_rows, test_rows = split_examples(spec["rows"], config["test_fraction"], config["seed"])
base = resolve_base_model(spec["base_model"], Path(spec["cache"]))
tokenizer = AutoTokenizer.from_pretrained(str(base))
model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
speed = {"gradient_checkpointing": False, "bf16": spec["bf16"]} if spec["for_speed"] else {}
step = config["gradient_accumulation_steps"]  # examples a step: in one padded batch, or accumulated one by one
args = SFTConfig(output_dir=spec["out"], max_length=config["max_seq_length"], **speed,
                 per_device_train_batch_size=step if spec["way"] == "batched" else 1,
                 gradient_accumulation_steps=1 if spec["way"] == "batched" else step // world,
                 max_steps=spec["steps"], learning_rate=config["learning_rate"],
                 lr_scheduler_type=config["lr_scheduler_type"], logging_steps=1, save_strategy="no", report_to=[],
                 use_cpu=True, seed=config["seed"], include_num_input_tokens_seen=True)
lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], target_modules=list(LORA_TARGETS),
                  task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": m} for m in train_rows]),
                     processing_class=tokenizer, peft_config=lora)
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
eval_batches = [collate([e], pad) for e in (encode_conversation(tokenizer, m, config["max_seq_length"])
                                            for m in test_rows) if e]
initial = evaluate(trainer.model, eval_batches)
started = time.perf_counter()
trainer.train()
runtime = time.perf_counter() - started
tokens = int(trainer.state.num_input_tokens_seen)  # all processes' under torchrun
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({"tokens_per_s": tokens / runtime, "eval_loss": evaluate(trainer.model, eval_batches),
                  "eval_loss_initial": initial, "runtime_s": runtime}))
"""


def trl_baseline(rows, steps: int, base_model: str, cache: Path, tmp: Path, for_speed: bool,
                 way: str = "accumulating") -> dict:
    """TRL's SFTTrainer on the same rows, a step's examples ``way``: "accumulating" one at a time, "batched"
    in one padded batch, or "processes": one process per core under torchrun (DDP over gloo, one intra-op
    thread each, as torchrun sets), each taking its share of the step, as ours does with threads."""
    from shared.backends.local.steps import use_bf16

    spec = {"rows": rows, "steps": steps, "base_model": base_model, "cache": str(cache),
            "out": str(tmp / f"trl-{for_speed}-{way}"), "config": CONFIG, "for_speed": for_speed,
            "bf16": use_bf16(), "way": way}
    (tmp / "trl_run.py").write_text(_TRL)
    (tmp / f"trl-{for_speed}-{way}.json").write_text(json.dumps(spec))
    launch = [sys.executable] if way != "processes" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={min(2, os.cpu_count() or 1)}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*launch, str(tmp / "trl_run.py"), str(tmp / f"trl-{for_speed}-{way}.json")], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"TRL ({way}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(steps: int = 60, base_model: str = "smollm2-135m-instruct", with_defaults: bool = True,
        with_one_worker: bool = True, with_trl_batched: bool = False) -> list[dict]:
    from shared.settings import Settings

    cache = Path(Settings.from_env().model_cache_dir).expanduser()
    examples = steps * CONFIG["gradient_accumulation_steps"]
    rows = conversations(count=int(examples / (1 - CONFIG["test_fraction"])) + 4)
    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-train-") as tmp:
        here = (rows, steps, base_model, cache, Path(tmp))
        defaults = timed({"trainer": "TRL SFTTrainer, its defaults"},
                         lambda: trl_baseline(*here, for_speed=False)) if with_defaults else None
        # TRL's turns and ours alternate, so that a slower spell of the machine is less likely to favour one
        speedy = [timed({"trainer": "TRL SFTTrainer, for speed, accumulating"},
                        lambda: trl_baseline(*here, for_speed=True))]
        mine = timed({"trainer": "tunedrop trainer"}, lambda: ours(*here))
        if with_trl_batched:
            speedy.append(timed({"trainer": "TRL SFTTrainer, for speed, batch of 2"},
                                lambda: trl_baseline(*here, for_speed=True, way="batched")))
        speedy.append(timed({"trainer": "TRL SFTTrainer, for speed, a process a core"},
                            lambda: trl_baseline(*here, for_speed=True, way="processes")))
        alone = timed({"trainer": "tunedrop trainer, one worker"},
                      lambda: ours(*here, workers=1)) if with_one_worker else None
        baseline = max(speedy, key=lambda row: row["tokens_per_s"])  # the faster way is the baseline
        baseline["trainer"] += " (baseline)"
    rows = [row for row in (defaults, *speedy, alone, mine) if row]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--without-defaults", action="store_true", help="leave out TRL at its defaults (5 min)")
    parser.add_argument("--without-one-worker", action="store_true", help="leave out our trainer on one worker")
    parser.add_argument("--with-trl-batched", action="store_true",
                        help="add TRL with a padded batch of 2 (slower than accumulating here: 107 against 120 tok/s)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.steps, args.base_model, not args.without_defaults, not args.without_one_worker,
               args.with_trl_batched)
    from shared.backends.local.steps import use_bf16

    print(f"{'fine-tune, LoRA r=16, seq 512, 2 a step':<52} {'tok/s':>7} {'x base':>7} {'eval loss':>15} "
          f"{'train s':>8} {'stolen':>7}"
          f"   (bf16 autocast: {'on, native bf16' if use_bf16() else 'off, no native bf16 on this CPU'})")
    for r in rows:
        print(f"{r['trainer']:<52} {r['tokens_per_s']:7.1f} {r['speedup']:7.2f} "
              f"{r['eval_loss_initial']:6.3f} -> {r['eval_loss']:6.3f} {r['runtime_s']:8.1f} {r['stolen']:7.0%}")
    print(f"({args.steps} steps each; {time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
