"""``model.ppo``: the hyperparameters of the PPO stage, each with its source."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from rlhf_lit.algos.advantages import ADVANTAGE_ESTIMATORS
from rlhf_lit.algos.aggregation import LossAggMode

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
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group size n of GRPO/RLOO): a rollout holds
    ``data.batch_size x n`` responses, and minibatches keep each prompt's responses together."""
    adv_estimator: str = "gae"
    """Advantage estimator, by its registered name (``rlhf_lit/algos/advantages.py``, verl's names):
    ``gae`` (GAE with the critic; Schulman et al. 2016), ``grpo`` (group-normalised outcome; Shao et
    al. 2024), ``rloo`` (leave-one-out baseline; Ahmadian et al. 2024), ``reinforce_plus_plus``
    (KL-shaped token returns whitened over the batch; Hu 2025), ``reinforce_plus_plus_baseline``
    (group mean subtracted, then whitened). All but ``gae`` need no critic: use
    ``model.policy.critic: none``."""
    norm_adv_by_std: bool = True
    """``grpo``: divide by the group's std (off: Dr. GRPO, Liu et al. 2025)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become one number (``rlhf_lit/algos/aggregation.py``, verl's names):
    ``token-mean`` (every token weighs the same; DAPO), ``seq-mean-token-mean`` (every response;
    GRPO paper), ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (sum / max_new_tokens; Dr. GRPO).
    Exact under micro-batching and data parallelism in every mode."""
    clip_eps: float = 0.2
    """Policy ratio clip epsilon (the lower one when ``clip_eps_high`` is set)."""
    clip_eps_low: Optional[float] = None
    """Lower clip range ``1 - eps_low``; None: ``clip_eps``."""
    clip_eps_high: Optional[float] = None
    """Upper clip range ``1 + eps_high``; None: ``clip_eps``. DAPO's clip-higher uses 0.28 with a
    lower 0.2 (Yu et al. 2025)."""
    dual_clip_c: Optional[float] = None
    """Dual-clip bound ``c > 1`` on the loss of tokens with negative advantage (Ye et al. 2020);
    None: off (verl uses 3.0)."""
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
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL penalty acts: ``reward`` (``-beta * KL`` per token in the rewards; Ziegler et
    al. 2019, PPO) or ``loss`` (``beta * agg(KL)`` added to the policy loss; GRPO)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020): k1 = log p - log p_ref; k2 = (log r)^2 / 2;
    k3 = (r - 1) - log r with r = p_ref / p. In the loss, k1's gradient is zero in expectation; k2's
    estimates grad KL(p || p_ref); k3 (GRPO's) grad KL(p_ref || p) (``rlhf_lit/algos/losses.py``)."""
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
    normalize_scores: bool = True
    """Subtract a running mean from the scores and divide by a running std, over every rank's
    valid scores (statistics kept in checkpoints; OpenRLHF's reward normalisation): a reward whose
    values differ by hundredths then learns as fast as one spread over [0, 1], and ``kl_coef`` is
    in units of the reward's spread whatever its scale. Off: raw scores."""
    score_clip: Optional[float] = None
    """Clip (normalised) scores to [-score_clip, score_clip]."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the score of responses that hit max_new_tokens without a stop token."""
    overlong_buffer: Optional[int] = None
    """DAPO's soft overlong punishment (Yu et al. 2025): responses longer than
    ``max_new_tokens - overlong_buffer`` tokens lose up to ``overlong_penalty``, linearly in the
    excess; None: off."""
    overlong_penalty: float = 1.0
    """The largest soft overlong penalty (reached at ``max_new_tokens``)."""
    mask_truncated: bool = False
    """Leave responses that hit ``max_new_tokens`` without a stop token out of the loss (DAPO's
    overlong filtering)."""
    filter_zero_signal_groups: bool = False
    """Leave out of the update the groups whose scores are all equal (every group-relative
    advantage is 0; DAPO's dynamic-sampling filter, without re-sampling); their fraction is logged
    as ``objective/frac_reward_zero_std`` either way."""
    rollout_is: Literal["none", "token", "sequence"] = "none"
    """Truncated importance-sampling correction for the sampler not being the trained policy
    (Yao et al. 2025): weight each token's policy loss by ``min(pi_old / pi_sampler, rollout_is_cap)``
    per token or per sequence. The gap itself is logged every rollout (``rollout/logprob_gap_*``)."""
    rollout_is_cap: float = 2.0
    """Cap of the importance weights."""
    max_grad_norm: Optional[float] = 1.0
    """Clip gradients to this global norm (None: no clipping; the norm is logged either way)."""
    target_approx_kl: Optional[float] = None
    """Stop this rollout's remaining PPO epochs once a minibatch's approx KL exceeds it."""
    max_unscored_rollouts: Optional[int] = 3
    """Stop the run with an error after this many consecutive rollouts in which no sample was
    scored (every reward invalid: a judge outage under ``on_failure: skip``, a backend that marks
    all samples invalid). Such a rollout makes no update and logs ``objective/scores`` as NaN;
    None never stops."""

    def __post_init__(self) -> None:
        from rlhf_lit.errors import ConfigError

        def need(ok: bool, field: str, expected: str, why: str = "") -> None:
            if not ok:
                value = getattr(self, field)
                raise ConfigError(f"model.ppo.{field}={value!r}: expected {expected}" + (f" ({why})" if why else ""))

        need(self.ppo_epochs >= 1, "ppo_epochs", "an integer >= 1")
        need(self.num_minibatches >= 1, "num_minibatches", "an integer >= 1")
        need(self.samples_per_prompt >= 1, "samples_per_prompt", "an integer >= 1")
        need(self.adv_estimator in ADVANTAGE_ESTIMATORS, "adv_estimator",
             f"one of {sorted(ADVANTAGE_ESTIMATORS)} (rlhf_lit/algos/advantages.py)")
        # The lower clip bound is the ratio 1 - eps: at eps >= 1 it is <= 0 and clips nothing.
        need(0 < self.clip_eps < 1, "clip_eps", "a number in (0, 1)", "the ratio is clipped to [1 - eps, 1 + eps]")
        need(self.clip_eps_low is None or 0 < self.clip_eps_low < 1, "clip_eps_low", "null or a number in (0, 1)",
             "the lower clip bound is 1 - clip_eps_low")
        need(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", "null or a number > 0")
        need(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c", "null or a number > 1")
        need(self.vf_clip_eps > 0, "vf_clip_eps", "a number > 0")
        need(self.vf_coef >= 0, "vf_coef", "a number >= 0", "a negative weight would maximise the value error")
        need(0 <= self.gamma <= 1, "gamma", "a number in [0, 1]")
        need(0 <= self.lam <= 1, "lam", "a number in [0, 1]")
        need(self.kl_coef >= 0, "kl_coef", "a number >= 0",
             "beta weighs a penalty: a negative one rewards moving away from the reference")
        need(self.kl_target > 0, "kl_target", "a number > 0")
        need(self.kl_horizon >= 1, "kl_horizon", "an integer >= 1")
        need(self.score_clip is None or self.score_clip > 0, "score_clip", "null or a number > 0")
        need(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0, "missing_eos_penalty",
             "null or a number >= 0", "it is subtracted from the score: a negative one would reward never stopping")
        need(self.overlong_buffer is None or self.overlong_buffer >= 1, "overlong_buffer", "null or an integer >= 1")
        need(self.overlong_penalty >= 0, "overlong_penalty", "a number >= 0",
             "it is subtracted from the score: a negative one would reward overlong responses")
        need(self.rollout_is_cap > 0, "rollout_is_cap", "a number > 0")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "null or a number > 0")
        need(self.target_approx_kl is None or self.target_approx_kl > 0, "target_approx_kl", "null or a number > 0")
        need(self.max_unscored_rollouts is None or self.max_unscored_rollouts >= 1, "max_unscored_rollouts",
             "null or an integer >= 1")
        for name in ("clip_eps", "vf_clip_eps", "vf_coef", "gamma", "lam", "kl_coef", "kl_target", "overlong_penalty",
                     "rollout_is_cap"):
            need(math.isfinite(getattr(self, name)), name, "a finite number")
        if ADVANTAGE_ESTIMATORS[self.adv_estimator].uses_groups and self.samples_per_prompt == 1:
            log.warning("model.ppo.adv_estimator=%s with model.ppo.samples_per_prompt=1: every group holds one "
                        "response, so there is no group baseline (each response's advantage is its own return); "
                        "sample several responses per prompt, e.g. --model.ppo.samples_per_prompt 4 "
                        "(configs/algorithms/*.yaml set it)", self.adv_estimator)

    @property
    def eps_low(self) -> float:
        return self.clip_eps if self.clip_eps_low is None else self.clip_eps_low

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
