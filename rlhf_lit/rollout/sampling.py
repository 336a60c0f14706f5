"""Sampling maths shared by the engines: top-k / top-p filtering as HF's warpers do it, and a
graph-safe categorical draw. Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """HF's ``TopKLogitsWarper`` then ``TopPLogitsWarper`` (min_tokens_to_keep=1), out of place:
    keep the ``top_k`` largest scores (0: all), then drop the least likely tokens whose cumulative
    probability stays below ``1 - top_p`` (1.0: none). Graph-safe (no host syncs)."""
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p >= 1.0:
        return scores
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def sample_from_logits(scores: Tensor, top_k: int = 0, top_p: float = 1.0, generator=None) -> Tensor:
    """One token per row from ``softmax(filter_logits(scores))``, graph-safe (see
    :func:`sample_from_filtered`)."""
    return sample_from_filtered(filter_logits(scores, top_k, top_p), generator)


def sample_from_filtered(scores: Tensor, generator=None) -> Tensor:
    """One token per row from ``softmax(scores)`` (scores already filtered), graph-safe.

    Exponential race: ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` picks ``i`` with probability
    ``p_i``. ``E_i = -log(u_i)`` with ``u_i`` in [0, 1) is never 0 (a 0 would give 0/0 = NaN for
    filtered tokens), so the race is written as ``argmin p_i / log(u_i)``.
    """
    probs = torch.softmax(scores, -1)
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    # In place: at GRPO batch sizes (512 rows x 152k) each fp32 buffer is 0.3 GB of the rollout's peak.
    return torch.argmin(probs.div_(u.log_()), -1)
