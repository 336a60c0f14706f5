"""``model.ppo``: the hyperparameters of the PPO stage, each with its source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from rlhf_lit.algos.aggregation import LossAggMode


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
    adv_estimator: str = "gae"
    """Advantage estimator, by its registered name (``rlhf_lit/algos/advantages.py``): ``gae``
    (generalised advantage estimation with the critic; Schulman et al. 2016)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become one number (``rlhf_lit/algos/aggregation.py``, verl's names):
    ``token-mean`` (every token weighs the same)."""
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
