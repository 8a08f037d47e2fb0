"""Token counting for dataset validation, and the rough training-time estimate built on it.

Counting uses the target model's *fast* tokenizer (the ``tokenizers`` package, batched, no
transformers import) when its ``tokenizer.json`` is on this machine: for the local backend,
SmolLM2's, from the model cache. Phi-3 (the azureml backend) has no tokenizer here, so its
counts are an estimate of 4 characters per token, and the report says so.

An example's tokens are its messages' content tokens plus :data:`MESSAGE_OVERHEAD` per message
(the chat template's ``<|im_start|>role\\n`` ... ``<|im_end|>\\n``). That is the count the
trainer sees give or take a default system prompt, close enough for "will it be truncated?"
and "how long will it take?".
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

#: Template tokens around each message: <|im_start|>, role, \n, <|im_end|>, \n.
MESSAGE_OVERHEAD = 5
#: Characters per token when no tokenizer is available (a common rule of thumb for English).
CHARS_PER_TOKEN = 4

#: Rough fine-tuning throughput in trained tokens per second, and price per hour, by compute.
#: Measured for local (SmolLM2-135M, LoRA, CPU: bench/training.py); the Azure ML figure is an order of
#: magnitude for Phi-3-mini LoRA on one V100 (Standard_NC6s_v3, pay-as-you-go list price), not a
#: quote. Override both with TUNEDROP_ESTIMATE_TOKENS_PER_S / TUNEDROP_ESTIMATE_COST_PER_HOUR.
THROUGHPUT = {
    "local": (170.0, 0.0),
    "azureml": (1500.0, 3.06),
}


class FastTokenizer:
    """Counts tokens with a ``tokenizers.Tokenizer`` loaded from a tokenizer.json, in batches."""

    def __init__(self, path: Path | str, name: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # encode_batch_fast skips the character offsets we never read: the same ids, 1.4x faster here.
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.method = f"tokenizer ({name})"
        self.exact = True

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(list(texts), add_special_tokens=False)]


class EstimateTokenizer:
    """Characters / 4, for models whose tokenizer is not on this machine."""

    method = f"estimate (characters / {CHARS_PER_TOKEN})"
    exact = False

    def count(self, texts: Sequence[str]) -> list[int]:
        return [-(-len(t) // CHARS_PER_TOKEN) for t in texts]


def find_tokenizer(base_model: str, model_cache_dir: Path | str | None):
    """The fast tokenizer of ``base_model`` if its tokenizer.json is already on this machine, else None.

    Never downloads or converts anything (ingest must stay fast and light): for SmolLM2 and
    tiny-random it looks in the local backend's model cache; for a model folder, in the folder.
    """
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    from shared.model_cache import MARKER, tokenizer_folders

    name = str(base_model).strip()
    candidates = [Path(name)] if Path(name).is_absolute() else tokenizer_folders(name, model_cache_dir)
    for folder in candidates:
        if (folder / "tokenizer.json").is_file() and (Path(name).is_absolute() or (folder / MARKER).is_file()):
            try:
                return FastTokenizer(folder / "tokenizer.json", name)
            except Exception:  # a broken file: count with the estimate instead
                return None
    return None


def tokenizer_for(settings, base_model: str = "") -> object | None:
    """What ingest counts with for ``base_model`` (default: the app's): None when switched off,
    else the fast tokenizer or the estimate."""
    if not settings.count_tokens:
        return None
    return find_tokenizer(base_model or settings.effective_base_model, settings.model_cache_dir) or EstimateTokenizer()


def estimate(stats: dict, config, backend: str, tokens_per_s: float = 0.0, cost_per_hour: float = -1.0) -> dict | None:
    """The training-size figures and a rough time/cost line from a report's token stats.

    Trained tokens = the train share (1 - test_fraction) of the tokens each example keeps after
    truncation to max_seq_length, times the epochs (capped by max_steps when set).
    """
    tokens = stats.get("tokens")
    if not tokens or not tokens.get("examples"):
        return None
    default_rate, default_cost = THROUGHPUT.get(backend, THROUGHPUT["azureml"])
    rate = tokens_per_s if tokens_per_s > 0 else default_rate
    cost = cost_per_hour if cost_per_hour >= 0 else default_cost
    kept = tokens["total_kept"]
    train_examples = tokens["examples"] * (1 - config.test_fraction)
    per_epoch = kept * (1 - config.test_fraction)
    epochs = config.num_train_epochs
    if config.max_steps:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        epochs = min(epochs, config.max_steps * per_step / max(1.0, train_examples))
    trained = int(per_epoch * epochs)
    seconds = trained / rate
    return {
        "tokens_per_epoch": int(per_epoch),
        "epochs": round(epochs, 4),
        "training_tokens": trained,
        "tokens_per_s": rate,
        "estimated_seconds": round(seconds, 1),
        "estimated_cost": round(seconds / 3600 * cost, 2),
        "compute": backend,
        "note": "rough: tokens / a typical throughput for this compute, not a quote",
    }


def estimate_line(est: dict) -> str:
    secs = est["estimated_seconds"]
    when = f"{secs / 3600:.1f} h" if secs >= 5400 else f"{secs / 60:.0f} min" if secs >= 90 else f"{secs:.0f} s"
    cost = f", ~${est['estimated_cost']:,.2f}" if est["estimated_cost"] else ""
    return (f"training: ~{est['training_tokens']:,} tokens ({est['tokens_per_epoch']:,}/epoch x {est['epochs']:g}) "
            f"at ~{est['tokens_per_s']:,.0f} tokens/s on {est['compute']}: ~{when}{cost} (rough estimate)")
