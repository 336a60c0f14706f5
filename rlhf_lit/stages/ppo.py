"""PPOModule: the PPO loop for a LoRA policy, as a LightningModule.

One training step is one PPO iteration (CleanRL's outline):

1. collect    — sample ``samples_per_prompt`` responses to each prompt with the policy adapter active
2. score      — the reward backend reads (prompt, response) text
3. evaluate   — old log-probs and values (policy + critic), reference log-probs (reference adapter)
4. shape      — score penalties / normalisation, per-token KL penalty, score on the last token
5. advantages — the configured estimator (``gae``, ``grpo``, ``rloo``, ``reinforce_plus_plus``, ...)
6. update     — ``ppo_epochs`` x shuffled minibatches of clipped policy (+ value, + KL) loss

PPO, GRPO, RLOO and REINFORCE++ differ only by configuration (``configs/algorithms/``).

The maths lives in :mod:`rlhf_lit.algos`, the model and its adapters in :mod:`rlhf_lit.model`,
sampling in :mod:`rlhf_lit.rollout`, the optimizer step in :mod:`rlhf_lit.stages.update_step`;
this file orchestrates and logs.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

log = logging.getLogger(__name__)

from rlhf_lit.algos.advantages import AdvantageInput, get_advantage_estimator
from rlhf_lit.algos.aggregation import agg_units, agg_weight
from rlhf_lit.algos.groups import group_index, zero_signal_groups
from rlhf_lit.algos.kl import adaptive_kl_coef, kl_estimate
from rlhf_lit.algos.losses import clipped_policy_loss, clipped_value_loss, kl_loss, truncated_is_weights
from rlhf_lit.algos.masked import masked_mean, masked_whiten
from rlhf_lit.algos.responses import TruncatedResponse
from rlhf_lit.algos.reward_shaping import (
    RunningMoments, kl_penalized_rewards, normalize_scores, overlong_penalty, penalize_missing_eos,
)
from rlhf_lit.algos.rollout_batch import ResponseBatch, Rollout
from rlhf_lit.algos.rollout_metrics import rollout_metrics
from rlhf_lit.evaluation.stats import distinct_n
from rlhf_lit.model import POLICY, REFERENCE, PolicyConfig, ResponseOutput
from rlhf_lit.parallel import mean_over_ranks
from rlhf_lit.rewards.base import RewardBackend, RewardOutput
from rlhf_lit.rollout import KernelsName, SamplingConfig
from rlhf_lit.stages.base import default_optimizer
from rlhf_lit.stages.policy_stage import PolicyStage
from rlhf_lit.stages.ppo_config import PPOConfig
from rlhf_lit.stages.unscored import UnscoredRollouts
from rlhf_lit.stages.update_step import UpdateStep, check_micro_batch_size
from rlhf_lit.errors import ConfigError


class PPOModule(PolicyStage):
    """PPO with a KL penalty to the frozen SFT adapter, on one shared base model.

    Args:
        policy: Base model, SFT adapter and loading options.
        reward: The reward backend (``class_path``/``init_args``); default: the offline profanity classifier.
        ppo: PPO hyperparameters.
        sampling: Rollout sampling (temperature, top-k/p, lengths).
        eval_sampling: Sampling for validation and test; defaults to ``sampling``.
        rollout_engine: ``hf`` (transformers generate), ``cuda_graph`` (static cache + CUDA graph), or
            ``auto`` (cuda_graph on a GPU when supported, else hf); ``cuda_graph_merged``: cuda_graph
            decoding with the policy LoRA merged into a copy of each bf16 weight, recomputed every
            rollout and freed after it (no LoRA GEMMs per token; ~13 GB more during rollouts on a 7B
            model).
        rollout_kernels: The cuda_graph engines' decode-step glue (norms, RoPE, attention, SiLU,
            and sampling without top-k/top-p): ``triton`` kernels, ``torch`` ops, or ``auto`` (Triton
            where it imports and its kernels pass a self-test on the GPU, else torch ops). With
            ``rollout_engine: hf`` only ``auto`` (an error otherwise); ignored, with a warning, where
            ``auto`` samples with HF generate (the CPU).
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
        extra_stop_tokens: Tokens that end a response besides the tokenizer's EOS, by name (``<|im_end|>``)
            or as the text of one token (``"\\n\\n"``); checked at startup. Not the PAD token (Qwen2.5-Instruct's
            ``<|endoftext|>``).
        seed: Seed of rollout sampling (each data-parallel rank adds its rank).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        reward: Optional[RewardBackend] = None,
        ppo: PPOConfig = PPOConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        eval_sampling: Optional[SamplingConfig] = None,
        rollout_engine: Literal["auto", "hf", "cuda_graph", "cuda_graph_merged"] = "auto",
        rollout_kernels: KernelsName = "auto",
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
                         output_dir, eval_samples_per_prompt, eval_rewards, extra_stop_tokens, seed,
                         rollout_kernels=rollout_kernels)
        self.ppo = ppo
        self.rollout_batch_size = rollout_batch_size
        self.export_every_n_rollouts = export_every_n_rollouts
        self.log_samples, self.samples_every_n_rollouts = log_samples, samples_every_n_rollouts
        self.advantage_estimator = get_advantage_estimator(ppo.adv_estimator)
        self._check_critic()
        minibatch = self._check_batch_shapes()
        self.update_step = UpdateStep(self, ppo.micro_batch_size, ppo.max_grad_norm, minibatch)
        self.kl_coef = ppo.kl_coef
        self.score_moments = RunningMoments()
        self.rollouts_done = 0
        self.unscored = UnscoredRollouts(ppo.max_unscored_rollouts)
        self._every_row_updated = False  # this rollout's, on every rank: then every minibatch has signal

    def _check_critic(self) -> None:
        name, critic = self.advantage_estimator.name, self.policy_config.critic
        if self.advantage_estimator.needs_critic and critic == "none":
            raise ConfigError(f"model.ppo.adv_estimator={name!r} needs a critic, but model.policy.critic is 'none': "
                             f"use 'value_head' or 'adapter', or a critic-free estimator (grpo, rloo, ...)")
        if not self.advantage_estimator.needs_critic and critic != "none":
            log.warning("model.ppo.adv_estimator=%r uses no critic, but model.policy.critic=%r trains one: set "
                        "model.policy.critic: none to save its forward, backward and memory", name, critic)

    def _check_batch_shapes(self) -> int:
        """The minibatch size in responses; each minibatch holds whole groups of a prompt's responses."""
        B, n, k = self.rollout_batch_size, self.ppo.samples_per_prompt, self.ppo.num_minibatches
        if B % k:
            raise ConfigError(f"data.batch_size={B} is not divisible by model.ppo.num_minibatches={k}"
                             + (" (minibatches hold whole groups of samples_per_prompt responses)" if n > 1 else ""))
        check_micro_batch_size(self.ppo.micro_batch_size, B * n // k,
                               f"= data.batch_size {B} x samples_per_prompt {n} / num_minibatches {k}")
        return B * n // k

    @property
    def algorithm(self) -> str:
        """The algorithm of the run, for the report: the estimator and what sets it apart. Evaluating
        a checkpoint, the algorithm it was trained with (recorded in it), whatever the config says."""
        return getattr(self, "_trained_algorithm", None) or self._configured_algorithm()

    def _configured_algorithm(self) -> str:
        cfg = self.ppo
        names = {"gae": "PPO", "grpo": "GRPO" if cfg.norm_adv_by_std else "Dr. GRPO", "rloo": "RLOO",
                 "reinforce_plus_plus": "REINFORCE++", "reinforce_plus_plus_baseline": "REINFORCE++-baseline"}
        name = names.get(cfg.adv_estimator, cfg.adv_estimator)
        return (f"{name} (adv_estimator={cfg.adv_estimator}, samples_per_prompt={cfg.samples_per_prompt}, "
                f"loss_agg_mode={cfg.loss_agg_mode}, kl_in={cfg.kl_in}, critic={self.policy_config.critic})")

    def eval_micro_batch(self, rows: int) -> int:
        return self.update_step.no_grad_micro_batch(rows)

    # ---------------------------------------------------------------------------------------
    # One iteration
    # ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.device.type == "cuda":  # perf/peak_mem_* are this iteration's peaks
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self._clock()
        rollout, metrics, texts = self.make_rollout(batch)
        # Samples scored, and rows with a token to learn from (scored, not filtered), over all ranks.
        counts = torch.stack([rollout.valid.sum(), rollout.response_mask.any(-1).sum()]).float()
        n_scored, n_updated = (int(c) for c in self.update_step.global_sum(counts).tolist())
        self._every_row_updated = n_updated == rollout.valid.numel() * self.trainer.world_size
        self.unscored.check(n_scored, self.rollouts_done + 1, self.reward.name, metrics)
        learn = n_updated > 0  # no signal (nothing scored, or all filtered): no update, no schedule step
        t = self._clock()
        if learn:
            metrics |= self.ppo_update(rollout)
        metrics["time/update_s"] = self._clock() - t
        metrics["time/iteration_s"] = self._clock() - t0
        if self.device.type == "cuda":
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]  # the lr this update used: read before stepping
        if learn:
            self._adapt_kl_coef(metrics["objective/kl"], rollout)
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()
        self.rollouts_done += 1
        self._log_rollout(metrics, batch, texts, rollout)
        if self.export_every_n_rollouts and self.rollouts_done % self.export_every_n_rollouts == 0:
            self.export_adapter()
        self.unscored.stop_if_too_many(self.rollouts_done, self.reward.name)

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> tuple[Rollout, dict[str, float], list[str]]:
        """Steps 1-5: collect, score, evaluate, shape rewards, advantages."""
        T, n = self.sampling.temperature, self.ppo.samples_per_prompt
        groups = group_index(batch["input_ids"].shape[0], n, device=self.device)
        batch = repeat_prompts(batch, n)
        timings = {}
        t = self._clock()
        responses, texts = self.sample(batch, self.sampling)                              # 1. collect
        sampler_logprobs = self.engine.last_sampler_logprobs
        self.engine.release()
        timings["time/rollout_s"] = self._clock() - t

        t = self._clock()
        reward_out = self.reward(batch["prompt"], texts)                                  # 2. score
        timings["time/reward_s"] = self._clock() - t

        t = self._clock()
        sampled = ResponseBatch(batch["input_ids"], batch["attention_mask"], responses.response_ids,
                                responses.response_mask)
        micro = self.update_step.no_grad_micro_batch(sampled.query_ids.shape[0],
                                                     sampled.query_ids.shape[1] + sampled.response_ids.shape[1])
        policy_out = self.model.evaluate(sampled, T, POLICY, micro, entropy=True)        # 3. evaluate
        ref_out = self.model.evaluate(sampled, T, REFERENCE, micro)
        timings["time/ref_values_s"] = self._clock() - t
        if self.device.type == "cuda":  # the experience phases (sampling, scoring, evaluation) alone
            timings["perf/peak_mem_rollout_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30

        rollout, kl, extra = self.shape_rewards(sampled, responses, reward_out, policy_out, ref_out, groups,
                                                sampler_logprobs)                           # 4. shape
        rollout = self.compute_advantages(rollout)                                         # 5. advantages

        metrics = rollout_metrics(
            raw_scores=reward_out.scores.to(self.device), scores=rollout.scores, valid=rollout.valid, kl=kl,
            kl_coef=self.kl_coef, entropy=policy_out.entropy, response_mask=responses.response_mask,
            has_stop=responses.has_stop, values=policy_out.values, returns=rollout.returns,
            update_mask=rollout.response_mask, rollout_seconds=timings["time/rollout_s"],
            components=reward_out.components, kl_in_reward=self.ppo.kl_in == "reward",
        )
        return rollout, metrics | extra | timings | dict(reward_out.metrics), texts

    def shape_rewards(self, sampled: ResponseBatch, responses: TruncatedResponse, reward_out: RewardOutput,
                      policy_out: ResponseOutput, ref_out: ResponseOutput, groups: Tensor,
                      sampler_logprobs: Optional[Tensor] = None) -> tuple[Rollout, Tensor, dict[str, float]]:
        """Scores -> shaped scores -> per-token rewards ``-beta * kl_t + [t = T] * score`` (the KL term
        only with ``kl_in: reward``); decides which tokens get an update.

        Returns the rollout (advantages and returns still zero), the per-token KL ``(B, R)`` and
        metrics of the shaping (zero-signal groups, sampler gap).
        """
        cfg, r_mask, has_stop = self.ppo, responses.response_mask, responses.has_stop
        valid = reward_out.valid.to(self.device)
        scores = penalize_missing_eos(reward_out.scores.to(self.device), has_stop, cfg.missing_eos_penalty)
        if cfg.overlong_buffer is not None:
            scores = scores + overlong_penalty(r_mask.sum(-1), self.sampling.max_new_tokens, cfg.overlong_buffer,
                                               cfg.overlong_penalty)
        zero_signal = zero_signal_groups(scores, groups, valid)
        if cfg.normalize_scores:
            # Statistics over every rank's valid scores, so all ranks normalise alike.
            all_scores, all_valid = self.all_gather(scores).reshape(-1), self.all_gather(valid).reshape(-1)
            self.score_moments.update(all_scores[all_valid])
        scores = normalize_scores(scores, self.score_moments if cfg.normalize_scores else None, cfg.score_clip)

        update = valid                               # unscored samples get no update
        if cfg.mask_truncated:
            update = update & has_stop
        if cfg.filter_zero_signal_groups:
            update = update & ~zero_signal
        mask = r_mask & update.unsqueeze(-1)
        logprobs = policy_out.logprobs * r_mask
        ref_logprobs = ref_out.logprobs * r_mask
        values = policy_out.values * r_mask if policy_out.values is not None else torch.zeros_like(logprobs)
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * r_mask
        beta = self.kl_coef if cfg.kl_in == "reward" else 0.0
        rewards = kl_penalized_rewards(scores, kl, mask, responses.last_index, beta)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        extra = {"objective/frac_reward_zero_std": float(zero_signal.float().mean()),
                 "objective/update_fraction": float(update.float().mean())}
        is_weights = torch.ones_like(logprobs)
        if sampler_logprobs is not None:
            gap = (logprobs - sampler_logprobs) * r_mask
            extra["rollout/logprob_gap_mean"] = float(masked_mean(gap.abs(), r_mask))
            extra["rollout/logprob_gap_max"] = float(gap.abs().max())
            if cfg.rollout_is != "none":
                is_weights = truncated_is_weights(logprobs, sampler_logprobs, r_mask, cfg.rollout_is, cfg.rollout_is_cap)
                extra["rollout/is_weight_mean"] = float(masked_mean(is_weights, r_mask))
        elif cfg.rollout_is != "none":
            raise RuntimeError(f"model.ppo.rollout_is={cfg.rollout_is!r}: the rollout engine {self.engine.name} "
                               f"does not record the log-probs it sampled with")
        zeros = torch.zeros_like(rewards)
        rollout = Rollout(sampled.query_ids, sampled.query_mask, sampled.response_ids, mask, logprobs, ref_logprobs,
                          values, scores, rewards, zeros, zeros, valid, groups, is_weights)
        return rollout, kl, extra

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """The configured estimator (``model.ppo.adv_estimator``) on the shaped rewards."""
        values = rollout.values if self.advantage_estimator.needs_critic else None
        x = AdvantageInput(rollout.rewards, values, rollout.response_mask, rollout.scores, rollout.group_index)
        advantages, returns = self.advantage_estimator.fn(x, self.ppo)
        return rollout._replace(advantages=advantages, returns=returns)

    # ---------------------------------------------------------------------------------------
    # Update
    # ---------------------------------------------------------------------------------------
    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """Step 6: epochs x shuffled minibatches of clipped policy and value losses."""
        cfg = self.ppo
        B, n = rollout.query_ids.shape[0], cfg.samples_per_prompt
        mb_size = B // cfg.num_minibatches
        stats: dict[str, list[Tensor]] = {}
        with self.update_step.phase() as update:
            update.measure(lambda: self._probe_loss(rollout), self._length_scale(rollout))
            for epoch in range(cfg.ppo_epochs):
                # Shuffle whole groups: a prompt's responses stay in one minibatch (n = 1: rows).
                perm = (torch.randperm(B // n, device=self.device)[:, None] * n
                        + torch.arange(n, device=self.device)).reshape(-1)
                starts = range(0, B, mb_size)
                units, signal = self.update_step.minibatch_units(
                    [rollout.response_mask[perm[s:s + mb_size]] for s in starts],
                    lambda mask: agg_units(mask, cfg.loss_agg_mode), self._every_row_updated)
                for start, has_signal, global_units in zip(starts, signal, units):
                    if not has_signal:  # no token to learn from: no step (momentum alone would move the weights)
                        continue
                    self._minibatch_step(rollout, perm[start:start + mb_size], stats, global_units)
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

    def _minibatch_step(self, rollout: Rollout, mb_idx: Tensor, stats: dict[str, list[Tensor]],
                        global_units: Tensor) -> None:
        """One optimizer step on the minibatch ``mb_idx``: clipped policy loss (+ ``vf_coef`` x
        clipped value loss with a critic, + ``beta`` x KL with ``kl_in: loss``), each aggregated over
        the minibatch by ``loss_agg_mode``, whose denominator over all ranks is ``global_units``."""
        cfg, T, mode = self.ppo, self.sampling.temperature, self.ppo.loss_agg_mode
        L = self.sampling.max_new_tokens  # seq-mean-token-sum-norm's constant
        local_units = agg_units(rollout.response_mask[mb_idx], mode)
        is_weights = cfg.rollout_is != "none"
        sums: dict[str, Tensor] = {}

        def micro_losses(rows: Tensor):
            mb = rollout.select(rows)
            w = agg_weight(mb.response_mask, global_units, mode)
            terms: dict[str, Tensor] = {}
            for out in self.model.training_passes(mb.batch, T):
                loss = None
                if out.logprobs is not None:
                    pg = clipped_policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.eps_low,
                                             mode, cfg.eps_high, cfg.dual_clip_c,
                                             mb.is_weights if is_weights else None, L)
                    loss = pg.loss
                    terms |= {"loss/policy_avg": pg.loss, "policy/approxkl_avg": pg.approx_kl,
                              "policy/clipfrac_avg": pg.clipfrac, "val/ratio": pg.ratio_mean,
                              "val/ratio_var": pg.ratio_var}
                    if cfg.dual_clip_c is not None:
                        terms["policy/dual_clipfrac_avg"] = pg.dual_clipfrac
                    if cfg.kl_in == "loss":
                        kl = kl_loss(out.logprobs, mb.ref_logprobs, mb.response_mask, cfg.kl_estimator, mode, L)
                        loss = loss + self.kl_coef * kl
                        terms["loss/kl_avg"] = kl
                if out.values is not None:
                    vf = clipped_value_loss(out.values, mb.values, mb.returns, mb.response_mask, cfg.vf_clip_eps,
                                            mode, L)
                    loss = cfg.vf_coef * vf.loss if loss is None else loss + cfg.vf_coef * vf.loss
                    terms |= {"loss/value_avg": vf.loss, "val/clipfrac_avg": vf.clipfrac}
                yield loss * w
            # Statistics: this rank's minibatch (the logger averages ranks).
            w_stats = agg_weight(mb.response_mask, local_units, mode)
            for k, v in terms.items():
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
        metrics["response/distinct_2"] = distinct_n(texts, 2)  # falls when the policy collapses onto a template
        metrics["episode"] = float(self.rollouts_done * self.rollout_batch_size * self.ppo.samples_per_prompt
                                   * self.trainer.world_size)
        metrics["rollout"] = float(self.rollouts_done)
        # Means over the ranks in one collective (sync_dist makes one all-reduce per scalar), and
        # metrics.jsonl gets the same means as TensorBoard.
        metrics = mean_over_ranks(metrics)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=rollout.query_ids.shape[0])
        self._run_log.append_metrics(self.rollouts_done, metrics)
        if self.log_samples and self.rollouts_done % self.samples_every_n_rollouts == 0:
            self._run_log.samples(self.rollouts_done, batch["prompt"], texts, rollout.scores.tolist(), self.log_samples)

    # ---------------------------------------------------------------------------------------
    # Checkpoint state
    # ---------------------------------------------------------------------------------------
    def stage_state(self) -> dict[str, Any]:
        return {"kl_coef": float(self.kl_coef), "score_moments": self.score_moments.state_dict(),
                "rollouts_done": self.rollouts_done, "unscored": self.unscored.state_dict(),
                "algorithm": self.algorithm}

    def resume_settings(self) -> dict[str, Any]:
        return super().resume_settings() | {"model.ppo.kl_coef": self.ppo.kl_coef}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        trained, configured = state.get("algorithm"), self._configured_algorithm()
        if trained and trained != configured:
            fitting = self._trainer is not None and self.trainer.state.fn == "fit"
            log.warning("this checkpoint was trained with %s; the config describes %s%s", trained, configured,
                        ": training goes on with the config's" if fitting else
                        ": the report names the checkpoint's (give the run's config, e.g. --config "
                        "configs/algorithms/<name>.yaml, to evaluate it with the settings it was trained with)")
            if not fitting:
                self._trained_algorithm = trained
        # The coefficient is the config's unless the adaptive controller carries one on (a kl_coef
        # given on resume restarts the controller from it).
        if self.ppo.adaptive_kl and not self.setting_changed_on_resume("model.ppo.kl_coef"):
            self.kl_coef = float(state.get("kl_coef", self.kl_coef))
        self.unscored.load_state_dict(state.get("unscored", {}))
        if "score_moments" in state:
            self.score_moments.load_state_dict(state["score_moments"])
        self.rollouts_done = int(state.get("rollouts_done", 0))


def repeat_prompts(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """Each prompt of the batch ``n`` times in a row (tensors and lists alike): the rows of a group."""
    if n == 1:
        return batch
    return {k: v.repeat_interleave(n, 0) if isinstance(v, Tensor) else [x for x in v for _ in range(n)]
            for k, v in batch.items()}
