"""PPOModule: the PPO loop for a LoRA policy, as a LightningModule.

One training step is one PPO iteration:

1. rollout    — sample responses to a batch of prompts with the policy adapter active
2. score      — the reward backend reads (prompt, response) text
3. evaluate   — old log-probs (policy), values (critic), reference log-probs (reference adapter)
4. advantages — per-token KL penalty + score on the last token, then GAE (``ppo.py``)
5. update     — ``ppo_epochs`` x shuffled minibatches of clipped policy + value loss

The maths lives in :mod:`rlhf_lit.ppo`, adapters in :mod:`rlhf_lit.policy`, sampling in
:mod:`rlhf_lit.rollout`; this file only orchestrates and logs.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from rlhf_lit import ppo
from rlhf_lit.evaluation import TestEvaluator, check_eval_rewards
from rlhf_lit.lora_precision import LoraComputeCopies
from rlhf_lit.policy import (
    CRITIC, POLICY, REFERENCE, PolicyConfig, PolicyModel, ResponseOutput, check_adapter_path, resolve_model_path,
    tokenizer_path,
)
from rlhf_lit.ppo import RunningMoments
from rlhf_lit.rewards.base import RewardBackend
from rlhf_lit.rollout import HFGenerate, RolloutEngine, SamplingConfig
from rlhf_lit.run_logging import RunLog, run_dir

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """PPO hyperparameters; defaults follow TRL 1.12 and the N+ implementation-details paper."""

    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch (one optimizer step each); must divide the rollout batch."""
    micro_batch_size: Union[int, Literal["auto"], None] = None
    """Sequences per forward/backward inside a minibatch (gradient accumulation); None = the whole
    minibatch. Lower it to save memory: losses and gradients are the same. ``auto``: the largest
    divisor of the minibatch whose activations fit in 80% of the GPU's free memory, measured with
    one sequence at the first update (on the CPU: the whole minibatch)."""
    clip_eps: float = 0.2
    """Policy ratio clip epsilon."""
    vf_clip_eps: float = 0.2
    """Value clip range around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log p_ref; k3 = (r - 1) - log r."""
    adaptive_kl: bool = False
    """Adapt beta to reach kl_target (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller."""
    whiten_advantages: bool = True
    """Normalise advantages over the batch (always on in the literature)."""
    whiten_rewards: bool = False
    """Normalise per-token rewards over the batch (off: it tends to shorten responses)."""
    normalize_scores: bool = False
    """Divide scores by a running std and subtract a running mean (statistics kept in checkpoints)."""
    score_clip: Optional[float] = None
    """Clip (normalised) scores to [-score_clip, score_clip]."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of responses that hit max_new_tokens without a stop token."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm (None: no clipping; the norm is logged either way)."""
    target_approx_kl: Optional[float] = None
    """Stop this rollout's remaining PPO epochs once a minibatch's approx KL exceeds it."""

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("model.ppo.ppo_epochs and model.ppo.num_minibatches must be >= 1")


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (the PPO custom)."""
    return torch.optim.AdamW(params, lr=1e-5, eps=1e-5, weight_decay=0.0)


class PPOModule(LightningModule):
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
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained weights; checked in on_load_checkpoint
        self.policy_config, self.ppo, self.sampling = policy, ppo, sampling
        self.eval_sampling = eval_sampling or sampling
        if reward is None:
            from rlhf_lit.rewards.profanity import Profanity

            reward = Profanity()
        self.reward = reward
        self.rollout_engine_name = rollout_engine
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.rollout_batch_size = rollout_batch_size
        self.output_dir = output_dir
        self.export_every_n_rollouts = export_every_n_rollouts
        self.log_samples, self.samples_every_n_rollouts = log_samples, samples_every_n_rollouts
        self.eval_samples_per_prompt = eval_samples_per_prompt
        self.eval_rewards = check_eval_rewards(eval_rewards)
        self.extra_stop_tokens = list(extra_stop_tokens or [])
        self.seed = seed
        self._check_batch_shapes()
        check_adapter_path(policy.sft_adapter, "sft_adapter")
        check_adapter_path(policy.policy_adapter, "policy_adapter")

        self.model: Optional[PolicyModel] = None
        self.tokenizer = None
        self.engine: Optional[RolloutEngine] = None
        self.kl_coef = ppo.kl_coef
        self.score_moments = RunningMoments()
        self.rollouts_done = 0
        self._pending_rng: Optional[dict] = None
        self._auto_micro: Optional[int] = None  # micro_batch_size: auto, measured at the first update
        self._run_log: Optional[RunLog] = None

    def _check_batch_shapes(self) -> None:
        B, n = self.rollout_batch_size, self.ppo.num_minibatches
        if B % n:
            raise ValueError(f"data.batch_size={B} is not divisible by model.ppo.num_minibatches={n}")
        mb, micro = B // n, self.ppo.micro_batch_size
        if micro == "auto":
            return
        if isinstance(micro, str):
            raise ValueError(f"model.ppo.micro_batch_size={micro!r}: expected a positive integer that divides the "
                             f"minibatch size {mb}, 'auto' or null")
        if micro is not None and (micro < 1 or mb % micro):
            raise ValueError(f"model.ppo.micro_batch_size={micro} must divide the minibatch size {mb} "
                             f"(= data.batch_size {B} / num_minibatches {n})")

    # ---------------------------------------------------------------------------------------
    # Setup
    # ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # runs for fit and for test: build once
            return
        from transformers import AutoTokenizer

        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        cfg = self.policy_config
        tok_name = tokenizer_path(cfg.base_model, cfg.sft_adapter)
        self.tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(tok_name), trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision if tok_name == cfg.base_model else None,
        )
        self.model = PolicyModel(cfg, device)
        rows = self.model.peft.get_base_model().get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:  # sampled ids past the table would fail deep inside a CUDA kernel
            raise ValueError(f"the tokenizer {tok_name!r} has {len(self.tokenizer)} tokens but the model's embedding "
                             f"{rows} rows (base_model={cfg.base_model!r}, sft_adapter={cfg.sft_adapter!r}): an adapter "
                             f"trained with added tokens must carry its embeddings and ship its tokenizer")
        self.reward.setup(device)
        for backend in self.eval_rewards:
            backend.setup(device)
        self.engine = self._make_engine(device)

    def _make_engine(self, device: torch.device) -> RolloutEngine:
        name = self.rollout_engine_name
        if name == "auto":
            name = "cuda_graph" if device.type == "cuda" else "hf"
        if name == "hf":
            return HFGenerate()
        if device.type != "cuda":
            raise ValueError("model.rollout_engine=cuda_graph needs a CUDA GPU; use 'hf' or 'auto' on the CPU")
        from rlhf_lit.fast_rollout import StaticCudaGraphGenerate

        return StaticCudaGraphGenerate()

    def configure_optimizers(self):
        params = [p for _, p in self.model.trainable_named_parameters()]
        if not params:
            raise RuntimeError("no trainable parameters: the policy adapter did not load as trainable")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] + self.tokenizer.convert_tokens_to_ids(self.extra_stop_tokens)
        return sorted(set(ids))

    # ---------------------------------------------------------------------------------------
    # Experience
    # ---------------------------------------------------------------------------------------
    def _forward_batched(self, role: str, q_ids, q_mask, r_ids, r_mask, temperature, values=False, entropy=False,
                         logprobs=True):
        """Run the model over the batch in micro-batches (no grad): full-vocabulary logits never
        exist for more than one micro-batch."""
        micro = self._micro_batch(q_ids.shape[0])
        outs = []
        # The trained adapters' bf16 LoRA copies serve their own forwards; the reference is stored in bf16.
        copies = self.model.lora_compute_copies() if role != REFERENCE else contextlib.nullcontext()
        with self.model.role(role), copies:
            for s in range(0, q_ids.shape[0], micro):
                sl = slice(s, s + micro)
                outs.append(self.model(q_ids[sl], q_mask[sl], r_ids[sl], r_mask[sl], temperature, values, entropy,
                                       logprobs))
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return ResponseOutput(*(cat([o[i] for o in outs]) for i in range(3)))

    @torch.no_grad()
    def sample(self, batch: dict[str, Any], sampling: SamplingConfig, role: str = POLICY):
        """Sample responses with the given adapter; returns the truncated response and its text."""
        self.model.eval()
        args = (self.model.peft, batch["input_ids"], batch["attention_mask"], sampling,
                self.stop_token_ids, self.tokenizer.pad_token_id)
        with self.model.role(role):
            try:
                tokens = self.engine.generate(*args)
            except NotImplementedError as e:  # the fast engine's UnsupportedModelError
                if self.rollout_engine_name != "auto":
                    raise
                log.warning("rollout_engine=auto: falling back to HF generate (%s)", e)
                self.engine = HFGenerate()
                tokens = self.engine.generate(*args)
        trunc = ppo.truncate_after_stop(tokens, self.stop_token_ids, self.tokenizer.pad_token_id)
        texts = self.decode(trunc)
        return trunc, texts

    def decode(self, trunc: ppo.TruncatedResponse) -> list[str]:
        """Response text without the stop token and padding: what the reward reads."""
        body = trunc.response_mask & ~torch.isin(trunc.response_ids, torch.tensor(self.stop_token_ids, device=trunc.response_ids.device))
        return [
            self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
            for row, m in zip(trunc.response_ids, body)
        ]

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> tuple[ppo.Rollout, dict[str, float], list[str]]:
        """Steps 1-4: sample, score, evaluate and compute advantages."""
        cfg, T = self.ppo, self.sampling.temperature
        timings = {}
        t = self._clock()
        trunc, texts = self.sample(batch, self.sampling)
        self.engine.release()
        timings["time/rollout_s"] = self._clock() - t

        t = self._clock()
        reward_out = self.reward(batch["prompt"], texts)
        timings["time/reward_s"] = self._clock() - t
        raw_scores = reward_out.scores.to(self.device)
        valid = reward_out.valid.to(self.device)
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~trunc.has_stop).float()
        if cfg.normalize_scores:
            # Statistics over every rank's valid scores, so all ranks normalise alike.
            all_scores, all_valid = self.all_gather(scores).reshape(-1), self.all_gather(valid).reshape(-1)
            self.score_moments.update(all_scores[all_valid])
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)

        t = self._clock()
        q_ids, q_mask = batch["input_ids"], batch["attention_mask"]
        r_ids, r_mask = trunc.response_ids, trunc.response_mask
        shared = self.model.values_from_policy
        pol = self._forward_batched(POLICY, q_ids, q_mask, r_ids, r_mask, T, values=shared, entropy=True)
        critic_values = pol.values if shared else self._forward_batched(
            CRITIC, q_ids, q_mask, r_ids, r_mask, T, values=True, logprobs=False).values
        ref = self._forward_batched(REFERENCE, q_ids, q_mask, r_ids, r_mask, T)
        timings["time/ref_values_s"] = self._clock() - t
        if self.device.type == "cuda":  # the experience phases (sampling, scoring, evaluation) alone
            timings["perf/peak_mem_rollout_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30

        mask = r_mask & valid.unsqueeze(-1)  # unscored samples get no update
        logprobs = pol.logprobs * r_mask
        ref_logprobs = ref.logprobs * r_mask
        values = critic_values * r_mask
        kl = ppo.kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * r_mask
        rewards = ppo.kl_penalized_rewards(scores, kl, mask, trunc.last_index, self.kl_coef)
        if cfg.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, mask)
        rollout = ppo.Rollout(q_ids, q_mask, r_ids, mask, logprobs, ref_logprobs, values, scores,
                              rewards, advantages, returns, valid)

        seq_kl = kl.sum(-1)
        non_score = (-self.kl_coef * kl).sum(-1)
        lengths = r_mask.sum(-1).float()
        metrics = {
            "objective/kl": seq_kl.mean(),
            "objective/kl_coef": torch.tensor(float(self.kl_coef)),
            "objective/entropy": (pol.entropy * r_mask).sum(-1).mean(),
            "objective/entropy_per_token": ppo.masked_mean(pol.entropy, r_mask),
            "objective/non_score_reward": non_score.mean(),
            "objective/scores": ppo.masked_mean(raw_scores, valid),
            "objective/rlhf_reward": ppo.masked_mean(scores + non_score, valid),
            "objective/valid_fraction": valid.float().mean(),
            "val/num_eos_tokens": trunc.has_stop.float().sum(),
            "val/explained_variance": ppo.explained_variance(values, returns, mask),
            "response/length_mean": lengths.mean(),
            "perf/tokens_per_sec": lengths.sum() / max(timings["time/rollout_s"], 1e-9),
        }
        for name, comp in reward_out.components.items():
            metrics[f"reward/{name}"] = ppo.masked_mean(comp.to(self.device), valid)
        metrics = {k: float(v) for k, v in metrics.items()} | timings | dict(reward_out.metrics)
        return rollout, metrics, texts

    # ---------------------------------------------------------------------------------------
    # Updates
    # ---------------------------------------------------------------------------------------
    def ppo_update(self, rollout: ppo.Rollout) -> dict[str, float]:
        """Step 5: epochs x shuffled minibatches of clipped policy and value losses."""
        cfg = self.ppo
        B = rollout.query_ids.shape[0]
        mb_size = B // cfg.num_minibatches
        stats: dict[str, list[Tensor]] = {}
        self.model.train()
        with self.model.lora_compute_copies() as lora, self.model.compiled():
            if cfg.micro_batch_size == "auto" and self._auto_micro is None:
                self._auto_micro = self._measure_micro_batch(rollout, mb_size, lora)
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, device=self.device)
                for start in range(0, B, mb_size):
                    self._minibatch_step(rollout, perm[start:start + mb_size], lora, stats)
                    if self._kl_stop(stats):
                        break
                if self._kl_stop(stats):
                    break
        self.optimizers().zero_grad(set_to_none=True)  # no gradients held through the next rollout
        # One device-to-host copy for all statistics: no sync inside the loop, so the host queues
        # the next minibatch while the GPU finishes this one.
        stats = {k: torch.stack(v).tolist() for k, v in stats.items()}
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        # Before any update the new policy is the old one: this must read 1.0 (a silent-bug check).
        out["val/ratio_first_minibatch"] = stats["val/ratio"][0]
        out["policy/epochs_done"] = float(epoch + 1)
        out["policy/updates"] = float(len(stats["loss/policy_avg"]))
        out["perf/micro_batch_size"] = float(self._micro_batch(mb_size))
        return out

    def _micro_batch(self, batch: int) -> int:
        """Sequences per forward for a (mini)batch of ``batch``: the configured or measured size."""
        micro = self.ppo.micro_batch_size
        if micro == "auto":  # before the first update measured it: one minibatch's worth
            micro = self._auto_micro or self.rollout_batch_size // self.ppo.num_minibatches
        return min(micro or batch, batch)

    def _measure_micro_batch(self, rollout: ppo.Rollout, mb_size: int, lora: LoraComputeCopies) -> int:
        """``micro_batch_size: auto``: one sequence's forward + backward peak, scaled to the longest
        possible response, against 80% of the free GPU memory (its gradients are discarded)."""
        if self.device.type != "cuda":
            return mb_size
        torch.cuda.synchronize(self.device)
        free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
            - torch.cuda.memory_allocated(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        one = rollout.select(torch.zeros(1, dtype=torch.long, device=self.device))
        # The policy's pass (with the LM head) is the larger of the two when the critic has its own.
        shared = self.model.values_from_policy
        new = self.model(one.query_ids, one.query_mask, one.response_ids, one.response_mask,
                         self.sampling.temperature, values=shared)
        with self._no_backward_sync():
            (new.logprobs.sum() + (new.values.sum() if shared else 0.0)).backward()
        per_sequence = torch.cuda.max_memory_allocated(self.device) - base
        lora.collect_grads()
        self.optimizers().zero_grad(set_to_none=True)
        P, R = one.query_ids.shape[1], one.response_ids.shape[1]
        per_sequence *= (P + max(R, self.sampling.max_new_tokens)) / (P + R)
        micro = ppo.largest_divisor_within(mb_size, per_sequence, 0.8 * free)
        log.info("micro_batch_size=auto: %d (%.2f GiB per sequence, %.1f GiB free)", micro,
                 per_sequence / 2**30, free / 2**30)
        return micro

    def _kl_stop(self, stats: dict[str, list[Tensor]]) -> bool:
        """Early stop: the last minibatch's approx KL went past ``target_approx_kl`` (a sync, only when set)."""
        target = self.ppo.target_approx_kl
        return target is not None and bool(stats) and float(stats["policy/approxkl_avg"][-1]) > target

    def _minibatch_step(self, rollout: ppo.Rollout, mb_idx: Tensor, lora: LoraComputeCopies,
                        stats: dict[str, list[Tensor]]) -> None:
        """One optimizer step on the minibatch ``mb_idx``, accumulated over micro-batches."""
        cfg, T = self.ppo, self.sampling.temperature
        opt = self.optimizers()
        # The optimizer's parameters: the fp32 masters, whatever the modules hold in ``lora``'s block.
        params = [p for group in opt.param_groups for p in group["params"]]
        micro = self._micro_batch(len(mb_idx))
        n_tokens = rollout.response_mask[mb_idx].sum().clamp(min=1)
        opt.zero_grad()
        sums: dict[str, Tensor] = {}
        shared = self.model.values_from_policy
        for m in range(0, len(mb_idx), micro):
            mb = rollout.select(mb_idx[m:m + micro])
            # Token-weighted share of the minibatch: micro-batching leaves loss and gradients unchanged.
            w = mb.response_mask.sum() / n_tokens
            new = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, T, values=shared)
            pg = ppo.clipped_policy_loss(new.logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_eps)
            if shared:
                vf = ppo.clipped_value_loss(new.values, mb.values, mb.returns, mb.response_mask, cfg.vf_clip_eps)
                self._backward((pg.loss + cfg.vf_coef * vf.loss) * w, lora)
            else:
                self._backward(pg.loss * w, lora)
                # The critic adapter's forward and its backward both run with its adapter active:
                # checkpointed layers recompute the forward in the backward, under the adapter active then.
                with self.model.role(CRITIC):
                    values = self.model(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, T,
                                        logprobs=False).values
                    vf = ppo.clipped_value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.vf_clip_eps)
                    self._backward(cfg.vf_coef * vf.loss * w, lora)
            for k, v in (("loss/policy_avg", pg.loss), ("loss/value_avg", vf.loss),
                         ("policy/approxkl_avg", pg.approx_kl), ("policy/clipfrac_avg", pg.clipfrac),
                         ("val/clipfrac_avg", vf.clipfrac), ("val/ratio", pg.ratio_mean),
                         ("val/ratio_var", pg.ratio_var)):
                sums[k] = sums.get(k, 0.0) + v.detach() * w
        self._all_reduce_gradients(params)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        sums["policy/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        opt.step()
        lora.refresh()
        for k, v in sums.items():
            stats.setdefault(k, []).append(v.detach().float().reshape(()))

    def _backward(self, loss: Tensor, lora: LoraComputeCopies) -> None:
        with self._no_backward_sync():
            self.manual_backward(loss)
        lora.collect_grads()

    def _clock(self) -> float:
        """Wall time after the GPU has finished queued work, so phase timings add up."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _no_backward_sync(self):
        """Keep DDP's backward hooks out of the PPO loop: a rollout makes many backward passes per
        DDP forward, which its reducer does not expect. Gradients are averaged explicitly instead."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None and self.trainer.world_size > 1 else contextlib.nullcontext()

    def _all_reduce_gradients(self, params: list[Tensor]) -> None:
        """Average the accumulated gradients over data-parallel ranks (one flat all-reduce)."""
        if self.trainer.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()

    # ---------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Restored RNG continues a resumed run exactly; a fresh run gets one seed per rank.
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        else:
            torch.manual_seed(self.seed + self.global_rank)
            random.seed(self.seed + self.global_rank)
        self._run_log = RunLog(self.trainer)

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

        if self.ppo.adaptive_kl:
            n = rollout.query_ids.shape[0] * self.trainer.world_size
            global_kl = float(self.all_gather(torch.tensor(metrics["objective/kl"], device=self.device)).mean())
            self.kl_coef = ppo.adaptive_kl_coef(self.kl_coef, global_kl, self.ppo.kl_target, self.ppo.kl_horizon, n)
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self.rollouts_done += 1
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["episode"] = float(self.rollouts_done * self.rollout_batch_size * self.trainer.world_size)
        metrics["rollout"] = float(self.rollouts_done)
        self.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=self.trainer.world_size > 1,
                      batch_size=rollout.query_ids.shape[0])
        self._run_log.append_metrics(self.rollouts_done, metrics)
        if self.log_samples and self.rollouts_done % self.samples_every_n_rollouts == 0:
            self._run_log.samples(self.rollouts_done, batch["prompt"], texts, rollout.scores.tolist(), self.log_samples)
        if self.export_every_n_rollouts and self.rollouts_done % self.export_every_n_rollouts == 0:
            self.export_adapter()

    def on_train_end(self) -> None:
        self.export_adapter()

    def export_adapter(self) -> Optional[Path]:
        """Write the policy adapter as a PEFT folder (atomically; rank 0 only)."""
        from rlhf_lit.export import export_adapter

        log_dir = run_dir(self.trainer)  # a broadcast: every rank must ask
        if not self.trainer.is_global_zero:
            return None
        if not self.output_dir and not log_dir:
            log.warning("no model.output_dir and no logger folder: the trained adapter is not exported")
            return None
        out = Path(self.output_dir) if self.output_dir else Path(log_dir) / "adapter"
        path = export_adapter(self.model.peft, POLICY, out, base_model=self.policy_config.base_model)
        log.info("exported the policy adapter to %s", path)
        return path

    # ---------------------------------------------------------------------------------------
    # Validation and test
    # ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_rng(self, batch_idx: int):
        """Evaluation samples with its own seed and leaves the training RNG stream untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 7919 * (batch_idx + 1) + self.global_rank)
            yield

    @torch.no_grad()
    def _score_and_kl(self, batch, role: str, extra: bool = False) -> dict[str, Any]:
        """Sample with ``role``'s adapter and score; ``extra`` adds the eval-only backends' outputs."""
        trunc, texts = self.sample(batch, self.eval_sampling, role)
        out = self.reward(batch["prompt"], texts)
        q_ids, q_mask, T = batch["input_ids"], batch["attention_mask"], self.eval_sampling.temperature
        # KL of the sampling adapter to the reference, estimated on its own samples (0 for the reference).
        if role == REFERENCE:
            kl = torch.zeros(q_ids.shape[0], device=q_ids.device)
        else:
            own = self._forward_batched(role, q_ids, q_mask, trunc.response_ids, trunc.response_mask, T)
            ref = self._forward_batched(REFERENCE, q_ids, q_mask, trunc.response_ids, trunc.response_mask, T)
            kl = (ppo.kl_estimate(own.logprobs, ref.logprobs, "k1") * trunc.response_mask).sum(-1)
        r = {"scores": out.scores.to(self.device), "valid": out.valid.to(self.device), "kl": kl,
             "length": trunc.response_mask.sum(-1).float(), "eos": trunc.has_stop.float(), "texts": texts,
             "components": out.components}
        if extra:
            r["eval"] = {b.name: b(batch["prompt"], texts) for b in self.eval_rewards}
        return r

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with self._eval_rng(batch_idx):
            r = self._score_and_kl(batch, POLICY)
        self.engine.release()
        n = len(batch["prompt"])
        sync = self.trainer.world_size > 1
        self.log("validation/score", ppo.masked_mean(r["scores"], r["valid"]), batch_size=n, sync_dist=sync)
        self.log("validation/kl", r["kl"].mean(), batch_size=n, sync_dist=sync)
        self.log("validation/length", r["length"].mean(), batch_size=n, sync_dist=sync)

    def on_test_epoch_start(self) -> None:
        # Metrics and report: rlhf_lit/evaluation.py (torchmetrics states, synced across ranks).
        self._evaluator = TestEvaluator(f"{self.reward.name} (trained-on reward)", self.device, seed=self.seed)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for k in range(self.eval_samples_per_prompt):
            results = {}
            for role, name in ((POLICY, "rlhf"), (REFERENCE, "sft")):
                with self._eval_rng(batch_idx * 1000 + k):  # same seed for both adapters: paired samples
                    results[name] = self._score_and_kl(batch, role, extra=True)
            self.engine.release()
            self._evaluator.update(batch["id"], batch["prompt"], results, sample=k)

    def on_test_epoch_end(self) -> None:
        # Every rank computes (a collective); rank 0 writes report.md/json, the histogram, test_samples.jsonl.
        headline = self._evaluator.finish(self)
        self.log_dict(headline, sync_dist=self.trainer.world_size > 1)

    # ---------------------------------------------------------------------------------------
    # Checkpoints: trained weights + optimizer + controller state + RNG, never the base model
    # ---------------------------------------------------------------------------------------
    def _trainable_keys(self, state_dict: dict[str, Any]) -> list[str]:
        return [k for k in state_dict if k.startswith("model.") and PolicyModel.is_trainable_key(k[len("model."):])]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: sd[k] for k in self._trainable_keys(sd)}
        checkpoint["rlhf_lit"] = {
            "base_model": self.policy_config.base_model,
            "sft_adapter": self.policy_config.sft_adapter,
            "critic": self.policy_config.critic,
            "kl_coef": float(self.kl_coef),
            "score_moments": self.score_moments.state_dict(),
            "rollouts_done": self.rollouts_done,
            "rng": _get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        own = self.state_dict()
        expected = self._trainable_keys(own)
        missing = [k for k in expected if k not in sd]
        wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        # Trained tensors this model has no place for (e.g. a critic adapter) must not vanish silently.
        unexpected = [k for k in self._trainable_keys(sd) if k not in own]
        meta = checkpoint.get("rlhf_lit", {})
        where = (f"base_model={meta.get('base_model')!r}, sft_adapter={meta.get('sft_adapter')!r}, "
                 f"critic={meta.get('critic', 'value_head')!r}")
        if missing or wrong or unexpected:
            example = (missing or wrong or unexpected)[0]
            raise RuntimeError(
                f"this checkpoint does not fit the configured model ({len(missing)} trained tensors missing, "
                f"{len(wrong)} of another shape, {len(unexpected)} unexpected, e.g. {example!r}); it was "
                f"written for {where}, the config "
                f"has base_model={self.policy_config.base_model!r}, sft_adapter={self.policy_config.sft_adapter!r}, "
                f"critic={self.policy_config.critic!r}"
            )
        self.kl_coef = float(meta.get("kl_coef", self.kl_coef))
        if "score_moments" in meta:
            self.score_moments.load_state_dict(meta["score_moments"])
        self.rollouts_done = int(meta.get("rollouts_done", 0))
        self._pending_rng = meta.get("rng")


def _get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x
