"""DPOModule: Direct Preference Optimization of the policy adapter on preference pairs.

One training step is one optimizer step over a batch of pairs (``data.batch_size``):

1. reference  ``log pi_ref`` of each pair's chosen and rejected response: the frozen SFT adapter on
              the same base (``reference`` role), read from the run folder's cache when
              ``model.dpo.precompute_ref_logps`` (computed once before the first step), else computed now
2. update     per micro-batch of pairs, chosen and rejected through one forward of the trainable
              policy adapter (stacked along the batch), sequence log-probs, the ``model.dpo.loss_type``
              loss per pair (:mod:`rlhf_lit.algos.preference_losses`), averaged over the batch's pairs
              with micro-batch weights (exact) -> backward, clip, step (:class:`UpdateStep`)

Validation and ``test`` score held-out pairs (accuracy, margins: TRL's metric names); ``test`` also
samples both adapters on the test split's prompts for the same paired report as PPO, scored by
``model.reward`` (its KL column is the DPO adapter's KL to the SFT adapter on its own samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from rlhf_lit.algos.preference_losses import (DPOLossType, check_dpo_options, dpo_loss, pair_mean, pair_units,
                                              pair_weight, sequence_logps)
from rlhf_lit.model import POLICY, REFERENCE, PolicyConfig
from rlhf_lit.preference_data import pair_collate, stack_pairs
from rlhf_lit.rewards.base import RewardBackend
from rlhf_lit.rollout import KernelsName, SamplingConfig
from rlhf_lit.run_logging import run_dir
from rlhf_lit.stages.base import default_optimizer
from rlhf_lit.stages.pair_training import PairTraining
from rlhf_lit.stages.policy_stage import PolicyStage
from rlhf_lit.stages.reference_cache import FILE_NAME, ReferenceCache
from rlhf_lit.stages.update_step import UpdateStep
from rlhf_lit.errors import ConfigError

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class DPOConfig:
    """``model.dpo``: the DPO hyperparameters, each with its source."""

    beta: float = 0.1
    """beta: strength of the implicit KL regularisation to the reference (Rafailov et al. 2023; TRL's
    default 0.1). Larger keeps the policy closer to the SFT adapter."""
    loss_type: DPOLossType = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` (Azar et al. 2023; per-token averaged log-ratios), ``hinge`` (SLiC,
    Zhao et al. 2023), ``robust`` (Chowdhury et al. 2024); formulas in ``algos/preference_losses.py``."""
    label_smoothing: float = 0.0
    """Assumed probability that a pair's label is flipped, in [0, 0.5): cDPO for ``sigmoid``,
    the unbiased robust loss for ``robust``."""
    precompute_ref_logps: bool = True
    """Compute the reference log-probs of every training and validation pair once, before the first
    step, and keep them in ``<run folder>/reference_logps.pt`` (a resume reads them back): no
    reference forward in the training steps. False: a reference forward per step (TRL's default)."""
    micro_batch_size: Union[int, Literal["auto"], None] = None
    """Pairs per forward/backward (each forward holds 2x this many sequences); None = the whole
    batch. Losses and gradients are the same for any value that divides ``data.batch_size``.
    ``auto``: the largest divisor whose activations fit in 80% of the free GPU memory."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm (None: no clipping; the norm is logged either way)."""

    def __post_init__(self) -> None:
        try:
            check_dpo_options(self.loss_type, self.beta, self.label_smoothing)
        except ValueError as e:  # the maths layer's message names the option; the CLI shows it alone
            raise ConfigError(str(e)) from None


