"""Loss aggregation: how a ``(B, R)`` matrix of per-token losses becomes one number.

A separate, named step (verl's ``loss_agg_mode``), so that every loss can be aggregated every way,
and micro-batching stays exact: a minibatch's aggregate is a sum over *units* (tokens or
sequences) divided by the minibatch's unit count, so a micro-batch contributes

    ``agg_loss(micro) * agg_weight(micro)``  with  ``agg_weight = units(micro) / units(minibatch)``

and the contributions add up to the minibatch's aggregate whatever the micro-batch size. The
minibatch's unit count (:func:`agg_units`) is summed over data-parallel ranks by the caller, so the
aggregate is over the global minibatch.

Modes:

- ``token-mean``: ``sum_{i,t} m_it l_it / sum_{i,t} m_it`` — every token weighs the same
  (PPO as in TRL and the N+ paper; DAPO's choice).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from rlhf_lit.algos.masked import masked_mean

LossAggMode = Literal["token-mean"]
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean",)


def _check(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"model.ppo.loss_agg_mode={mode!r}: expected one of {list(LOSS_AGG_MODES)}")


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: LossAggMode = "token-mean") -> Tensor:
    """The aggregate of ``loss_mat`` over this batch (formulas in the module docstring).

    Args:
        loss_mat: ``(B, R)`` per-token losses (entries outside ``mask`` are ignored, NaN included).
        mask: ``(B, R)`` bool.
    Returns:
        A scalar; 0 for an empty mask.
    Raises:
        ValueError: an unknown mode.
    """
    _check(mode)
    return masked_mean(loss_mat, mask)


def agg_units(mask: Tensor, mode: LossAggMode = "token-mean") -> Tensor:
    """How many units (tokens for ``token-mean``) a batch holds, at least 1: the denominator of the
    aggregate over it. Sum it over data-parallel ranks for a global minibatch.

    Args:
        mask: ``(B, R)`` bool.
    Returns:
        A scalar integer tensor.
    """
    _check(mode)
    return mask.sum().clamp(min=1)


def agg_weight(mask: Tensor, minibatch_units: Tensor, mode: LossAggMode = "token-mean") -> Tensor:
    """A micro-batch's share of the minibatch aggregate: ``units(micro) / minibatch_units``.

    ``sum over micro-batches of agg_loss(micro) * agg_weight(micro)`` is the minibatch's aggregate.

    Args:
        mask: ``(b, R)`` the micro-batch's mask.
        minibatch_units: :func:`agg_units` of the whole minibatch (summed over ranks).
    Returns:
        A scalar float tensor.
    """
    _check(mode)
    return mask.sum() / minibatch_units
