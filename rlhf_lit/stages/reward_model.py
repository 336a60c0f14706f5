"""RewardModelModule: a Bradley-Terry reward model trained on preference pairs.

The reward model is the ``policy`` LoRA adapter of the one base model (started from the SFT adapter,
or a fresh LoRA on the bare base) plus the scalar value head on its last hidden states, read after
the response's last token (its EOS), as an ``AutoModelForSequenceClassification`` reads its last
token (:mod:`rlhf_lit.algos.sequence_scores`). One training step is one optimizer step over a
batch of pairs:

    per micro-batch: chosen and rejected through one forward (stacked along the batch), scores
    ``r_c, r_r``, the loss ``-log sigma(r_c - r_r - m)`` per pair (Bradley-Terry; Llama 2's margin
    ``m = margin_scale * rating difference`` when the pairs carry one), averaged over the batch's
    pairs with micro-batch weights (exact) -> backward, clip, step

Validation and ``test`` report accuracy (share of pairs with ``r_c > r_r``) and the mean margin
``r_c - r_r`` on held-out pairs. The export (end of fit) is one folder, adapter + head + tokenizer +
manifest (:func:`rlhf_lit.export.export_reward_model`), which
:class:`rlhf_lit.rewards.TrainedRewardModel` loads by path to score (prompt, response) text in a
PPO/GRPO run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from rlhf_lit.algos.preference_losses import bradley_terry_loss, pair_mean, pair_units, pair_weight
from rlhf_lit.algos.sequence_scores import score_after_last_token, with_trailing_pad
from rlhf_lit.model import POLICY, PolicyConfig
from rlhf_lit.preference_data import stack_pairs
from rlhf_lit.run_logging import run_dir
from rlhf_lit.stages.base import AdapterStage, default_optimizer
from rlhf_lit.stages.pair_training import PairTraining
from rlhf_lit.stages.update_step import UpdateStep
from rlhf_lit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RewardModelConfig:
    """``model.rm``: the reward model's training options, each with its source."""

    margin_scale: float = 0.0
    """Llama 2's margin (Touvron et al. 2023, eq. 2): each pair must be won by ``margin_scale x`` its
    margin (``data.margin_field``, the raters' mean-rating difference); 0 is the plain Bradley-Terry loss.
    Pairs without a margin use 0."""
    center_rewards_coefficient: float = 0.0
    """Adds ``c * (r_c + r_r)^2`` per pair, pulling scores towards mean 0 (Eisenstein et al. 2023;
    TRL's ``center_rewards_coefficient``, e.g. 0.01): a PPO reward on a stable scale."""
    micro_batch_size: Union[int, Literal["auto"], None] = None
    """Pairs per forward/backward (2x this many sequences); None = the whole batch; same gradients at
    any divisor of ``data.batch_size``. ``auto``: the largest that fits in 80% of the free GPU memory."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm (None: no clipping; the norm is logged either way)."""

    def __post_init__(self) -> None:
        if self.margin_scale < 0 or self.center_rewards_coefficient < 0:
            raise ConfigError("model.rm.margin_scale and model.rm.center_rewards_coefficient must be >= 0")


