"""One scalar per response, read from the hidden state after its last token (a reward model's score).

The model's forward (:meth:`rlhf_lit.model.PolicyModel.forward`) returns per-position values
``v[:, j]`` from the hidden state *before* response token ``j`` (the state that predicts it):
``v[:, 0]`` reads the last prompt token, ``v[:, j]`` reads response token ``j - 1``. A reward model
reads the state after the response's last token (its stop token), which is ``v[:, n]`` for a
response of ``n`` tokens: one column past the response. :func:`with_trailing_pad` adds that column
(a PAD token outside the mask, so nothing attends to it) and :func:`score_after_last_token` picks
``v[i, n_i]`` per row, as an ``AutoModelForSequenceClassification`` reads its last non-pad token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lit.algos.rollout_batch import ResponseBatch


def with_trailing_pad(batch: ResponseBatch, pad_token_id: int) -> ResponseBatch:
    """``batch`` with one more response column, PAD and outside the mask, so that every response's
    last token has a column after it.

    Args:
        batch: prompts ``(B, P)`` left-padded, responses ``(B, R)`` right-padded.
    Returns:
        A :class:`ResponseBatch` with responses ``(B, R + 1)``.
    """
    ids, mask = batch.response_ids, batch.response_mask
    pad = torch.full((ids.shape[0], 1), pad_token_id, dtype=ids.dtype, device=ids.device)
    return batch._replace(response_ids=torch.cat([ids, pad], 1),
                          response_mask=torch.cat([mask, torch.zeros_like(mask[:, :1])], 1))


def score_after_last_token(values: Tensor, response_mask: Tensor) -> Tensor:
    """``values[i, n_i]`` with ``n_i = sum_t mask[i, t]``: the value read after row ``i``'s last
    response token.

    Args:
        values: ``(B, R + 1)`` per-position values of a batch made by :func:`with_trailing_pad`.
        response_mask: ``(B, R + 1)`` its mask (contiguous from column 0).
    Returns:
        ``(B,)`` in the values' dtype (differentiable).
    Raises:
        ValueError: a response fills the last column (no column after it: use :func:`with_trailing_pad`).
    """
    n = response_mask.long().sum(-1)
    if bool((n >= values.shape[1]).any()):
        raise ValueError("a response reaches the last column, so no value is read after it: "
                         "build the batch with with_trailing_pad")
    return values.gather(1, n[:, None]).squeeze(1)


__all__ = ["score_after_last_token", "with_trailing_pad"]
