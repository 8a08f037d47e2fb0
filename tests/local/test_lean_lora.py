"""The trainer's lean LoRA forward (shared/backends/local/lean_lora.py) computes what peft's computes: the same
logits, loss and gradients on tiny-random, and peft's own forward wherever the lean one does not apply."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def peft_model(model_cache):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.backends.local.models import TINY_RANDOM, resolve_base_model
    from shared.backends.local.trainer import LORA_TARGETS

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_base_model(TINY_RANDOM, model_cache)), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero in peft: give it values, so the LoRA path counts
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean().neg()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), float(loss.detach()), grads


def test_the_lean_forward_gives_peft_s_logits_loss_and_gradients(peft_model):
    import torch

    from shared.backends.local.lean_lora import make_lean

    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(5))
    lean = copy.deepcopy(peft_model)
    assert make_lean(lean) == 7 * lean.config.num_hidden_layers  # every projection of every layer
    want_logits, want_loss, want_grads = _loss_and_grads(peft_model, ids)
    got_logits, got_loss, got_grads = _loss_and_grads(lean, ids)
    assert torch.allclose(got_logits, want_logits, atol=1e-5) and abs(got_loss - want_loss) < 1e-5
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 14 * lean.config.num_hidden_layers
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name
    # With its adapters disabled, the model is the base model again (peft's own path is taken).
    with lean.disable_adapter(), torch.no_grad():
        plain = lean(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(plain, want_logits, atol=1e-3)
    with peft_model.disable_adapter(), torch.no_grad():
        assert torch.allclose(plain, peft_model(input_ids=ids, use_cache=False).logits, atol=1e-6)
