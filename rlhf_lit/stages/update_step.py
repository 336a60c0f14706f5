"""The optimizer step every training stage shares.

One call of :meth:`UpdateStep.step` is one optimizer step over a minibatch:

1. zero the gradients;
2. for each micro-batch, backpropagate every loss the stage yields for it (the stage scales each by
   its share of the minibatch's aggregate, :mod:`rlhf_lit.algos.aggregation`, so micro-batching
   never changes the loss or the gradients);
3. sum the gradients over data-parallel ranks (the aggregate's denominator is the global
   minibatch's, so the sum is the gradient of the global aggregate);
4. clip to ``max_grad_norm``, step the optimizer, refresh the bf16 LoRA compute copies.

The clipping runs inside the optimizer step, in a step pre-hook of the optimizer: by then Lightning's
precision plugin has unscaled the gradients (``16-mixed``'s ``GradScaler``; clipping scaled
gradients would clip by a norm tens of thousands of times too large), and a step the scaler skips
for non-finite gradients is not clipped (its norm reads ``inf``).

A minibatch without a single token to learn from (every sample unscored) gets no optimizer step:
Adam's momentum would still move the weights. :meth:`UpdateStep.minibatch_units` says which
minibatches have one, agreed across ranks, with their denominators (one all-reduce per epoch).

Around the steps of one update phase, :meth:`UpdateStep.phase` puts the model in train mode, swaps
in the bf16 LoRA compute copies and the compiled decoder layers, and frees the gradients at the end.
``micro_batch_size: auto`` is measured once, at the first update.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Iterator, Literal, Optional, Union

import torch
from torch import Tensor

from rlhf_lit.errors import ConfigError

log = logging.getLogger(__name__)

MicroBatchSize = Union[int, Literal["auto"], None]

NO_GRAD_TOKENS = 8192
"""Positions per forward without gradients, at most (see :meth:`UpdateStep.no_grad_micro_batch`)."""


def largest_divisor_within(n: int, cost_each: float, budget: float) -> int:
    """The largest divisor ``d`` of ``n`` with ``d * cost_each <= budget`` (at least 1).

    Picks a micro-batch that divides the minibatch evenly and fits a memory budget.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fits = [d for d in range(1, n + 1) if n % d == 0 and d * cost_each <= budget]
    return max(fits, default=1)


def check_micro_batch_size(micro: MicroBatchSize, minibatch: int, where: str,
                           option: str = "model.ppo.micro_batch_size") -> None:
    """Raises ValueError, naming ``option`` and ``where`` the minibatch size comes from, unless
    ``micro`` is None, ``auto`` or a positive divisor of ``minibatch``."""
    if micro is None or micro == "auto":
        return
    if isinstance(micro, str):
        raise ConfigError(f"{option}={micro!r}: expected a positive integer that divides the "
                         f"minibatch size {minibatch}, 'auto' or null")
    if micro < 1 or minibatch % micro:
        raise ConfigError(f"{option}={micro} must divide the minibatch size {minibatch} ({where})")


