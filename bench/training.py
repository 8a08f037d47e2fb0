"""Local fine-tune throughput: our trainer against TRL's SFTTrainer configured for speed on this machine
(the baseline: gradient checkpointing off, bf16 autocast exactly where ours turns it on, i.e. on CPUs with
native bf16), and TRL at its defaults for reference (gradient checkpointing on). The same conversations of
mixed lengths (1 to 10 exchanges, 30 to 500 tokens), split, sequence length 512, LoRA (r=16 on all
projections), batch 1 and steps (60 by default). All are judged by the same held-out loss (on assistant
tokens, computed by one function); tokens/s counts the tokens each trained on, over its training loop.

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
          "lora_alpha": 32, "max_seq_length": 512, "test_fraction": 0.15, "seed": 42}


def conversations(count: int) -> list[list[dict]]:
    """Chats of 1 to 10 exchanges (mixed lengths, 30 to 500 tokens), built from the sample's question/answer pairs."""
    import random

    pairs = [json.loads(line)["messages"] for line in (ROOT / "samples" / "chat-sample.jsonl").read_text().splitlines()]
    draw = random.Random(7)
    return [[m for k in range(draw.randint(1, 10)) for m in pairs[(i * 5 + k) % len(pairs)]] for i in range(count)]


def ours(rows, steps: int, base_model: str, cache: Path, tmp: Path) -> dict:
    """Our trainer as the local backend runs it: its own process, the dataset read from Azurite."""
    from shared.storage import Storage
    from tunedrop.azurite import Azurite

    azurite = Azurite.start()
    try:
        env = {**os.environ, "TUNEDROP_STORAGE": azurite.connection_string, "HF_HUB_OFFLINE": "1"}
        storage = Storage(env)
        storage.blob_service.create_container("bench")
        data = "".join(json.dumps({"messages": m}) + "\n" for m in rows).encode()
        etag = storage.blob_service.get_blob_client("bench", "bench.jsonl").upload_blob(data)["etag"]
        job = tmp / "job"
        job.mkdir()
        (job / "job.json").write_text(json.dumps({
            "job_name": "bench", "run_id": "bench", "experiment_name": "bench", "base_model": base_model,
            "model_cache_dir": str(cache), "dataset": {"container": "bench", "blob": "bench.jsonl", "etag": etag},
            "config": {**CONFIG, "max_steps": steps}, "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "events_url": None, "workspace_id": "bench", "record_throughput": False}))
        subprocess.run([sys.executable, "-m", "shared.backends.local.trainer", str(job)], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((job / "status.json").read_text())["metrics"]
        return {"tokens_per_s": metrics["train_tokens_per_second"], "eval_loss": metrics["eval_loss"],
                "eval_loss_initial": metrics["eval_loss_initial"], "runtime_s": metrics["train_runtime_s"]}
    finally:
        azurite.stop()


_TRL = r"""
import json, sys, time
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

spec = json.loads(sys.argv[1])
torch.set_num_threads(torch.get_num_threads())
config = spec["config"]
train_rows, test_rows = split_examples(spec["rows"], config["test_fraction"], config["seed"])
base = resolve_base_model(spec["base_model"], Path(spec["cache"]))
tokenizer = AutoTokenizer.from_pretrained(str(base))
model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
speed = {"gradient_checkpointing": False, "bf16": spec["bf16"]} if spec["for_speed"] else {}
args = SFTConfig(output_dir=spec["out"], max_length=config["max_seq_length"], per_device_train_batch_size=1, **speed,
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
tokens = int(trainer.state.num_input_tokens_seen)
print(json.dumps({"tokens_per_s": tokens / runtime, "eval_loss": evaluate(trainer.model, eval_batches),
                  "eval_loss_initial": initial, "runtime_s": runtime}))
"""


def trl_baseline(rows, steps: int, base_model: str, cache: Path, tmp: Path, for_speed: bool) -> dict:
    from shared.backends.local.steps import use_bf16

    spec = {"rows": rows, "steps": steps, "base_model": base_model, "cache": str(cache),
            "out": str(tmp / f"trl-{for_speed}"), "config": CONFIG, "for_speed": for_speed, "bf16": use_bf16()}
    out = subprocess.run([sys.executable, "-c", _TRL, json.dumps(spec)], cwd=ROOT, check=True, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(steps: int = 60, base_model: str = "smollm2-135m-instruct", with_defaults: bool = True) -> list[dict]:
    from shared.settings import Settings

    cache = Path(Settings.from_env().model_cache_dir).expanduser()
    rows = conversations(count=int(steps / (1 - CONFIG["test_fraction"])) + 4)
    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-train-") as tmp:
        defaults = {"trainer": "TRL SFTTrainer, its defaults",
                    **trl_baseline(rows, steps, base_model, cache, Path(tmp), for_speed=False)} if with_defaults else None
        baseline = {"trainer": "TRL SFTTrainer, for speed (baseline)",
                    **trl_baseline(rows, steps, base_model, cache, Path(tmp), for_speed=True)}
        mine = {"trainer": "tunedrop trainer", **ours(rows, steps, base_model, cache, Path(tmp))}
    rows = [row for row in (defaults, baseline, mine) if row]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--without-defaults", action="store_true", help="leave out TRL at its defaults (5 min)")
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.steps, args.base_model, not args.without_defaults)
    from shared.backends.local.steps import use_bf16

    print(f"{'fine-tune, LoRA r=16, seq 512, batch 1':<40} {'tok/s':>7} {'x base':>7} {'eval loss':>15} {'train s':>8}"
          f"   (bf16 autocast: {'on, native bf16' if use_bf16() else 'off, no native bf16 on this CPU'})")
    for r in rows:
        print(f"{r['trainer']:<40} {r['tokens_per_s']:7.1f} {r['speedup']:7.2f} "
              f"{r['eval_loss_initial']:6.3f} -> {r['eval_loss']:6.3f} {r['runtime_s']:8.1f}")
    print(f"({args.steps} steps each; {time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
