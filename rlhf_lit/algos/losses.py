"""Per-token policy and value losses, aggregated by :mod:`rlhf_lit.algos.aggregation`.

Each loss builds its ``(B, R)`` matrix of per-token terms (CleanRL's names: ``pg_loss1``,
``pg_loss2``, ``vf_loss1``, ``vf_loss2``), then reduces it with ``loss_agg_mode``; the diagnostics
(approximate KL, clip fractions, ratio statistics) are token means over the mask, whatever the mode.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from rlhf_lit.algos.aggregation import LossAggMode, agg_loss
from rlhf_lit.algos.kl import KLEstimator, kl_estimate
from rlhf_lit.algos.masked import masked_mean, masked_var


class PolicyLoss(NamedTuple):
    """Result of :func:`clipped_policy_loss`; all scalars.

    Attributes:
        loss: the aggregate (``token-mean`` by default) of the per-token clipped surrogate.
        approx_kl: ``0.5 * mean((log pi - log pi_old)^2)`` (TRL's estimate of KL(pi_old || pi)).
        clipfrac: fraction of tokens where the clipped term was the larger one.
        ratio_mean: mean of ``rho_t = pi / pi_old`` (1.0 on the first minibatch of a rollout).
        ratio_var: variance of ``rho_t``.
        dual_clipfrac: fraction of tokens where the dual clip bound the loss (0 without it).
    """

    loss: Tensor
    approx_kl: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor
    ratio_var: Tensor
    dual_clipfrac: Tensor


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
    loss_agg_mode: LossAggMode = "token-mean", clip_eps_high: Optional[float] = None,
    dual_clip_c: Optional[float] = None, is_weights: Optional[Tensor] = None,
    norm_length: Optional[float] = None,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``,
    ``pg_loss1 = -A_t * rho_t``, ``pg_loss2 = -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high)``,
    ``pg_losses = max(pg_loss1, pg_loss2)``;
    with ``dual_clip_c = c > 1`` (Ye et al. 2020, dual-clip PPO) tokens with ``A_t < 0`` take
    ``min(pg_losses, -A_t * c)``, bounding how hard a very unlikely-now token is pushed down;
    with ``is_weights`` (truncated importance weights of the sampler, ``(B, R)``, no grad) each
    token's loss is multiplied by its weight;
    ``loss = agg(pg_losses)`` over the masked tokens.

    ``eps_high > eps_low`` is DAPO's clip-higher (Yu et al. 2025): room for low-probability tokens
    to grow, against entropy collapse.

    Args:
        logprobs: ``(B, R)`` under the current policy (with grad).
        old_logprobs, advantages, mask: ``(B, R)``.
        clip_eps: ``eps_low`` (and ``eps_high`` unless ``clip_eps_high`` is given).
        loss_agg_mode, norm_length: see :mod:`rlhf_lit.algos.aggregation`.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    pg_losses = torch.max(pg_loss1, pg_loss2)
    dual = None
    if dual_clip_c is not None:
        pg_loss3 = -advantages * dual_clip_c
        dual = (advantages < 0) & (pg_loss3 < pg_losses)
        pg_losses = torch.where(advantages < 0, torch.min(pg_losses, pg_loss3), pg_losses)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    loss = agg_loss(pg_losses, mask, loss_agg_mode, norm_length)
    with torch.no_grad():
        approx_kl = 0.5 * masked_mean(logratio**2, mask)
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_var = masked_var(ratio, mask)
        dual_clipfrac = masked_mean(dual.float(), mask) if dual is not None else torch.zeros_like(approx_kl)
    return PolicyLoss(loss, approx_kl, clipfrac, ratio_mean, ratio_var, dual_clipfrac)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2,
    loss_agg_mode: LossAggMode = "token-mean", norm_length: Optional[float] = None,
) -> ValueLoss:
    """Clipped value loss (PPO2 baselines, kept by TRL and the N+ paper).

    ``V_clipped = V_old + clip(V - V_old, -eps, eps)``, ``vf_loss1 = (V - R)^2``,
    ``vf_loss2 = (V_clipped - R)^2``, ``loss = agg(0.5 * max(vf_loss1, vf_loss2))`` over the masked tokens.

    Args:
        values: ``(B, R)`` current critic outputs (with grad).
        old_values, returns, mask: ``(B, R)``.
        loss_agg_mode, norm_length: see :mod:`rlhf_lit.algos.aggregation`.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = agg_loss(0.5 * torch.max(vf_loss1, vf_loss2), mask, loss_agg_mode, norm_length)
    with torch.no_grad():
        clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return ValueLoss(loss, clipfrac)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLEstimator = "k3",
            loss_agg_mode: LossAggMode = "token-mean", norm_length: Optional[float] = None) -> Tensor:
    """The KL penalty as a loss term (``kl_in: loss``; GRPO, Shao et al. 2024):
    ``agg(k(log pi, log pi_ref))``, differentiated through ``log pi`` on tokens sampled from the
    rollout policy. What the gradient estimates, per token, with ``r = pi_ref / pi``
    (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"):

    - ``k1 = log pi - log pi_ref``: ``grad log pi``, whose expectation under pi is 0: on-policy it
      pulls nothing towards the reference (use it in the reward instead);
    - ``k2 = (log r)^2 / 2``: ``(log pi - log pi_ref) grad log pi``, an unbiased estimate of
      ``grad KL(pi || pi_ref)`` (the reverse KL the reward penalty also targets);
    - ``k3 = (r - 1) - log r``: ``(1 - r) grad log pi``, whose expectation is
      ``grad KL(pi_ref || pi)`` (the forward KL): GRPO's "low-variance" estimator; unbiased as a
      value of the reverse KL, not as its gradient.

    Args:
        logprobs: ``(B, R)`` with grad; ref_logprobs, mask: ``(B, R)``.
    Returns:
        A scalar.
    """
    return agg_loss(kl_estimate(logprobs, ref_logprobs, estimator), mask, loss_agg_mode, norm_length)


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, level: str,
                         cap: float) -> Tensor:
    """Truncated importance weights that correct for the sampler not being the trained policy
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):

    - ``token``: ``w_t = min(pi_old(a_t) / pi_sampler(a_t), cap)``;
    - ``sequence``: ``w = min(prod_t pi_old(a_t) / pi_sampler(a_t), cap)`` on every token of the response.

    Args:
        old_logprobs: ``(B, R)`` log-probs of the training forward at rollout time.
        sampler_logprobs: ``(B, R)`` log-probs under which the engine sampled each token.
        mask: ``(B, R)``.
        level: ``token`` or ``sequence``.
    Returns:
        ``(B, R)`` weights (no grad), 1 where masked.
    Raises:
        ValueError: an unknown level.
    """
    log_w = (old_logprobs - sampler_logprobs).masked_fill(~mask.bool(), 0.0)
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    elif level != "token":
        raise ValueError(f"model.ppo.rollout_is={level!r}: expected 'none', 'token' or 'sequence'")
    w = torch.exp(log_w.clamp(max=float(torch.tensor(cap).log()))).detach()
    return w.masked_fill(~mask.bool(), 1.0)