class UpdateStep:
    """Micro-batch accumulation, bf16 LoRA copies, gradient reduction over ranks, clipping, step.

    Args:
        module: the LightningModule whose optimizer, strategy and ``model`` (a
            :class:`~rlhf_lit.model.PolicyModel`) are used.
        micro_batch_size: rows per forward/backward; None = the whole minibatch; ``auto``: the
            largest divisor of the minibatch whose activations fit in 80% of the free GPU memory
            (measured once; on the CPU the whole minibatch).
        max_grad_norm: clip the global gradient norm to this (None: no clipping; the norm is returned
            either way).
        minibatch_size: the stage's minibatch size: what ``auto`` stands for before it is measured.
    """

    def __init__(self, module, micro_batch_size: MicroBatchSize, max_grad_norm: Optional[float],
                 minibatch_size: int) -> None:
        self.module = module
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.minibatch_size = minibatch_size
        self.measured: Optional[int] = None  # micro_batch_size: auto, measured at the first update
        self._lora = None
        self._clip: Optional[tuple[list[Tensor], float]] = None  # set around opt.step() only
        self._grad_norm: Optional[Tensor] = None
        self._hooked: Optional[int] = None  # id() of the optimizer carrying the clipping hook

    # ------------------------------------------------------------------------------------------
    def micro_batch(self, rows: int) -> int:
        """Rows per forward for a (mini)batch of ``rows``: the configured or measured size."""
        micro = self.micro_batch_size
        if micro == "auto":  # before the first update measured it: one minibatch's worth
            micro = self.measured or self.minibatch_size
        return min(micro or rows, rows)

    def no_grad_micro_batch(self, rows: int, row_tokens: Optional[int] = None) -> int:
        """Rows per forward without gradients (experience, evaluation), at most ``rows``: four
        training micro-batches, sixteen without gradient checkpointing. Such a forward holds one
        layer's activations at a time: it fits where the training micro-batch's forward + backward
        does (which holds a layer's inputs for every layer with checkpointing, all of every layer's
        activations without), and larger GEMMs run closer to the card's peak.

        With gradient checkpointing and ``row_tokens`` (positions per row) the forward is also kept
        within :data:`NO_GRAD_TOKENS` positions: the largest divisor of ``rows`` that fits (equal
        forwards: one compiled shape), or, where that is under half of what fits (a row count with
        few divisors), what fits (at least 1). The checkpointed update holds little (each layer's
        input, one layer's activations), so one no-grad layer's activations (~140 KB per position on
        a 7B: the MLP's three ``intermediate``-wide tensors) would set the run's peak. Measured on the H200 (PPO benchmark,
        64 rows of 192 positions): 17.0 GiB with 64 rows per forward, 16.5 GiB with 32, the same
        time. Without checkpointing the update holds every layer's activations and the larger
        forward fits under them (GRPO benchmark: 32 rows instead of 128 cost 0.2 s of 5.0)."""
        policy = getattr(self.module, "policy_config", None)
        checkpointing = policy is None or policy.gradient_checkpointing
        micro = min(rows, (4 if checkpointing else 16) * self.micro_batch(rows))
        if row_tokens and checkpointing:
            fits = max(1, NO_GRAD_TOKENS // row_tokens)
            divisor = largest_divisor_within(rows, row_tokens, NO_GRAD_TOKENS)
            micro = min(micro, divisor if 2 * divisor >= fits else fits)
        return micro

    @property
    def world_size(self) -> int:
        return self.module.trainer.world_size

    def global_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over data-parallel ranks (itself on one rank): a minibatch's aggregate
        denominator over the global minibatch.

        One all-reduce, without the barrier Lightning's ``strategy.reduce`` puts before each one:
        under NCCL a barrier blocks the host until the GPU has drained its queue, where the update
        loop lets the host queue the next minibatch while the GPU computes this one."""
        if self.world_size == 1:
            return x
        return _all_reduce_sum_(x.clone())

    def minibatch_units(self, masks: list[Tensor], units: Callable[[Tensor], Tensor],
                        every_row_updated: bool) -> tuple[Tensor, list[bool]]:
        """An epoch's minibatches at once: each one's aggregate denominator summed over the ranks,
        and which of them hold a token that gets an update on any rank. One all-reduce per epoch
        (not one per minibatch).

        Args:
            masks: each minibatch's ``(b, R)`` update mask on this rank (unscored samples masked out).
            units: a minibatch's aggregate denominator from its mask (``algos.aggregation.agg_units``).
            every_row_updated: every row of the rollout has a token to learn from on every rank: then
                every minibatch has one, and the host need not wait for the counts.
        Returns:
            ``(k,)`` global units on the device, and one bool per minibatch, the same on every rank
            (with ``every_row_updated`` all True without a host sync; otherwise one).
        """
        local = torch.stack([units(m) for m in masks])
        if every_row_updated:
            return self.global_sum(local), [True] * len(masks)
        counts = torch.stack([m.sum() for m in masks]).to(local.dtype)
        both = self.global_sum(torch.stack([local, counts]))
        return both[0], [c > 0 for c in both[1].tolist()]

    @contextlib.contextmanager
    def phase(self) -> Iterator["UpdateStep"]:
        """An update phase: train mode, bf16 LoRA compute copies, compiled layers; the gradients
        are freed at the end (none are held through the next rollout)."""
        model = self.module.model
        model.train()
        with model.lora_compute_copies() as lora, model.compiled():
            self._lora = lora
            try:
                yield self
            finally:
                self._lora = None
        self.module.optimizers().zero_grad(set_to_none=True)

    def measure(self, probe: Callable[[], Tensor], length_scale: float = 1.0) -> None:
        """``micro_batch_size: auto``: the peak memory of one row's forward + backward (``probe``
        returns the scalar to backpropagate), times ``length_scale`` for the longest possible row,
        against 80% of the free GPU memory. Runs once; its gradients are discarded."""
        if self.micro_batch_size != "auto" or self.measured is not None:
            return
        device = self.module.device
        if device.type != "cuda":
            self.measured = self.minibatch_size
            return
        torch.cuda.synchronize(device)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = probe()
        with self._no_backward_sync():
            loss.backward()
        per_row = (torch.cuda.max_memory_allocated(device) - base) * length_scale
        self._lora.collect_grads()
        self.module.optimizers().zero_grad(set_to_none=True)
        self.measured = largest_divisor_within(self.minibatch_size, per_row, 0.8 * free)
        log.info("micro_batch_size=auto: %d (%.2f GiB per sequence, %.1f GiB free)", self.measured,
                 per_row / 2**30, free / 2**30)

    def step(self, index: Tensor, micro_losses: Callable[[Tensor], Iterable[Tensor]]) -> Tensor:
        """One optimizer step over the minibatch ``index`` (row indices).

        Args:
            index: ``(b,)`` long, the minibatch's rows.
            micro_losses: called with each micro-batch's rows; yields the losses to backpropagate,
                each already scaled by the micro-batch's share of the minibatch aggregate. The
                generator may hold a context (an adapter role) open across a yield: each loss is
                backpropagated before the generator resumes.
        Returns:
            The gradient norm before clipping (a 0-dim tensor, not synchronised to the host).
        """
        opt = self.module.optimizers()
        # The optimizer's parameters: the fp32 masters, whatever the modules hold during the phase.
        params = [p for group in opt.param_groups for p in group["params"]]
        micro = self.micro_batch(len(index))
        opt.zero_grad()
        for m in range(0, len(index), micro):
            for loss in micro_losses(index[m:m + micro]):
                with self._no_backward_sync():
                    self.module.manual_backward(loss)
                self._lora.collect_grads()
        self._sum_gradients_over_ranks(params)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        self._hook_clipping(opt.optimizer if hasattr(opt, "optimizer") else opt)
        # Lightning's step: (16-mixed: unscale) -> the pre-hook clips -> step (or the scaler skips it)
        self._clip, self._grad_norm = (params, max_norm), None
        try:
            opt.step()
        finally:
            self._clip = None
        self._lora.refresh()
        if self._grad_norm is None:  # the scaler skipped the step: non-finite gradients
            return torch.tensor(float("inf"), device=params[0].device)
        return self._grad_norm

    def _hook_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the clipping as a step pre-hook of ``optimizer`` (once per optimizer)."""
        if self._hooked == id(optimizer):
            return

        def clip(opt, args, kwargs):
            if self._clip is not None:
                params, max_norm = self._clip
                self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()

        optimizer.register_step_pre_hook(clip)
        self._hooked = id(optimizer)

    # ------------------------------------------------------------------------------------------
    def _no_backward_sync(self):
        """Keep DDP's backward hooks out, whatever the number of ranks (one included): an update
        makes many backward passes per DDP forward, some of which leave trained weights without a
        gradient (the policy's pass never reaches a critic adapter), and under bf16 LoRA compute
        copies the fp32 masters DDP registered get their gradients from ``collect_grads``, never from
        autograd: DDP's reducer would wait for them and fail the next backward ("parameters that were
        not used in producing the loss"). Gradients are reduced explicitly instead."""
        block = getattr(self.module.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _sum_gradients_over_ranks(self, params: list[Tensor]) -> None:
        """One flat all-reduce of every gradient (zeros for parameters without one), without a
        barrier (see :meth:`global_sum`)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _all_reduce_sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()


def _all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum ``x`` over the default process group, in place; under NCCL the host does not wait."""
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
