"""KL divergence to the reference policy: per-token estimators and the adaptive coefficient."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with ``log r = log pi_ref - log pi``
    (Schulman 2020, "Approximating KL divergence"):

    - k1: ``-log r`` (unbiased, can be negative; TRL's default)
    - k2: ``(log r)^2 / 2`` (biased, low variance, non-negative)
    - k3: ``(r - 1) - log r`` (unbiased, non-negative)

    Args:
        logprobs, ref_logprobs: any shape, usually ``(B, R)``.
    Returns:
        The same shape as the inputs.
    Raises:
        ValueError: an unknown estimator name.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019)'s proportional controller for beta:

    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``,
    with ``n_steps`` the number of samples (episodes) since the last update and KL in nats per sequence.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
