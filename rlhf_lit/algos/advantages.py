"""Advantage estimators behind one signature, registered by name (``model.ppo.adv_estimator``).

Each estimator reads an :class:`AdvantageInput` and the stage's config (the attributes it uses are
listed in its docstring) and returns an :class:`AdvantageOutput`. A new estimator is one function
with ``@register_advantage_estimator("name", needs_critic=...)``; the name becomes a config value.
``needs_critic`` tells the model layer whether values must be computed at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from rlhf_lit.algos.masked import masked_whiten


class AdvantageInput(NamedTuple):
    """What an estimator may read.

    Attributes:
        token_rewards: ``(B, R)`` per-token rewards (KL penalty + score on the last token), 0 where masked.
        values: ``(B, R)`` critic values V_old(s_t), 0 where masked; None without a critic.
        mask: ``(B, R)`` bool, the tokens that get an update.
        scores: ``(B,)`` shaped sequence-level scores.
    """

    token_rewards: Tensor
    values: Optional[Tensor]
    mask: Tensor
    scores: Tensor


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
    """A registered estimator: its function and whether it reads critic values."""

    name: str
    fn: AdvantageFn
    needs_critic: bool


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, needs_critic: bool) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make ``fn`` available as ``model.ppo.adv_estimator: <name>``."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic)
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