class RewardModelModule(PairTraining, AdapterStage):
    """A Bradley-Terry reward model: LoRA adapter + scalar head on the shared base.

    Args:
        policy: Base model and the adapter to start from (``sft_adapter``; None: a fresh LoRA of
            ``lora_r``); ``critic`` must be ``value_head`` (the scalar head).
        rm: Loss options and micro-batching.
        optimizer: Optimizer over the adapter and the head.
        lr_scheduler: Optional scheduler, stepped once per optimizer step.
        output_dir: Where the reward model folder is exported; default ``<log dir>/reward_model``.
        export_every_n_steps: Also export every N steps (0: only at the end of fit).
        seed: Seed of the stage's randomness (each data-parallel rank adds its rank).
    """

    algorithm = "reward model"
    micro_batch_option = "model.rm.micro_batch_size"

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(sft_adapter=None),
        rm: RewardModelConfig = RewardModelConfig(),
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        output_dir: Optional[str] = None,
        export_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, optimizer, lr_scheduler, output_dir, seed)
        if policy.critic != "value_head":
            raise ConfigError(f"model.policy.critic={policy.critic!r}: the reward model is the adapter plus the value "
                             f"head on its hidden states; set 'value_head'")
        self.rm = rm
        self.export_every_n_steps = export_every_n_steps
        self.update_step = UpdateStep(self, rm.micro_batch_size, rm.max_grad_norm, minibatch_size=1)
        self.steps_done = 0

    # ---------------------------------------------------------------------------------------
    def scores(self, batch: dict[str, Any], rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(b,)`` scores of the chosen and of the rejected responses of ``rows`` (all when None),
        from one forward (with gradients when enabled)."""
        pairs = with_trailing_pad(stack_pairs(batch, rows), self.tokenizer.pad_token_id)
        out = self.model(pairs, 1.0, values=True, logprobs=False)
        return score_after_last_token(out.values, pairs.response_mask).chunk(2)

    def _loss(self, batch: dict[str, Any], rows: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses ``(b,)`` and figures (``(b,)`` each, detached) of ``rows``."""
        chosen, rejected = self.scores(batch, rows)
        margin = None
        if self.rm.margin_scale:
            m = batch["margin"] if rows is None else batch["margin"][rows]
            margin = self.rm.margin_scale * torch.nan_to_num(m.to(chosen.device), nan=0.0)
        losses = bradley_terry_loss(chosen, rejected, margin, self.rm.center_rewards_coefficient)
        c, r = chosen.detach(), rejected.detach()
        return losses, {"loss": losses.detach(), "accuracy": (c > r).float(), "margin": c - r,
                        "mean_reward": (c + r) / 2, "rewards/chosen": c, "rewards/rejected": r}

    def pair_update(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step of the Bradley-Terry loss over the pair batch; returns this rank's batch means
        of the per-pair figures, the gradient norm and the micro-batch size."""
        B = len(batch["key"])
        units = self.update_step.global_sum(pair_units(B, self.device))
        sums: dict[str, Tensor] = {}

        def micro_losses(rows: Tensor):
            losses, stats = self._loss(batch, rows)
            yield pair_mean(losses) * pair_weight(len(rows), units)
            for k, v in stats.items():  # this rank's batch means (the logger averages ranks)
                sums[k] = sums.get(k, 0.0) + v.sum() / B

        with self.update_step.phase() as update:
            one = torch.zeros(1, dtype=torch.long, device=self.device)
            update.measure(lambda: sum(self.scores(batch, one)).sum(), self.length_scale(batch))
            grad_norm = self.update_step.step(torch.arange(B, device=self.device), micro_losses)
        self.step_lr_scheduler()
        return {**{k: float(v) for k, v in sums.items()}, "policy/grad_norm": float(grad_norm),
                "perf/micro_batch_size": float(self.update_step.micro_batch(B))}

    # ---------------------------------------------------------------------------------------
    # Held-out pairs
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def pair_figures(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-pair figures (``(B,)`` each) of the current reward model on a held-out batch."""
        self.model.eval()
        B = len(batch["key"])
        micro = self.update_step.no_grad_micro_batch(B)
        parts = []
        with self.model.lora_compute_copies():
            for s in range(0, B, micro):
                parts.append(self._loss(batch, torch.arange(s, min(s + micro, B), device=self.device))[1])
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _log_figures(self, batch: dict[str, Any], prefix: str) -> None:
        figures = self.pair_figures(batch)
        for k, v in figures.items():
            self.log(f"{prefix}/{k}", v.mean(), batch_size=len(v), sync_dist=self.trainer.world_size > 1,
                     add_dataloader_idx=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_figures(batch, "validation")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:  # a second loader (the test prompts, for policy stages) has nothing to score
            self._log_figures(batch, "test")

    # ---------------------------------------------------------------------------------------
    # Export: adapter + head + tokenizer + manifest
    # ---------------------------------------------------------------------------------------
    def export_adapter(self) -> Optional[Path]:
        """Write the reward model folder (rank 0; atomically), :func:`rlhf_lit.export.export_reward_model`."""
        from rlhf_lit.export import export_reward_model

        log_dir = run_dir(self.trainer)  # a broadcast: every rank must ask
        if not self.trainer.is_global_zero:
            return None
        if not self.output_dir and not log_dir:
            log.warning("no model.output_dir and no logger folder: the reward model is not exported")
            return None
        out = Path(self.output_dir) if self.output_dir else Path(log_dir) / "reward_model"
        cfg, dm = self.policy_config, self.trainer.datamodule
        manifest = {
            "base_model": cfg.base_model, "revision": cfg.revision, "started_from": cfg.sft_adapter,
            "score": "value head on the last hidden state, read after the response's EOS token; the prompt is "
                     "chat-templated with the system prompt below and the generation prompt",
            "system_prompt": getattr(dm, "system_prompt", None),
            "max_prompt_tokens": getattr(dm, "max_prompt_tokens", None),
            "max_response_tokens": getattr(dm, "max_response_tokens", None),
            "trained": {"steps": self.steps_done, "pair_file": getattr(dm, "pair_file", None),
                        "margin_scale": self.rm.margin_scale},
        }
        path = export_reward_model(self.model.peft, POLICY, self.model.value_head, self.tokenizer, out, manifest)
        log.info("exported the reward model to %s", path)
        return path