class DPOModule(PairTraining, PolicyStage):
    """DPO of the policy adapter against the frozen SFT adapter, on one shared base model.

    Args:
        policy: Base model, SFT adapter (the trainable start and the frozen reference) and loading options.
        reward: The reward backend that scores ``test`` samples (the report); never used for training.
        dpo: DPO hyperparameters.
        sampling: Sampling of the ``test`` report's responses.
        eval_sampling: Defaults to ``sampling``.
        rollout_engine: ``hf``, ``cuda_graph``, ``cuda_graph_merged`` or ``auto`` (for ``test`` sampling).
        rollout_kernels: For ``test`` sampling, the cuda_graph engines' decode-step glue (norms,
            RoPE, attention, SiLU, and sampling without top-k/top-p): ``triton`` kernels, ``torch``
            ops, or ``auto`` (Triton where it imports and its kernels pass a self-test on the GPU,
            else torch ops). With ``rollout_engine: hf`` only ``auto`` (an error otherwise); ignored,
            with a warning, where ``auto`` samples with HF generate (the CPU).
        optimizer: Optimizer over the policy adapter.
        lr_scheduler: Optional scheduler, stepped once per optimizer step.
        output_dir: Where the trained policy adapter is exported (PEFT folder); default ``<log dir>/adapter``.
        export_every_n_steps: Also export the adapter every N steps (0: only at the end of fit).
        eval_samples_per_prompt: Responses sampled per test prompt and adapter.
        eval_rewards: Extra backends that score the test samples (distinct ``name``\\ s).
        extra_stop_tokens: Tokens that end a response besides the tokenizer's EOS.
        seed: Seed of the stage's randomness (each data-parallel rank adds its rank).
    """

    micro_batch_option = "model.dpo.micro_batch_size"
    reward_role = "scores the report; not trained on"

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        reward: Optional[RewardBackend] = None,
        dpo: DPOConfig = DPOConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        eval_sampling: Optional[SamplingConfig] = None,
        rollout_engine: Literal["auto", "hf", "cuda_graph", "cuda_graph_merged"] = "auto",
        rollout_kernels: KernelsName = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        output_dir: Optional[str] = None,
        export_every_n_steps: int = 0,
        eval_samples_per_prompt: int = 1,
        eval_rewards: Optional[list[RewardBackend]] = None,
        extra_stop_tokens: Optional[list[str]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, reward, sampling, eval_sampling, rollout_engine, optimizer, lr_scheduler,
                         output_dir, eval_samples_per_prompt, eval_rewards, extra_stop_tokens, seed,
                         rollout_kernels=rollout_kernels)
        if policy.critic == "adapter":
            raise ConfigError("model.policy.critic='adapter' trains a critic adapter DPO never uses: set 'none'")
        if policy.sft_adapter is None:
            raise ConfigError("model.policy.sft_adapter is required: DPO trains the SFT adapter against a frozen copy "
                             "of it (without one, the reference would be the bare base model)")
        self.dpo = dpo
        self.export_every_n_steps = export_every_n_steps
        self.update_step = UpdateStep(self, dpo.micro_batch_size, dpo.max_grad_norm, minibatch_size=1)
        self.ref_cache: Optional[ReferenceCache] = None
        self.steps_done = 0
        self._test_sums: dict[str, Tensor] = {}
        self._generated = False

    @property
    def algorithm(self) -> str:
        """What the report says trained the policy."""
        cfg = self.dpo
        return f"DPO (loss_type={cfg.loss_type}, beta={cfg.beta}, label_smoothing={cfg.label_smoothing})"

    def eval_micro_batch(self, rows: int) -> int:
        """Sequences per no-grad forward: four training micro-batches of pairs (2 sequences each)."""
        return min(rows, 2 * self.update_step.no_grad_micro_batch(self.update_step.minibatch_size))

    # ---------------------------------------------------------------------------------------
    # Before the first step: the reference cache
    # ---------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.dpo.precompute_ref_logps:
            self.ref_cache = self._filled_reference_cache()

    def _filled_reference_cache(self) -> ReferenceCache:
        cfg = self.policy_config
        cache = ReferenceCache({k: getattr(cfg, k) for k in ("base_model", "sft_adapter", "revision", "quantization",
                                                              "dtype", "attn_implementation")})
        log_dir = run_dir(self.trainer)
        path = Path(log_dir) / FILE_NAME if log_dir else None
        if path is not None and path.is_file():
            cache.load(path)
        dm = self.trainer.datamodule
        batches = [
            pair_collate(self.tokenizer.pad_token_id)([split[i] for i in range(s, min(s + dm.eval_batch_size, len(split)))])
            for split in (dm.splits[name] for name in ("train", "val") if name in dm.splits)
            for s in range(0, len(split), dm.eval_batch_size)
        ]
        added = cache.fill(batches, lambda b: self._compute_reference(self._to_device(b)), self.global_rank,
                           self.trainer.world_size)
        if added and path is not None and self.trainer.is_global_zero:
            cache.save(path)
        return cache

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # ---------------------------------------------------------------------------------------
    # Log-probs of pairs
    # ---------------------------------------------------------------------------------------
    def _sequence_logps(self, batch: dict[str, Any], role: str) -> tuple[Tensor, Tensor]:
        """No-grad ``(B,)`` chosen and rejected sequence log-probs under ``role``'s adapter."""
        pairs = stack_pairs(batch)
        out = self.model.evaluate(pairs, 1.0, role, self.eval_micro_batch(2 * len(batch["key"])), values=False)
        return sequence_logps(out.logprobs, pairs.response_mask).chunk(2)

    def _compute_reference(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._sequence_logps(batch, REFERENCE)
        finally:
            self.model.train(was_training)

    def reference_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(B,)`` reference log-probs of the batch's chosen and rejected responses (cached or computed)."""
        cached = self.ref_cache.lookup(batch["key"], self.device) if self.ref_cache is not None else None
        return cached if cached is not None else self._compute_reference(batch)

    def _pair_stats(self, res, chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
        """Per-pair figures under TRL's names (``(b,)`` each, detached)."""
        return {"loss": res.losses.detach(), "rewards/chosen": res.chosen_rewards,
                "rewards/rejected": res.rejected_rewards,
                "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float(),
                "rewards/margins": res.chosen_rewards - res.rejected_rewards,
                "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}

    def _loss(self, pairs, chosen: Tensor, rejected: Tensor, ref_c: Tensor, ref_r: Tensor):
        """The DPO loss of stacked ``pairs`` from their ``(b,)`` sequence log-probs, and its figures."""
        cfg = self.dpo
        n_c, n_r = pairs.response_mask.sum(-1).chunk(2)
        res = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.loss_type, cfg.label_smoothing, n_c, n_r)
        return res, self._pair_stats(res, chosen, rejected)

    # ---------------------------------------------------------------------------------------
    # One optimizer step
    # ---------------------------------------------------------------------------------------
    def pair_update(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step of the DPO loss over the pair batch; returns this rank's batch means
        of the per-pair figures, the gradient norm and the micro-batch size."""
        B = len(batch["key"])
        ref_c, ref_r = self.reference_logps(batch)
        units = self.update_step.global_sum(pair_units(B, self.device))
        sums: dict[str, Tensor] = {}

        def micro_losses(rows: Tensor):
            pairs = stack_pairs(batch, rows)
            logps = sequence_logps(self.model(pairs, 1.0, values=False).logprobs, pairs.response_mask)
            res, stats = self._loss(pairs, *logps.chunk(2), ref_c[rows], ref_r[rows])
            yield pair_mean(res.losses) * pair_weight(len(rows), units)
            for k, v in stats.items():  # this rank's batch means (the logger averages ranks)
                sums[k] = sums.get(k, 0.0) + v.sum() / B

        with self.update_step.phase() as update:
            update.measure(lambda: self._probe_loss(batch), self.length_scale(batch))
            grad_norm = self.update_step.step(torch.arange(B, device=self.device), micro_losses)
        self.step_lr_scheduler()
        return {**{k: float(v) for k, v in sums.items()}, "policy/grad_norm": float(grad_norm),
                "perf/micro_batch_size": float(self.update_step.micro_batch(B))}

    def _probe_loss(self, batch: dict[str, Any]) -> Tensor:
        """One pair's forward (``micro_batch_size: auto``)."""
        pairs = stack_pairs(batch, torch.zeros(1, dtype=torch.long, device=self.device))
        return self.model(pairs, 1.0, values=False).logprobs.sum()

    # ---------------------------------------------------------------------------------------
    # Held-out pairs: validation, test
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def pair_figures(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-pair figures (``(B,)`` each, TRL's names) of the current policy on a held-out batch."""
        return self._loss(stack_pairs(batch), *self._sequence_logps(batch, POLICY), *self.reference_logps(batch))[1]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        figures = self.pair_figures(batch)
        sync = self.trainer.world_size > 1
        for k, v in figures.items():
            self.log(f"validation/{k}", v.mean(), batch_size=len(v), sync_dist=sync)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._test_sums, self._generated = {}, False

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:  # the test prompts: the paired SFT / DPO generation report
            self._generated = True
            return super().test_step(batch, batch_idx)
        n = len(batch["key"])
        for k, v in self.pair_figures(batch).items():
            self.log(f"test/{k}", v.mean(), batch_size=n, sync_dist=self.trainer.world_size > 1,
                     add_dataloader_idx=False)
            self._test_sums[k] = self._test_sums.get(k, 0.0) + v.sum()
        self._test_sums["pairs"] = self._test_sums.get("pairs", 0.0) + torch.tensor(float(n), device=self.device)

    def on_test_epoch_end(self) -> None:
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") if self.trainer.world_size > 1 else v
                for k, v in self._test_sums.items()}
        n = float(sums.pop("pairs", 1.0))
        pref = {k.replace("rewards/accuracies", "accuracy").replace("rewards/margins", "margin").replace("/", "_"):
                float(v) / n for k, v in sums.items()}
        pref |= {"pairs": int(n), "beta": self.dpo.beta, "loss_type": self.dpo.loss_type}
        if self._generated:
            self._evaluator.extra["preference"] = pref
            super().on_test_epoch_end()
