"""A training step's micro-batches computed side by side, one worker per core (data parallelism in one process).

A step of the local trainer is ``gradient_accumulation_steps`` micro-batches whose gradients are summed before
the optimiser's update. Computed one after the other, each micro-batch's forward and backward are spread over
all cores, and at batch 1 a 2-core CPU keeps its second core only partly busy: the small element-wise kernels
and the attention do not split well, and each intra-op split waits for its slowest half. Here each worker takes
whole micro-batches, with ``cores / workers`` intra-op threads of its own; the gradients each worker returns are
summed in worker order, so a step is the same sum as one thread going through the micro-batches (the order of
the additions aside: the same to float rounding, and the same every run for a given number of workers).

Workers are threads of the trainer's process, not processes: they share the model (no second copy of the base
weights, no all-reduce), and torch releases the GIL inside every kernel. Grad mode and autocast are per thread,
so each worker sets its own. ``workers=1`` runs on the calling thread, with no pool.

The window's micro-batches are given to the workers longest first to the least loaded (the trainer also puts
examples of similar length in one window), since a step lasts as long as its slowest worker.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from shared.backends.local.examples import Batch
from shared.backends.local.steps import autocast, batch_loss_sum, loss_sums


def plan(setting: int, micro_batches: int, cores: int | None = None) -> tuple[int, int]:
    """(workers, intra-op threads each) for steps of ``micro_batches`` micro-batches: ``setting`` workers
    (0: one per core), never more than the cores or than a step has micro-batches to share out."""
    cores = max(1, cores if cores is not None else (os.cpu_count() or 1))
    workers = max(1, min(setting if setting > 0 else cores, cores, micro_batches))
    return workers, max(1, cores // workers)


def balance(weights: Sequence[int], workers: int) -> list[list[int]]:
    """Indices of ``weights`` in ``workers`` groups of near-equal total weight (heaviest first, each to the
    lightest group so far), each group in index order; groups may be empty when there are fewer items."""
    groups: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        lightest = min(range(workers), key=lambda w: (loads[w], w))
        groups[lightest].append(index)
        loads[lightest] += weights[index]
    return [sorted(group) for group in groups]


class StepWorkers:
    """Computes a step's summed gradients and an evaluation's loss sums on ``workers`` threads."""

    def __init__(self, workers: int = 1, threads: int | None = None):
        import torch

        self.workers = max(1, workers)
        self.threads = threads or max(1, torch.get_num_threads() // self.workers)
        self._pool = None
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tunedrop-step",
                                            initializer=torch.set_num_threads, initargs=(self.threads,))
        else:
            torch.set_num_threads(self.threads)

    def gradients(self, model, params: Sequence, batches: Sequence[Batch], denominator: int, bf16: bool) -> float:
        """Backward of the window ``batches``' summed loss / ``denominator``: sets each of ``params``' ``.grad``
        (None before) to its gradient; returns that loss."""
        shares = [share for share in balance([b.tokens for b in batches], self.workers) if share]
        results = self._map(_share_gradients, [(model, params, [batches[i] for i in s], denominator, bf16)
                                               for s in shares])
        loss, grads = 0.0, None
        for share_loss, share_grads in results:
            loss += share_loss
            grads = share_grads if grads is None else [a.add_(b) for a, b in zip(grads, share_grads, strict=True)]
        for param, grad in zip(params, grads or [None] * len(params), strict=True):
            param.grad = grad
        return loss

    def loss_sums(self, model, batches: Sequence[Batch], bf16: bool) -> tuple[float, int]:
        """(summed loss, target tokens) over ``batches``, without gradients."""
        batches = [b for b in batches if b.targets]
        shares = [share for share in balance([b.tokens for b in batches], self.workers) if share]
        results = self._map(loss_sums, [(model, [batches[i] for i in s], bf16) for s in shares])
        return sum(total for total, _ in results), sum(count for _, count in results)

    def _map(self, function, calls: list[tuple]) -> list:
        if self._pool is None or len(calls) < 2:
            return [function(*call) for call in calls]
        futures = [self._pool.submit(function, *call) for call in calls]
        return [future.result() for future in futures]  # in submission order: the same sums every run

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _share_gradients(model, params, batches: Sequence[Batch], denominator: int, bf16: bool):
    import torch

    loss, grads = 0.0, None
    with torch.enable_grad():
        for batch in batches:
            with autocast(bf16):
                part = batch_loss_sum(model, batch) / denominator
            found = torch.autograd.grad(part, params, allow_unused=True)
            found = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]
            grads = found if grads is None else [a.add_(b) for a, b in zip(grads, found, strict=True)]
            loss += float(part.detach())
    return loss, grads

