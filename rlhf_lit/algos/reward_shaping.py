"""From the reward backend's scores to per-token rewards: penalties, normalisation, KL penalty.

``penalize_missing_eos`` and ``normalize_scores`` are the sequence-level adjustments (a penalty for
responses that never stop, running normalisation, clipping); ``kl_penalized_rewards`` spreads
``-beta * KL`` over the tokens and puts the score on the last one (Ziegler et al. 2019).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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


def penalize_missing_eos(scores: Tensor, has_stop: Tensor, penalty: Optional[float]) -> Tensor:
    """``score - penalty`` for responses that hit the length limit without a stop token (TRL's
    ``missing_eos_penalty``; N+ implementation details); unchanged when ``penalty`` is None.

    Args:
        scores: ``(B,)`` float.
        has_stop: ``(B,)`` bool.
    Returns:
        ``(B,)``, a new tensor.
    """
    scores = scores.clone()
    if penalty is not None:
        scores = scores - penalty * (~has_stop).float()
    return scores


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 for responses of at most
    ``L - buffer`` tokens, then ``-penalty * (length - (L - buffer)) / buffer``, reaching
    ``-penalty`` at ``L = max_new_tokens``.

    Args:
        lengths: ``(B,)`` response lengths in tokens.
    Returns:
        ``(B,)`` float, <= 0, to add to the scores.
    """
    excess = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0)
    return -penalty * (excess / buffer).clamp(max=1.0)


def normalize_scores(scores: Tensor, moments: Optional[RunningMoments], clip: Optional[float]) -> Tensor:
    """``clip((score - mean) / std, -clip, clip)`` with running ``moments`` (skipped when None; the
    caller folds every data-parallel rank's valid scores into them first) and ``clip`` (skipped when
    None).

    Args:
        scores: ``(B,)`` float.
    Returns:
        ``(B,)``.
    """
    if moments is not None:
        scores = (scores - moments.mean) / moments.std
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


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
