"""Advantage estimators behind one signature, registered by name (``model.ppo.adv_estimator``).

Each estimator reads an :class:`AdvantageInput` and the stage's config (the attributes it uses are
listed in its docstring) and returns an :class:`AdvantageOutput`. A new estimator is one function
with ``@register_advantage_estimator("name", needs_critic=...)``; the name becomes a config value.
``needs_critic`` tells the stage whether a critic must exist (and values be computed) at all.

Names follow verl (``core_algos.AdvantageEstimator``): ``gae`` (PPO), ``grpo`` (Shao et al. 2024;
``norm_adv_by_std: false`` is Dr. GRPO, Liu et al. 2025), ``rloo`` (Ahmadian et al. 2024),
``reinforce_plus_plus`` and ``reinforce_plus_plus_baseline`` (Hu 2025). The outcome-based ones read
each response's return ``R_i = sum_t r_it`` (the score plus, with ``kl_in: reward``, the KL
penalty), and give every token of the response the same advantage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rlhf_lit.algos.groups import group_stats
from rlhf_lit.algos.masked import masked_whiten


class AdvantageInput(NamedTuple):
    """What an estimator may read.

    Attributes:
        token_rewards: ``(B, R)`` per-token rewards (KL penalty + score on the last token), 0 where masked.
        values: ``(B, R)`` critic values V_old(s_t), 0 where masked; None without a critic.
        mask: ``(B, R)`` bool, the tokens that get an update.
        scores: ``(B,)`` shaped sequence-level scores.
        group_index: ``(B,)`` long, the prompt each response answers (``samples_per_prompt``
            responses share one), for the group-based estimators.
    """

    token_rewards: Tensor
    values: Optional[Tensor]
    mask: Tensor
    scores: Tensor
    group_index: Tensor


class AdvantageOutput(NamedTuple):
    """Attributes:
        advantages: ``(B, R)``, 0 where masked.
        returns: ``(B, R)`` value targets (``A_t + V_t`` for GAE), 0 where masked.
    """

    advantages: Tensor
    returns: Tensor


AdvantageFn = Callable[[AdvantageInput, Any], AdvantageOutput]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: its function, whether it reads critic values, and whether its
    baseline comes from the other responses to the same prompt (``model.ppo.samples_per_prompt``)."""

    name: str
    fn: AdvantageFn
    needs_critic: bool
    uses_groups: bool = False


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, needs_critic: bool,
                                 uses_groups: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make ``fn`` available as ``model.ppo.adv_estimator: <name>``."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, uses_groups)
        return fn

    return add


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name``.

    Raises:
        ValueError: no such estimator (the message lists the registered names).
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"model.ppo.adv_estimator={name!r}: expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns_t = A_t + V_t``; ``V`` and ``A`` are 0 past the last real token (the episode ends there).

    Args:
        rewards, values, mask: ``(B, R)``.
    Returns:
        ``(advantages, returns)``, each ``(B, R)`` and 0 where masked.
    """
    m = mask.to(values.dtype)
    values = values * m
    R = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * m


@register_advantage_estimator("gae", needs_critic=True)
def gae_estimator(x: AdvantageInput, cfg: Any) -> AdvantageOutput:
    """PPO's estimator: :func:`gae` on the per-token rewards and the critic's values, then the
    advantages whitened over the batch when ``cfg.whiten_advantages`` (the returns are not).

    Reads ``cfg.gamma``, ``cfg.lam``, ``cfg.whiten_advantages``.
    """
    if x.values is None:
        raise ValueError("adv_estimator 'gae' needs a critic (model.policy.critic: value_head or adapter)")
    advantages, returns = gae(x.token_rewards, x.values, x.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, x.mask)
    return AdvantageOutput(advantages, returns)


def _outcome(x: AdvantageInput) -> Tensor:
    """``(B,)`` each response's return ``R_i = sum_t r_it`` over its tokens."""
    return (x.token_rewards * x.mask).sum(-1)


