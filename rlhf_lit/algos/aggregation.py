"""Loss aggregation: how a ``(B, R)`` matrix of per-token losses becomes one number.

A separate, named step (verl's ``loss_agg_mode``), so that every loss can be aggregated every way,
and micro-batching stays exact: a minibatch's aggregate is a sum over *units* (tokens or
sequences) divided by the minibatch's unit count, so a micro-batch contributes

    ``agg_loss(micro) * agg_weight(micro)``  with  ``agg_weight = units(micro) / units(minibatch)``

and the contributions add up to the minibatch's aggregate whatever the micro-batch size. The
minibatch's unit count (:func:`agg_units`) is summed over data-parallel ranks by the caller, so the
aggregate is over the global minibatch.

Modes (``m`` the mask, ``l`` the per-token losses, sequences ``i`` counted when they have a token):

- ``token-mean``: ``sum_{i,t} m l / sum_{i,t} m`` — every token weighs the same (PPO in TRL and
  the N+ paper; DAPO, Yu et al. 2025, which shows why long responses need it).
- ``seq-mean-token-mean``: ``mean_i (sum_t m l / sum_t m)`` — every response weighs the same
  (the GRPO paper, Shao et al. 2024): a token of a short response weighs more.
- ``seq-mean-token-sum``: ``mean_i sum_t m l`` — longer responses weigh more.
- ``seq-mean-token-sum-norm``: ``mean_i (sum_t m l) / L`` with a constant ``L`` (the generation
  budget, ``max_new_tokens``): Dr. GRPO's unbiased normaliser (Liu et al. 2025).
"""

from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor

from rlhf_lit.algos.masked import masked_mean, masked_sum

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm")


def _check(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"model.ppo.loss_agg_mode={mode!r}: expected one of {list(LOSS_AGG_MODES)}")


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: LossAggMode = "token-mean",
             norm_length: Optional[float] = None) -> Tensor:
    """The aggregate of ``loss_mat`` over this batch (formulas in the module docstring).

    Args:
        loss_mat: ``(B, R)`` per-token losses (entries outside ``mask`` are ignored, NaN included).
        mask: ``(B, R)`` bool.
        norm_length: ``L`` of ``seq-mean-token-sum-norm`` (default: ``R``, the padded length).
    Returns:
        A scalar; 0 for an empty mask.
    Raises:
        ValueError: an unknown mode.
    """
    _check(mode)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    mask = mask.bool()
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)
    else:
        per_seq = masked_sum(loss_mat, mask, dim=-1)
        if mode == "seq-mean-token-sum-norm":
            per_seq = per_seq / float(norm_length or mask.shape[-1])
    return masked_mean(per_seq, mask.any(-1))


def agg_units(mask: Tensor, mode: LossAggMode = "token-mean") -> Tensor:
    """How many units (tokens for ``token-mean``, sequences with a token otherwise) a batch holds,
    at least 1: the denominator of the aggregate over it. Sum it over data-parallel ranks for a
    global minibatch.

    Args:
        mask: ``(B, R)`` bool.
    Returns:
        A scalar integer tensor.
    """
    return _units(mask, mode).clamp(min=1)


def agg_weight(mask: Tensor, minibatch_units: Tensor, mode: LossAggMode = "token-mean") -> Tensor:
    """A micro-batch's share of the minibatch aggregate: ``units(micro) / minibatch_units``.

    ``sum over micro-batches of agg_loss(micro) * agg_weight(micro)`` is the minibatch's aggregate.

    Args:
        mask: ``(b, R)`` the micro-batch's mask.
        minibatch_units: :func:`agg_units` of the whole minibatch (summed over ranks).
    Returns:
        A scalar float tensor.
    """
    return _units(mask, mode) / minibatch_units


def _units(mask: Tensor, mode: str) -> Tensor:
    _check(mode)
    return mask.sum() if mode == "token-mean" else mask.bool().any(-1).sum()
