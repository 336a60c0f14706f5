"""The metrics of one rollout, computed from its tensors (names follow TRL's PPO trainer)."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from rlhf_lit.algos.masked import explained_variance, masked_mean


def rollout_metrics(
    *,
    raw_scores: Tensor,
    scores: Tensor,
    valid: Tensor,
    kl: Tensor,
    kl_coef: float,
    entropy: Tensor,
    response_mask: Tensor,
    has_stop: Tensor,
    values: Optional[Tensor],
    returns: Tensor,
    update_mask: Tensor,
    rollout_seconds: float,
    components: Mapping[str, Tensor] = {},
    kl_in_reward: bool = True,
) -> dict[str, float]:
    """One rollout's scalars.

    - ``objective/kl``: mean over samples of ``sum_t kl_t`` (nats per response);
      ``objective/non_score_reward``: mean of ``-beta * sum_t kl_t`` (0 when the KL is in the loss);
    - ``objective/scores``: mean raw reward score over the scored samples;
      ``objective/rlhf_reward``: mean of shaped score + non-score reward over them;
    - ``objective/entropy``: mean per-response sum of token entropies (``_per_token``: token mean);
    - ``val/num_eos_tokens``: responses that emitted a stop token; ``val/explained_variance`` of
      the critic (only with one); ``response/length_mean`` in tokens;
      ``perf/tokens_per_sec``: generated tokens per second of sampling;
    - ``reward/<name>``: mean of each reward component over the scored samples.

    Args:
        raw_scores, scores: ``(B,)`` the backend's scores and the shaped ones.
        valid: ``(B,)`` bool, scored samples.
        kl: ``(B, R)`` per-token KL estimates, 0 past each response.
        entropy: ``(B, R)`` per-token entropies.
        response_mask: ``(B, R)`` the responses' tokens; ``update_mask`` the ones that get an update.
        has_stop: ``(B,)`` bool.
        values, returns: ``(B, R)``; values None without a critic.
        rollout_seconds: wall time of sampling.
        components: ``(B,)`` tensors by name.
        kl_in_reward: whether ``-beta * KL`` is part of the rewards (``kl_in: reward``).
    Returns:
        A dict of Python floats.
    """
    seq_kl = kl.sum(-1)
    non_score = (-kl_coef * kl).sum(-1) if kl_in_reward else torch.zeros_like(seq_kl)
    lengths = response_mask.sum(-1).float()
    metrics = {
        "objective/kl": seq_kl.mean(),
        "objective/kl_coef": torch.tensor(float(kl_coef)),
        "objective/entropy": (entropy * response_mask).sum(-1).mean(),
        "objective/entropy_per_token": masked_mean(entropy, response_mask),
        "objective/non_score_reward": non_score.mean(),
        "objective/scores": masked_mean(raw_scores, valid),
        "objective/rlhf_reward": masked_mean(scores + non_score, valid),
        "objective/valid_fraction": valid.float().mean(),
        "val/num_eos_tokens": has_stop.float().sum(),
        "response/length_mean": lengths.mean(),
        "perf/tokens_per_sec": lengths.sum() / max(rollout_seconds, 1e-9),
    }
    if values is not None:  # critic-free estimators have no value function to explain anything
        metrics["val/explained_variance"] = explained_variance(values, returns, update_mask)
    for name, comp in components.items():
        metrics[f"reward/{name}"] = masked_mean(comp.to(valid.device), valid)
    return {k: float(v) for k, v in metrics.items()}
