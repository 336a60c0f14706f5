"""Losses on preference pairs: DPO and its variants, and the Bradley-Terry reward-model loss.

A pair is a prompt ``x`` with a preferred response ``y_c`` (chosen) and a dispreferred one ``y_r``
(rejected). Every function takes per-pair tensors (shape ``(P,)``, one entry per pair) and returns
per-pair losses; turning them into one number is a separate step (:func:`pair_mean` and its
micro-batch weight :func:`pair_weight`), as in :mod:`rlhf_lit.algos.aggregation`, so that the
loss of a minibatch is the sum of its micro-batches' ``pair_mean * pair_weight`` exactly.

DPO (Rafailov et al. 2023, "Direct Preference Optimization") reads the policy's log-likelihood
ratio to a frozen reference as an implicit reward,

    ``r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))``   (sequence log-probs: sums over tokens)

and with ``Delta = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]`` the losses are:

- ``sigmoid``: ``-(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)``: DPO's eq. 7; with
  label smoothing ``eps > 0`` it is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with
  noisy preferences"): the labels are assumed flipped with probability ``eps``.
- ``robust``: ``[-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps)``
  (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8): an unbiased estimate of the clean-label
  loss when labels flip with probability ``eps < 1/2``.
- ``hinge``: ``max(0, 1 - beta Delta)``: SLiC's calibration loss (Zhao et al. 2023, "SLiC-HF") on
  the reference-normalised log-ratios, with ``1 / beta`` as the margin (TRL's form).
- ``ipo``: ``(Delta_bar - 1 / (2 beta))^2`` (Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences", eq. 17), where ``Delta_bar`` uses log-ratios
  averaged over each response's tokens (as TRL does, a normalisation the IPO authors confirmed);
  it needs the response lengths.

The Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1) on scalar
scores ``r_c, r_r`` of a reward model, with Llama 2's optional margin ``m`` (Touvron et al. 2023,
eq. 2; e.g. from the raters' rating difference):

    ``-log sigma(r_c - r_r - m)``

optionally plus ``c (r_c + r_r)^2``, which keeps the scores centred (Eisenstein et al. 2023).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")
SMOOTHED_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust")


class DPOLoss(NamedTuple):
    """Per-pair outputs of :func:`dpo_loss`.

    Attributes:
        losses: ``(P,)`` the per-pair loss (differentiable).
        chosen_rewards: ``(P,)`` ``beta * (log pi(y_c) - log pi_ref(y_c))``, detached (TRL's
            ``rewards/chosen``).
        rejected_rewards: ``(P,)`` the same for ``y_r``, detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def check_dpo_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raises ValueError, naming ``model.dpo.<field>``, for an unknown loss type, ``beta <= 0``, or a
    label smoothing outside ``[0, 0.5)`` or given to a loss that does not use it."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"model.dpo.loss_type={loss_type!r}: expected one of {list(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"model.dpo.beta={beta}: must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"model.dpo.label_smoothing={label_smoothing}: must be in [0, 0.5)")
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"model.dpo.label_smoothing={label_smoothing}: only the {list(SMOOTHED_LOSS_TYPES)} "
                         f"losses use it, not {loss_type!r}")


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             beta: float = 0.1, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None) -> DPOLoss:
    """The DPO-family loss of each pair (formulas in the module docstring).

    Args:
        chosen_logps, rejected_logps: ``(P,)`` the policy's sequence log-probs ``sum_t log pi(y_t | x, y_<t)``
            of the chosen and rejected responses (differentiable).
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` the same under the frozen reference.
        beta: the KL-regularisation strength ``beta > 0`` (IPO's ``tau``).
        loss_type: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        label_smoothing: ``eps`` in ``[0, 0.5)`` of ``sigmoid`` (cDPO) and ``robust``.
        chosen_lengths, rejected_lengths: ``(P,)`` response tokens per pair; required by ``ipo``.
    Returns:
        :class:`DPOLoss` of ``(P,)`` tensors in the log-probs' dtype.
    Raises:
        ValueError: bad options (:func:`check_dpo_options`), or ``ipo`` without lengths.
    """
    check_dpo_options(loss_type, beta, label_smoothing)
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' averages the log-ratios over each response's tokens: "
                             "pass chosen_lengths and rejected_lengths")
        per_token = (chosen_ratio / chosen_lengths.clamp(min=1).to(delta.dtype)
                     - rejected_ratio / rejected_lengths.clamp(min=1).to(delta.dtype))
        losses = (per_token - 1 / (2 * beta)) ** 2
    return DPOLoss(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None,
                       center_coefficient: float = 0.0) -> Tensor:
    """``-log sigma(r_c - r_r - m) + c (r_c + r_r)^2`` per pair: Bradley-Terry with Llama 2's margin
    ``m`` and, for ``c > 0``, a term that pulls the scores towards mean 0 (Eisenstein et al. 2023,
    "Helping or Herding?"; TRL's ``center_rewards_coefficient``): a scale-free Bradley-Terry model
    otherwise drifts, and PPO reads the score itself.

    Args:
        chosen_scores, rejected_scores: ``(P,)`` the reward model's scalar scores (differentiable).
        margin: ``(P,)`` the margin each pair must be won by, or None for 0 (the plain loss).
        center_coefficient: ``c >= 0``.
    Returns:
        ``(P,)`` losses.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def sequence_logps(logprobs: Tensor, mask: Tensor) -> Tensor:
    """``sum_t m_t log pi(y_t | ...)``: a response's log-probability from its per-token log-probs.

    Args:
        logprobs: ``(B, R)`` per-token log-probs (entries outside ``mask`` ignored, NaN included).
        mask: ``(B, R)`` bool, true on the response's tokens.
    Returns:
        ``(B,)``.
    """
    return torch.where(mask.bool(), logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Aggregation over pairs, exact under micro-batching (the pattern of algos/aggregation.py)
# ---------------------------------------------------------------------------------------------
def pair_mean(losses: Tensor) -> Tensor:
    """The mean of per-pair losses ``(P,)`` over this batch (0 for an empty batch)."""
    return losses.sum() / max(losses.numel(), 1)


def pair_units(pairs: int, device: torch.device | str = "cpu") -> Tensor:
    """The denominator of a minibatch's :func:`pair_mean`, at least 1, as a tensor (sum it over
    data-parallel ranks for a global minibatch)."""
    return torch.tensor(max(int(pairs), 1), dtype=torch.float32, device=device)


def pair_weight(micro_pairs: int, minibatch_units: Tensor) -> Tensor:
    """A micro-batch's share of the minibatch mean: ``micro_pairs / minibatch_units``, so that the
    sum over micro-batches of ``pair_mean(micro) * pair_weight(micro)`` is the minibatch's mean."""
    return micro_pairs / minibatch_units


__all__ = [
    "DPOLoss", "DPOLossType", "DPO_LOSS_TYPES", "bradley_terry_loss", "check_dpo_options", "dpo_loss", "pair_mean",
    "pair_units", "pair_weight", "sequence_logps",
]
