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

#: Typical fine-tuning throughput (trained tokens per second, as the report counts tokens), price per hour and
#: fixed seconds per job (start-up, loading, evaluations, saving), by compute: used until a job on this
#: machine has measured its own (shared/throughput.py). Local: SmolLM2-135M with its defaults on a 2-core
#: x86_64 machine, three `tunedrop demo` runs on 2026-12-01 (82.7 tokens/s, 11.6 s). Azure ML: an order of
#: magnitude for Phi-3-mini LoRA on one V100 (Standard_NC6s_v3, pay-as-you-go list price), not a quote.
#: TUNEDROP_ESTIMATE_TOKENS_PER_S / TUNEDROP_ESTIMATE_COST_PER_HOUR override the first two.
THROUGHPUT = {
    "local": (83.0, 0.0, 12.0),
    "azureml": (1500.0, 3.06, 0.0),
}


class FastTokenizer:
    """Counts tokens with a ``tokenizers.Tokenizer`` loaded from a tokenizer.json, in batches.

    ``count`` may be called from several threads at once (``threads = True``): the Rust encoder
    runs outside the GIL, so :class:`~shared.datasets.token_count.TokenCounter` counts batches on
    one thread per core. That is how counting uses the cores, not the tokenizer's own Rust thread
    pool (rayon), which ``TOKENIZERS_PARALLELISM=false`` keeps off where the app sets it: a process
    that forks after rayon started would hang in the child (tokenizers' fork handler then warns and
    turns it off, unless the variable is set). Plain Python threads are not inherited by a forked
    child and are gone when counting ends, so nothing of them outlives a validation.
    """

    #: count() releases the GIL: batches may be counted on several threads at once.
    threads = True

    def __init__(self, path: Path | str, name: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # encode_batch_fast skips the character offsets we never read: the same ids, 1.4x faster here.
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.method = f"tokenizer ({name})"
        self.exact = True

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, each distinct text encoded once (a system prompt repeated on every row of a
        batch is encoded once for the batch)."""
        distinct = dict.fromkeys(texts)
        if len(distinct) == len(texts):
            return self._lengths(texts if isinstance(texts, list) else list(texts))
        counts = dict(zip(distinct, self._lengths(list(distinct)), strict=True))
        return [counts[t] for t in texts]

    def _lengths(self, texts: list[str]) -> list[int]:
        # len(encoding) is len(encoding.ids), without building the list of ids in Python.
        return list(map(len, self._encode(texts, add_special_tokens=False)))


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


def estimate(stats: dict, config, backend: str, tokens_per_s: float = 0.0, cost_per_hour: float = -1.0,
             measured: dict | None = None, base_model: str = "") -> dict | None:
    """The training-size figures and a time/cost line from a report's token stats.

    Trained tokens = the train share (1 - test_fraction) of the tokens each example keeps after
    truncation to max_seq_length, times the epochs (capped by max_steps when set). The time is those
    tokens at this machine's measured throughput for the base model plus its measured fixed cost (loading,
    evaluating, saving; ``measured``, shared/throughput.py), else at TUNEDROP_ESTIMATE_TOKENS_PER_S, else
    at a typical figure for the compute; the ``note`` says which.
    """
    tokens = stats.get("tokens")
    if not tokens or not tokens.get("examples"):
        return None
    default_rate, default_cost, default_overhead = THROUGHPUT.get(backend, THROUGHPUT["azureml"])
    overhead = 0.0
    if tokens_per_s > 0:
        rate, note = tokens_per_s, "tokens / TUNEDROP_ESTIMATE_TOKENS_PER_S"
    elif measured:
        rate, overhead = float(measured["tokens_per_s"]), float(measured.get("overhead_s") or 0.0)
        note = (f"measured on this machine ({measured.get('runs', 1)} run(s) of {base_model or 'this model'}, last "
                f"{measured.get('measured_at', '?')}): {rate:,.0f} tokens/s plus {overhead:.0f} s to load, "
                "evaluate and save")
    else:
        rate, overhead = default_rate, default_overhead
        note = (f"rough: tokens / a typical throughput for this compute, not a quote; no run of "
                f"{base_model or 'this model'} measured here yet") if backend == "local" else \
            "rough: tokens / a typical throughput for this compute, not a quote"
    cost = cost_per_hour if cost_per_hour >= 0 else default_cost
    kept = tokens["total_kept"]
    train_examples = tokens["examples"] * (1 - config.test_fraction)
    per_epoch = kept * (1 - config.test_fraction)
    epochs = config.num_train_epochs
    if config.max_steps:
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        epochs = min(epochs, config.max_steps * per_step / max(1.0, train_examples))
    trained = int(per_epoch * epochs)
    seconds = trained / rate + overhead
    return {
        "tokens_per_epoch": int(per_epoch),
        "epochs": round(epochs, 4),
        "training_tokens": trained,
        "tokens_per_s": round(rate, 1),
        "overhead_s": round(overhead, 1),
        "estimated_seconds": round(seconds, 1),
        "estimated_cost": round(seconds / 3600 * cost, 2),
        "compute": backend,
        "source": "measured" if measured and tokens_per_s <= 0 else "setting" if tokens_per_s > 0 else "typical",
        "note": note,
    }


def estimate_line(est: dict) -> str:
    secs = est["estimated_seconds"]
    when = f"{secs / 3600:.1f} h" if secs >= 5400 else f"{secs / 60:.0f} min" if secs >= 90 else f"{secs:.0f} s"
    cost = f", ~${est['estimated_cost']:,.2f}" if est["estimated_cost"] else ""
    source = {"measured": "measured here", "setting": "TUNEDROP_ESTIMATE_TOKENS_PER_S"}.get(est.get("source"),
                                                                                            "rough estimate")
    plus = f" + {est['overhead_s']:.0f} s load/eval/save" if est.get("overhead_s") else ""
    return (f"training: ~{est['training_tokens']:,} tokens ({est['tokens_per_epoch']:,}/epoch x {est['epochs']:g}) "
            f"at ~{est['tokens_per_s']:,.0f} tokens/s{plus} on {est['compute']}: ~{when}{cost} ({source})")
