"""Sampled responses cut after their first stop token: ids, mask, last index.

The mask comes from the position of the first stop token, never from comparing ids with PAD: a
policy may sample the PAD token as an ordinary token.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


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


def truncate_after_stop(response_ids: Tensor, stop_token_ids: Sequence[int], pad_token_id: int) -> TruncatedResponse:
    """Cut each response after its first stop token (kept) and fill the rest with PAD.

    Args:
        response_ids: ``(B, R)`` generated tokens.
        stop_token_ids: ids that end a response (EOS, e.g. ``<|im_end|>``).
        pad_token_id: id written after the stop (must differ from every stop id).
    Raises:
        ValueError: PAD is one of the stop ids.
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
