"""A step's micro-batches side by side (shared/backends/local/workers.py): the same gradients and losses as one
thread going through them, each worker on its own intra-op threads, the work shared out by length."""

from __future__ import annotations

import random
import threading

import pytest

from shared.backends.local.workers import StepWorkers, balance, plan


@pytest.mark.parametrize(
    "setting, micro_batches, cores, expected",
    [
        (0, 2, 2, (2, 1)),  # one per core
        (0, 1, 2, (1, 2)),  # one micro-batch a step: nothing to share, every core on it
        (0, 2, 8, (2, 4)),  # never more workers than a step has micro-batches; the cores split between them
        (3, 16, 8, (3, 2)),
        (1, 4, 2, (1, 2)),  # 1: one at a time on every core
        (5, 8, 2, (2, 1)),  # never more workers than cores
        (0, 4, 1, (1, 1)),
    ],
)
def test_the_plan_gives_each_core_one_worker_at_most_and_no_idle_worker(setting, micro_batches, cores, expected):
    assert plan(setting, micro_batches, cores) == expected


def test_balance_gives_every_index_once_and_evens_the_load():
    draw = random.Random(4)
    for _ in range(200):
        weights = [draw.randint(1, 500) for _ in range(draw.randint(0, 12))]
        workers = draw.randint(1, 4)
        groups = balance(weights, workers)
        assert len(groups) == workers
        assert sorted(i for g in groups for i in g) == list(range(len(weights)))
        assert all(g == sorted(g) for g in groups)
        loads = [sum(weights[i] for i in g) for g in groups]
        if weights:  # greedy longest-first: no two groups differ by more than the heaviest item
            assert max(loads) - min(loads) <= max(weights)
    assert balance([400, 100, 380, 90], 2) == [[0, 3], [1, 2]]


@pytest.fixture(scope="module")
def lora_model(model_cache):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.backends.local.lean_lora import make_lean
    from shared.backends.local.models import TINY_RANDOM, resolve_base_model
    from shared.backends.local.trainer import LORA_TARGETS

    torch.manual_seed(11)
    base = AutoModelForCausalLM.from_pretrained(str(resolve_base_model(TINY_RANDOM, model_cache)), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS),
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero in peft: give it values, so every LoRA weight gets a gradient
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    make_lean(model)
    model.train()
    return model


def _window(lengths, seed=0):
    import torch

    from shared.backends.local.examples import IGNORE_INDEX, collate

    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        examples.append((ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:]))  # the second half is the "reply"
    return [collate([e], 0) for e in examples]


def _plain_backward(model, params, window, denominator):
    from shared.backends.local.steps import batch_loss_sum

    model.zero_grad(set_to_none=True)
    loss = 0.0
    for batch in window:
        part = batch_loss_sum(model, batch) / denominator
        part.backward()
        loss += float(part.detach())
    return loss, [p.grad.clone() for p in params]


def test_workers_give_the_gradients_and_loss_one_thread_gives(lora_model):
    import torch

    params = [p for p in lora_model.parameters() if p.requires_grad]
    window = _window([37, 12, 64, 20, 51])
    denominator = sum(b.targets for b in window)
    want_loss, want = _plain_backward(lora_model, params, window, denominator)
    for workers in (1, 2, 3):
        pool = StepWorkers(workers, threads=1)
        try:
            lora_model.zero_grad(set_to_none=True)
            loss = pool.gradients(lora_model, params, window, denominator, bf16=False)
            first = [p.grad.clone() for p in params]
            assert abs(loss - want_loss) < 1e-5, workers
            for got, expected in zip(first, want, strict=True):
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), workers
            # the same workers sum the same way every time: bit for bit
            lora_model.zero_grad(set_to_none=True)
            assert pool.gradients(lora_model, params, window, denominator, bf16=False) == loss
            assert all(torch.equal(p.grad, g) for p, g in zip(params, first, strict=True))
        finally:
            pool.close()


def test_evaluation_shared_out_is_the_same_mean_loss(lora_model):
    from shared.backends.local.steps import evaluate

    batches = _window([30, 8, 45, 19, 60, 5], seed=2)
    want = evaluate(lora_model, batches)
    pool = StepWorkers(2, threads=1)
    try:
        got = evaluate(lora_model, batches, workers=pool)
    finally:
        pool.close()
    assert want is not None and abs(got - want) < 1e-5
    assert lora_model.training  # evaluation puts the model back as it found it


def test_each_worker_runs_on_its_own_threads_in_parallel(lora_model, monkeypatch):
    import torch

    from shared.backends.local import workers as workers_module

    seen, barrier = [], threading.Barrier(2, timeout=30)
    real = workers_module._share_gradients

    def spy(*args):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        barrier.wait()  # both shares are being computed at the same time, or this times out
        return real(*args)

    monkeypatch.setattr(workers_module, "_share_gradients", spy)
    params = [p for p in lora_model.parameters() if p.requires_grad]
    window = _window([20, 22])
    pool = StepWorkers(2, threads=1)
    try:
        lora_model.zero_grad(set_to_none=True)
        pool.gradients(lora_model, params, window, sum(b.targets for b in window), bf16=False)
    finally:
        pool.close()
    assert len(seen) == 2 and {threads for _, threads in seen} == {1}
    assert all(name.startswith("tunedrop-step") for name, _ in seen) and seen[0][0] != seen[1][0]


def test_a_failing_micro_batch_fails_the_step_with_its_own_error(lora_model, monkeypatch):
    from shared.backends.local import workers as workers_module

    def broken(*args):
        raise MemoryError("no room for this micro-batch")

    monkeypatch.setattr(workers_module, "_share_gradients", broken)
    params = [p for p in lora_model.parameters() if p.requires_grad]
    pool = StepWorkers(2, threads=1)
    try:
        with pytest.raises(MemoryError, match="no room"):
            pool.gradients(lora_model, params, _window([10, 12]), 10, bf16=False)
    finally:
        pool.close()