def _per_token(advantage: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, R)``: the same advantage on every token of the response, 0 where masked."""
    return advantage.unsqueeze(-1) * mask.to(advantage.dtype)


def grpo_advantages(returns: Tensor, group_index: Tensor, norm_adv_by_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): ``A_i = (R_i - mean_g) / (std_g + eps)``
    over the responses ``g`` to the same prompt (unbiased std); without ``norm_adv_by_std``,
    ``A_i = R_i - mean_g`` (Dr. GRPO, Liu et al. 2025: the std division biases towards prompts
    that are too easy or too hard). A group of one gets ``A_i = R_i`` (verl's convention: mean 0,
    std 1; with one sample there is no baseline).

    Args:
        returns: ``(N,)``; group_index: ``(N,)`` long.
    Returns:
        ``(N,)``.
    """
    stats = group_stats(returns, group_index)
    single = stats.size < 2
    mean = torch.where(single, torch.zeros_like(stats.mean), stats.mean)
    advantage = returns - mean
    if norm_adv_by_std:
        std = torch.where(single, torch.ones_like(stats.std), stats.std)
        advantage = advantage / (std + eps)
    return advantage


def rloo_advantages(returns: Tensor, group_index: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"):
    ``A_i = R_i - mean_{j in g, j != i} R_j = n / (n - 1) * (R_i - mean_g)``. A group of one gets
    ``A_i = R_i`` (no other sample to compare with).

    Args:
        returns: ``(N,)``; group_index: ``(N,)`` long.
    Returns:
        ``(N,)``.
    """
    stats = group_stats(returns, group_index)
    n = stats.size
    loo = (returns - stats.mean) * n / (n - 1).clamp(min=1)
    return torch.where(n < 2, returns, loo)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Token-level returns ``G_t = sum_{s >= t} gamma^(s - t) r_s`` within each response (REINFORCE).

    Args:
        rewards, mask: ``(B, R)``.
    Returns:
        ``(B, R)``, 0 where masked.
    """
    m = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        returns[:, t] = running
    return returns


@register_advantage_estimator("grpo", needs_critic=False, uses_groups=True)
def grpo_estimator(x: AdvantageInput, cfg: Any) -> AdvantageOutput:
    """:func:`grpo_advantages` of the responses' returns, on every token. Reads ``cfg.norm_adv_by_std``."""
    advantages = _per_token(grpo_advantages(_outcome(x), x.group_index, cfg.norm_adv_by_std), x.mask)
    return AdvantageOutput(advantages, advantages)


@register_advantage_estimator("rloo", needs_critic=False, uses_groups=True)
def rloo_estimator(x: AdvantageInput, cfg: Any) -> AdvantageOutput:
    """:func:`rloo_advantages` of the responses' returns, on every token."""
    advantages = _per_token(rloo_advantages(_outcome(x), x.group_index), x.mask)
    return AdvantageOutput(advantages, advantages)


@register_advantage_estimator("reinforce_plus_plus", needs_critic=False)
def reinforce_plus_plus_estimator(x: AdvantageInput, cfg: Any) -> AdvantageOutput:
    """REINFORCE++ (Hu 2025): token-level returns of the KL-shaped rewards,
    ``G_t = sum_{s >= t} gamma^(s - t) r_s``, whitened over every token of the batch
    (``A = (G - mean) / std``): the batch, not a critic or a group, is the baseline.
    Reads ``cfg.gamma``."""
    returns = discounted_returns(x.token_rewards, x.mask, cfg.gamma)
    return AdvantageOutput(masked_whiten(returns, x.mask), returns)


@register_advantage_estimator("reinforce_plus_plus_baseline", needs_critic=False, uses_groups=True)
def reinforce_plus_plus_baseline_estimator(x: AdvantageInput, cfg: Any) -> AdvantageOutput:
    """REINFORCE++-baseline (Hu 2025; verl's ``reinforce_plus_plus_baseline``): the group mean is
    subtracted from each response's return, ``R_i - mean_g``, put on every token, then whitened over
    every token of the batch."""
    stats = group_stats(_outcome(x), x.group_index)
    centred = _per_token(_outcome(x) - stats.mean, x.mask)
    return AdvantageOutput(masked_whiten(centred, x.mask), centred)
