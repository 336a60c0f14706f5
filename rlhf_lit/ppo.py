"""PPO for language models as small pure tensor functions.

Nothing here knows about models, tokenizers or Lightning: every function takes tensors and
returns tensors, with its formula in the docstring. Shapes use ``B`` for the batch (sequences),
``R`` for the response length (generated tokens, right-padded after the stop token) and ``V``
for the vocabulary. Masks are ``(B, R)`` and true on the response's real tokens (the stop token
included, everything after it false).

References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 (KL penalty, adaptive controller);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (the defaults);
Schulman 2020, "Approximating KL divergence" (k1/k2/k3).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """One PPO iteration's experience, everything detached.

    Attributes:
        query_ids: ``(B, P)`` prompt token ids, left-padded.
        query_mask: ``(B, P)`` attention mask of the prompt (0 on left padding).
        response_ids: ``(B, R)`` sampled tokens, PAD after the first stop token.
        response_mask: ``(B, R)`` bool, true up to and including the first stop token.
        logprobs: ``(B, R)`` log pi_old(a_t | s_t) with temperature-scaled logits, 0 where masked.
        ref_logprobs: ``(B, R)`` log pi_ref(a_t | s_t), same temperature, 0 where masked.
        values: ``(B, R)`` V_old(s_t) from the critic, 0 where masked.
        scores: ``(B,)`` the reward backend's score (after ``missing_eos_penalty``).
        rewards: ``(B, R)`` per-token rewards: ``-beta * kl_t`` plus the score on the last token.
        advantages: ``(B, R)`` GAE advantages (whitened over the batch when asked).
        returns: ``(B, R)`` value targets ``A_t + V_t`` (before whitening).
        valid: ``(B,)`` bool, false for samples the reward could not score; they get no update.
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    valid: Tensor

    def select(self, index: Tensor) -> "Rollout":
        """The rows ``index`` of every field: a minibatch."""
        return Rollout(*(t[index] for t in self))


class TruncatedResponse(NamedTuple):
    """Result of :func:`truncate_after_stop`.

    Attributes:
        response_ids: ``(B, R)`` tokens with PAD after the first stop token.
        response_mask: ``(B, R)`` bool, true up to and including the first stop token.
        last_index: ``(B,)`` index of the last real token (the stop token when there is one);
            -1 for an empty response.
        has_stop: ``(B,)`` bool, whether a stop token was generated.
    """

    response_ids: Tensor
    response_mask: Tensor
    last_index: Tensor
    has_stop: Tensor


