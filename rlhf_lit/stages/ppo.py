"""PPOModule: the PPO loop for a LoRA policy, as a LightningModule.

One training step is one PPO iteration (CleanRL's outline):

1. collect    — sample responses to a batch of prompts with the policy adapter active
2. score      — the reward backend reads (prompt, response) text
3. evaluate   — old log-probs and values (policy + critic), reference log-probs (reference adapter)
4. shape      — score penalties / normalisation, per-token KL penalty, score on the last token
5. advantages — the configured estimator (``gae``)
6. update     — ``ppo_epochs`` x shuffled minibatches of clipped policy + value loss

The maths lives in :mod:`rlhf_lit.algos`, the model and its adapters in :mod:`rlhf_lit.model`,
sampling in :mod:`rlhf_lit.rollout`, the optimizer step in :mod:`rlhf_lit.stages.update_step`;
this file orchestrates and logs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from rlhf_lit.algos.advantages import AdvantageInput, get_advantage_estimator
from rlhf_lit.algos.aggregation import agg_units, agg_weight
from rlhf_lit.algos.kl import adaptive_kl_coef, kl_estimate
from rlhf_lit.algos.losses import clipped_policy_loss, clipped_value_loss
from rlhf_lit.algos.masked import masked_whiten
from rlhf_lit.algos.responses import TruncatedResponse
from rlhf_lit.algos.reward_shaping import RunningMoments, kl_penalized_rewards, normalize_scores, penalize_missing_eos
from rlhf_lit.algos.rollout_batch import ResponseBatch, Rollout
from rlhf_lit.algos.rollout_metrics import rollout_metrics
from rlhf_lit.model import POLICY, REFERENCE, PolicyConfig, ResponseOutput
from rlhf_lit.rewards.base import RewardBackend, RewardOutput
from rlhf_lit.rollout import SamplingConfig
from rlhf_lit.stages.base import default_optimizer
from rlhf_lit.stages.policy_stage import PolicyStage
from rlhf_lit.stages.ppo_config import PPOConfig
from rlhf_lit.stages.update_step import UpdateStep, check_micro_batch_size


class PPOModule(PolicyStage):
    """PPO with a KL penalty to the frozen SFT adapter, on one shared base model.

    Args:
        policy: Base model, SFT adapter and loading options.
        reward: The reward backend (``class_path``/``init_args``); default: the offline profanity classifier.
        ppo: PPO hyperparameters.
        sampling: Rollout sampling (temperature, top-k/p, lengths).
        eval_sampling: Sampling for validation and test; defaults to ``sampling``.
        rollout_engine: ``hf`` (transformers generate), ``cuda_graph`` (static cache + CUDA graph), or
            ``auto`` (cuda_graph on a GPU when supported, else hf).
        optimizer: Optimizer over the policy adapter, the value head and (with ``critic: adapter``) the
            critic adapter.
        lr_scheduler: Optional scheduler, stepped once per rollout.
        rollout_batch_size: Prompts per rollout; linked to ``data.batch_size`` by the CLI.
        output_dir: Where the trained policy adapter is exported (PEFT folder); default ``<log dir>/adapter``.
        export_every_n_rollouts: Also export the adapter every N rollouts (0: only at the end of fit).
        log_samples: Sample (prompt, response, score) rows written to TensorBoard per rollout.
        samples_every_n_rollouts: How often samples are written.
        eval_samples_per_prompt: Responses sampled per test prompt and adapter.
        eval_rewards: Extra reward backends that only score test samples (each ``class_path``/``init_args``,
            distinct ``name``s), reported beside the configured reward; never used for training.
        extra_stop_tokens: Tokens that end a response besides the tokenizer's EOS (e.g. ``<|endoftext|>``
            for a base model).
        seed: Seed of rollout sampling (each data-parallel rank adds its rank).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        reward: Optional[RewardBackend] = None,
        ppo: PPOConfig = PPOConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        eval_sampling: Optional[SamplingConfig] = None,
        rollout_engine: Literal["auto", "hf", "cuda_graph"] = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        rollout_batch_size: int = 8,
        output_dir: Optional[str] = None,
        export_every_n_rollouts: int = 0,
        log_samples: int = 4,
        samples_every_n_rollouts: int = 1,
        eval_samples_per_prompt: int = 1,
        eval_rewards: Optional[list[RewardBackend]] = None,
        extra_stop_tokens: Optional[list[str]] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, reward, sampling, eval_sampling, rollout_engine, optimizer, lr_scheduler,
                         output_dir, eval_samples_per_prompt, eval_rewards, extra_stop_tokens, seed)
        self.ppo = ppo
        self.rollout_batch_size = rollout_batch_size
        self.export_every_n_rollouts = export_every_n_rollouts
        self.log_samples, self.samples_every_n_rollouts = log_samples, samples_every_n_rollouts
        self.advantage_estimator = get_advantage_estimator(ppo.adv_estimator)
        minibatch = self._check_batch_shapes()
        self.update_step = UpdateStep(self, ppo.micro_batch_size, ppo.max_grad_norm, minibatch)
        self.kl_coef = ppo.kl_coef
        self.score_moments = RunningMoments()
        self.rollouts_done = 0

    def _check_batch_shapes(self) -> int:
        B, n = self.rollout_batch_size, self.ppo.num_minibatches
        if B % n:
            raise ValueError(f"data.batch_size={B} is not divisible by model.ppo.num_minibatches={n}")
        check_micro_batch_size(self.ppo.micro_batch_size, B // n,
                               f"= data.batch_size {B} / num_minibatches {n}")
        return B // n

    def eval_micro_batch(self, rows: int) -> int:
        return self.update_step.micro_batch(rows)

    # ---------------------------------------------------------------------------------------
    # One iteration
    # ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.device.type == "cuda":  # perf/peak_mem_* are this iteration's peaks
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self._clock()
        rollout, metrics, texts = self.make_rollout(batch)
        t = self._clock()
        metrics |= self.ppo_update(rollout)
        metrics["time/update_s"] = self._clock() - t
        metrics["time/iteration_s"] = self._clock() - t0
        if self.device.type == "cuda":
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._adapt_kl_coef(metrics["objective/kl"], rollout)
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self.rollouts_done += 1
        self._log_rollout(metrics, batch, texts, rollout)
        if self.export_every_n_rollouts and self.rollouts_done % self.export_every_n_rollouts == 0:
            self.export_adapter()

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> tuple[Rollout, dict[str, float], list[str]]:
        """Steps 1-5: collect, score, evaluate, shape rewards, advantages."""
        T = self.sampling.temperature
        timings = {}
        t = self._clock()
        responses, texts = self.sample(batch, self.sampling)                              # 1. collect
        self.engine.release()
        timings["time/rollout_s"] = self._clock() - t

        t = self._clock()
        reward_out = self.reward(batch["prompt"], texts)                                  # 2. score
        timings["time/reward_s"] = self._clock() - t

        t = self._clock()
        sampled = ResponseBatch(batch["input_ids"], batch["attention_mask"], responses.response_ids,
                                responses.response_mask)
        micro = self.update_step.micro_batch(sampled.query_ids.shape[0])
        policy_out = self.model.evaluate(sampled, T, POLICY, micro, entropy=True)        # 3. evaluate
        ref_out = self.model.evaluate(sampled, T, REFERENCE, micro)
        timings["time/ref_values_s"] = self._clock() - t
        if self.device.type == "cuda":  # the experience phases (sampling, scoring, evaluation) alone
            timings["perf/peak_mem_rollout_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30

        rollout, kl = self.shape_rewards(sampled, responses, reward_out, policy_out, ref_out)   # 4. shape
        rollout = self.compute_advantages(rollout)                                             # 5. advantages

        metrics = rollout_metrics(
            raw_scores=reward_out.scores.to(self.device), scores=rollout.scores, valid=rollout.valid, kl=kl,
            kl_coef=self.kl_coef, entropy=policy_out.entropy, response_mask=responses.response_mask,
            has_stop=responses.has_stop, values=rollout.values, returns=rollout.returns,
            update_mask=rollout.response_mask, rollout_seconds=timings["time/rollout_s"],
            components=reward_out.components,
        )
        return rollout, metrics | timings | dict(reward_out.metrics), texts

    def shape_rewards(self, sampled: ResponseBatch, responses: TruncatedResponse, reward_out: RewardOutput,
                      policy_out: ResponseOutput, ref_out: ResponseOutput) -> tuple[Rollout, Tensor]:
        """Scores -> shaped scores -> per-token rewards ``-beta * kl_t + [t = T] * score``.

        Returns the rollout (advantages and returns still zero) and the per-token KL ``(B, R)``.
        """
        cfg, r_mask = self.ppo, responses.response_mask
        valid = reward_out.valid.to(self.device)
        scores = penalize_missing_eos(reward_out.scores.to(self.device), responses.has_stop, cfg.missing_eos_penalty)
        if cfg.normalize_scores:
            # Statistics over every rank's valid scores, so all ranks normalise alike.
            all_scores, all_valid = self.all_gather(scores).reshape(-1), self.all_gather(valid).reshape(-1)
            self.score_moments.update(all_scores[all_valid])
        scores = normalize_scores(scores, self.score_moments if cfg.normalize_scores else None, cfg.score_clip)

        mask = r_mask & valid.unsqueeze(-1)  # unscored samples get no update
        logprobs = policy_out.logprobs * r_mask
        ref_logprobs = ref_out.logprobs * r_mask
        values = policy_out.values * r_mask
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * r_mask
        rewards = kl_penalized_rewards(scores, kl, mask, responses.last_index, self.kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        zeros = torch.zeros_like(rewards)
        rollout = Rollout(sampled.query_ids, sampled.query_mask, sampled.response_ids, mask, logprobs, ref_logprobs,
                          values, scores, rewards, zeros, zeros, valid)
        return rollout, kl

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """The configured estimator (``model.ppo.adv_estimator``) on the shaped rewards."""
        x = AdvantageInput(rollout.rewards, rollout.values, rollout.response_mask, rollout.scores)
        advantages, returns = self.advantage_estimator.fn(x, self.ppo)
        return rollout._replace(advantages=advantages, returns=returns)

    # ---------------------------------------------------------------------------------------
    # Update
    # ---------------------------------------------------------------------------------------
    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """Step 6: epochs x shuffled minibatches of clipped policy and value losses."""
        cfg = self.ppo
        B = rollout.query_ids.shape[0]
        mb_size = B // cfg.num_minibatches
        stats: dict[str, list[Tensor]] = {}
        with self.update_step.phase() as update:
            update.measure(lambda: self._probe_loss(rollout), self._length_scale(rollout))
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, device=self.device)
                for start in range(0, B, mb_size):
                    self._minibatch_step(rollout, perm[start:start + mb_size], stats)
                    if self._kl_stop(stats):
                        break
                if self._kl_stop(stats):
                    break
        # One device-to-host copy for all statistics: no sync inside the loop, so the host queues
        # the next minibatch while the GPU finishes this one.
        stats = {k: torch.stack(v).tolist() for k, v in stats.items()}
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        # Before any update the new policy is the old one: this must read 1.0 (a silent-bug check).
        out["val/ratio_first_minibatch"] = stats["val/ratio"][0]
        out["policy/epochs_done"] = float(epoch + 1)
        out["policy/updates"] = float(len(stats["loss/policy_avg"]))
        out["perf/micro_batch_size"] = float(self.update_step.micro_batch(mb_size))
        return out

    def _minibatch_step(self, rollout: Rollout, mb_idx: Tensor, stats: dict[str, list[Tensor]]) -> None:
        """One optimizer step on the minibatch ``mb_idx``: clipped policy loss + ``vf_coef`` x
        clipped value loss, aggregated over the minibatch (``loss_agg_mode``)."""
        cfg, T = self.ppo, self.sampling.temperature
        local_units = agg_units(rollout.response_mask[mb_idx], cfg.loss_agg_mode)
        global_units = self.update_step.global_sum(local_units)
        sums: dict[str, Tensor] = {}

        def micro_losses(rows: Tensor):
            mb = rollout.select(rows)
            w = agg_weight(mb.response_mask, global_units, cfg.loss_agg_mode)
            pg = vf = None
            for out in self.model.training_passes(mb.batch, T):
                loss = None
                if out.logprobs is not None:
                    pg = clipped_policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                             cfg.clip_eps, cfg.loss_agg_mode)
                    loss = pg.loss
                if out.values is not None:
                    vf = clipped_value_loss(out.values, mb.values, mb.returns, mb.response_mask, cfg.vf_clip_eps,
                                            cfg.loss_agg_mode)
                    loss = cfg.vf_coef * vf.loss if loss is None else loss + cfg.vf_coef * vf.loss
                yield loss * w
            # Statistics: this rank's minibatch (the logger averages ranks).
            w_stats = agg_weight(mb.response_mask, local_units, cfg.loss_agg_mode)
            for k, v in (("loss/policy_avg", pg.loss), ("loss/value_avg", vf.loss),
                         ("policy/approxkl_avg", pg.approx_kl), ("policy/clipfrac_avg", pg.clipfrac),
                         ("val/clipfrac_avg", vf.clipfrac), ("val/ratio", pg.ratio_mean),
                         ("val/ratio_var", pg.ratio_var)):
                sums[k] = sums.get(k, 0.0) + v.detach() * w_stats

        sums["policy/grad_norm"] = self.update_step.step(mb_idx, micro_losses)
        for k, v in sums.items():
            stats.setdefault(k, []).append(v.detach().float().reshape(()))

    def _probe_loss(self, rollout: Rollout) -> Tensor:
        """One sequence's first training pass (the policy's, the larger one): ``micro_batch_size: auto``."""
        one = rollout.select(torch.zeros(1, dtype=torch.long, device=self.device))
        out = next(iter(self.model.training_passes(one.batch, self.sampling.temperature)))
        return out.logprobs.sum() + (out.values.sum() if out.values is not None else 0.0)

    def _length_scale(self, rollout: Rollout) -> float:
        """From this rollout's sequence length to the longest possible one."""
        P, R = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
        return (P + max(R, self.sampling.max_new_tokens)) / (P + R)

    def _kl_stop(self, stats: dict[str, list[Tensor]]) -> bool:
        """Early stop: the last minibatch's approx KL (averaged over ranks, so all ranks agree) went
        past ``target_approx_kl``; a host sync, only when it is set."""
        target = self.ppo.target_approx_kl
        if target is None or not stats:
            return False
        approx_kl = self.update_step.global_sum(stats["policy/approxkl_avg"][-1]) / self.trainer.world_size
        return float(approx_kl) > target

    # ---------------------------------------------------------------------------------------
    # After the update
    # ---------------------------------------------------------------------------------------
    def _adapt_kl_coef(self, kl: float, rollout: Rollout) -> None:
        if not self.ppo.adaptive_kl:
            return
        n = rollout.query_ids.shape[0] * self.trainer.world_size
        global_kl = float(self.all_gather(torch.tensor(kl, device=self.device)).mean())
        self.kl_coef = adaptive_kl_coef(self.kl_coef, global_kl, self.ppo.kl_target, self.ppo.kl_horizon, n)

    def _log_rollout(self, metrics: dict[str, float], batch: dict[str, Any], texts: list[str],
                     rollout: Rollout) -> None:
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["episode"] = float(self.rollouts_done * self.rollout_batch_size * self.trainer.world_size)
        metrics["rollout"] = float(self.rollouts_done)
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=self.trainer.world_size > 1,
                      batch_size=rollout.query_ids.shape[0])
        self._run_log.append_metrics(self.rollouts_done, metrics)
        if self.log_samples and self.rollouts_done % self.samples_every_n_rollouts == 0:
            self._run_log.samples(self.rollouts_done, batch["prompt"], texts, rollout.scores.tolist(), self.log_samples)

    # ---------------------------------------------------------------------------------------
    # Checkpoint state
    # ---------------------------------------------------------------------------------------
    def stage_state(self) -> dict[str, Any]:
        return {"kl_coef": float(self.kl_coef), "score_moments": self.score_moments.state_dict(),
                "rollouts_done": self.rollouts_done}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
        self.rollouts_done = int(state.get("rollouts_done", 0))
