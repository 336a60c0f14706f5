"""Per-token policy and value losses of PPO, aggregated by :mod:`rlhf_lit.algos.aggregation`.

Each loss builds its ``(B, R)`` matrix of per-token terms (CleanRL's names: ``pg_loss1``,
``pg_loss2``, ``vf_loss1``, ``vf_loss2``), then reduces it with ``loss_agg_mode``; the diagnostics
(approximate KL, clip fractions, ratio statistics) are token means over the mask, whatever the mode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rlhf_lit.algos.aggregation import LossAggMode, agg_loss
from rlhf_lit.algos.masked import masked_mean, masked_var


class PolicyLoss(NamedTuple):
    """Result of :func:`clipped_policy_loss`; all scalars.

    Attributes:
        loss: the aggregate (``token-mean`` by default) of ``max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``.
        approx_kl: ``0.5 * mean((log pi - log pi_old)^2)`` (TRL's estimate of KL(pi_old || pi)).
        clipfrac: fraction of tokens where the clipped term was the larger one.
        ratio_mean: mean of ``rho_t = pi / pi_old`` (1.0 on the first minibatch of a rollout).
        ratio_var: variance of ``rho_t``.
    """

    loss: Tensor
    approx_kl: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor
    ratio_var: Tensor


class ValueLoss(NamedTuple):
    """Result of :func:`clipped_value_loss`; all scalars.

    Attributes:
        loss: the aggregate (``token-mean`` by default) of ``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``.
        clipfrac: fraction of tokens where the clipped error was the larger one.
    """

    loss: Tensor
    clipfrac: Tensor


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
    loss_agg_mode: LossAggMode = "token-mean",
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``,
    ``pg_loss1 = -A_t * rho_t``, ``pg_loss2 = -A_t * clip(rho_t, 1 - eps, 1 + eps)``,
    ``loss = agg(max(pg_loss1, pg_loss2))`` over the masked tokens.

    Args:
        logprobs: ``(B, R)`` under the current policy (with grad).
        old_logprobs, advantages, mask: ``(B, R)``.
        loss_agg_mode: see :mod:`rlhf_lit.algos.aggregation`.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = agg_loss(torch.max(pg_loss1, pg_loss2), mask, loss_agg_mode)
    with torch.no_grad():
        approx_kl = 0.5 * masked_mean(logratio**2, mask)
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_var = masked_var(ratio, mask)
    return PolicyLoss(loss, approx_kl, clipfrac, ratio_mean, ratio_var)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2,
    loss_agg_mode: LossAggMode = "token-mean",
) -> ValueLoss:
    """Clipped value loss (PPO2 baselines, kept by TRL and the N+ paper).

    ``V_clipped = V_old + clip(V - V_old, -eps, eps)``, ``vf_loss1 = (V - R)^2``,
    ``vf_loss2 = (V_clipped - R)^2``, ``loss = agg(0.5 * max(vf_loss1, vf_loss2))`` over the masked tokens.

    Args:
        values: ``(B, R)`` current critic outputs (with grad).
        old_values, returns, mask: ``(B, R)``.
        loss_agg_mode: see :mod:`rlhf_lit.algos.aggregation`.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = agg_loss(0.5 * torch.max(vf_loss1, vf_loss2), mask, loss_agg_mode)
    with torch.no_grad():
        clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return ValueLoss(loss, clipfrac)