class PolicyLoss(NamedTuple):
    """Result of :func:`clipped_policy_loss`; all scalars.

    Attributes:
        loss: ``mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``.
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
        loss: ``0.5 * mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2))``.
        clipfrac: fraction of tokens where the clipped error was the larger one.
    """

    loss: Tensor
    clipfrac: Tensor


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """``sum_i x_i * m_i`` over ``dim`` (all elements when None). NaNs under the mask are ignored."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """``sum(x * m) / sum(m)``; 0 where the mask is empty (never NaN)."""
    n = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements: ``sum(m * (x - mean)^2) / (n - 1)`` (``/ n`` if not unbiased).

    Returns 0 when fewer than two elements (one for biased) are under the mask.
    """
    n = mask.bool().sum()
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return sq / denom.clamp(min=1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked elements; add the mean back when
    ``shift_mean`` is False (reward whitening keeps the mean). Masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# --------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int = 4) -> Tensor:
    """``log softmax(z / T)[a]`` for the chosen tokens ``a``.

    ``log pi(a) = z_a / T - logsumexp(z / T)``, computed in fp32 ``chunk_rows`` sequences at a time
    so fp32 logits of shape ``(B, R, V)`` are never materialised at once (152k-token vocabularies).

    Args:
        logits: ``(B, R, V)`` in any float dtype.
        tokens: ``(B, R)`` long.
        temperature: the sampling temperature; the same one must be used for old, new and
            reference log-probs, or the PPO ratio does not start at 1.
    Returns:
        ``(B, R)`` float32.
    """
    out = []
    for z, a in zip(logits.split(chunk_rows), tokens.split(chunk_rows)):
        z = z.float() / temperature
        out.append(z.gather(-1, a.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_rows: int = 4) -> Tensor:
    """Entropy of ``softmax(z / T)``: ``H = logsumexp(z) - sum_v p_v z_v`` with ``z = logits / T``.

    Args:
        logits: ``(B, R, V)``.
    Returns:
        ``(B, R)`` float32.
    """
    out = []
    for z in logits.split(chunk_rows):
        z = z.float() / temperature
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
def truncate_after_stop(response_ids: Tensor, stop_token_ids: Sequence[int], pad_token_id: int) -> TruncatedResponse:
    """Cut each response after its first stop token (kept) and fill the rest with PAD.

    The mask comes from the position of the first stop token, never from comparing ids with PAD:
    a policy may sample the PAD token as an ordinary token.

    Args:
        response_ids: ``(B, R)`` generated tokens.
        stop_token_ids: ids that end a response (EOS, e.g. ``<|im_end|>``).
        pad_token_id: id written after the stop (must differ from every stop id).
    """
    if pad_token_id in set(stop_token_ids):
        raise ValueError(f"PAD id {pad_token_id} is also a stop token: PAD must differ from EOS")
    B, R = response_ids.shape
    is_stop = torch.isin(response_ids, torch.as_tensor(list(stop_token_ids), device=response_ids.device))
    has_stop = is_stop.any(-1)
    idx = torch.arange(R, device=response_ids.device).expand(B, R)
    first_stop = torch.where(is_stop, idx, R).min(-1).values  # R when there is none
    last_index = torch.where(has_stop, first_stop, R - 1)
    mask = idx <= last_index.unsqueeze(-1)
    return TruncatedResponse(response_ids.masked_fill(~mask, pad_token_id), mask, last_index, has_stop)


# --------------------------------------------------------------------------------------------
# KL and rewards
# --------------------------------------------------------------------------------------------
def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with ``log r = log pi_ref - log pi``:

    - k1: ``-log r`` (unbiased, can be negative; TRL's default)
    - k2: ``(log r)^2 / 2`` (biased, low variance, non-negative)
    - k3: ``(r - 1) - log r`` (unbiased, non-negative)

    Returns the same shape as the inputs.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def kl_penalized_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, last_index: Tensor, kl_coef: float | Tensor
) -> Tensor:
    """Per-token rewards ``r_t = -beta * kl_t + [t = T] * score`` (Ziegler et al. 2019).

    The score lands on the last real token ``T`` (the stop token, or the last token of a response
    that hit the length limit); a response with no tokens (``last_index = -1``) gets nothing.

    Args:
        scores: ``(B,)`` sequence-level scores.
        kl: ``(B, R)`` per-token KL estimates.
        mask: ``(B, R)`` response mask.
        last_index: ``(B,)`` index of the last real token.
        kl_coef: beta.
    Returns:
        ``(B, R)`` rewards, 0 where masked.
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    at_end = torch.nn.functional.one_hot(last_index.clamp(min=0), kl.shape[-1]).to(rewards.dtype)
    at_end = at_end * (last_index >= 0).unsqueeze(-1)
    return rewards + at_end * scores.unsqueeze(-1).to(rewards.dtype)


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


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ``rho_t = exp(log pi(a_t) - log pi_old(a_t))``,
    ``pg_loss1 = -A_t * rho_t``, ``pg_loss2 = -A_t * clip(rho_t, 1 - eps, 1 + eps)``,
    ``loss = mean_t max(pg_loss1, pg_loss2)`` over the masked tokens.

    Args:
        logprobs: ``(B, R)`` under the current policy (with grad).
        old_logprobs, advantages, mask: ``(B, R)``.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        approx_kl = 0.5 * masked_mean(logratio**2, mask)
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
        ratio_var = masked_var(ratio, mask)
    return PolicyLoss(loss, approx_kl, clipfrac, ratio_mean, ratio_var)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> ValueLoss:
    """Clipped value loss (PPO2 baselines, kept by TRL and the N+ paper).

    ``V_clipped = V_old + clip(V - V_old, -eps, eps)``,
    ``loss = 0.5 * mean_t max((V - R)^2, (V_clipped - R)^2)`` over the masked tokens.

    Args:
        values: ``(B, R)`` current critic outputs (with grad).
        old_values, returns, mask: ``(B, R)``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return ValueLoss(loss, clipfrac)


# --------------------------------------------------------------------------------------------
# Diagnostics and controllers
# --------------------------------------------------------------------------------------------
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse. NaN-free: 0 when the returns have no variance."""
    var_r = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-12)
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019)'s proportional controller for beta:

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``,
    with ``n_steps`` the number of samples (episodes) since the last update.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class RunningMoments:
    """Running mean and standard deviation of scores (Chan et al.'s parallel update), for optional
    running reward normalisation: ``score <- (score - mean) / std``. Its state goes in checkpoints."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def update(self, x: Tensor) -> None:
        """Fold the batch ``x`` (any shape) into the running statistics."""
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def largest_divisor_within(n: int, cost_each: float, budget: float) -> int:
    """The largest divisor ``d`` of ``n`` with ``d * cost_each <= budget`` (at least 1).

    Picks a micro-batch that divides the minibatch evenly and fits a memory budget."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fits = [d for d in range(1, n + 1) if n % d == 0 and d * cost_each <= budget]
    return max(fits, default=1)
