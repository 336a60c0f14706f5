"""Statistics over groups of responses to the same prompt (GRPO / RLOO / REINFORCE++-baseline).

A rollout of ``B`` prompts sampled ``n`` times each holds ``B x n`` responses; ``group_index``
``(B x n,)`` names each response's prompt. Groups may have any size (a group of one included).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GroupStats(NamedTuple):
    """Per-response statistics of its group, each ``(N,)``.

    Attributes:
        mean: mean score of the group.
        std: unbiased standard deviation of the group's scores (0 for a group of one).
        size: number of responses in the group.
    """

    mean: Tensor
    std: Tensor
    size: Tensor


def group_index(num_prompts: int, samples_per_prompt: int, device=None) -> Tensor:
    """``(num_prompts * samples_per_prompt,)`` long: ``[0]*n + [1]*n + ...`` (samples of a prompt adjacent)."""
    return torch.arange(num_prompts, device=device).repeat_interleave(samples_per_prompt)


def group_stats(scores: Tensor, index: Tensor) -> GroupStats:
    """Mean, unbiased std and size of each response's group.

    ``mean_g = sum_{i in g} s_i / n_g``, ``std_g = sqrt(sum_{i in g} (s_i - mean_g)^2 / (n_g - 1))``
    (0 when ``n_g = 1``).

    Args:
        scores: ``(N,)`` float.
        index: ``(N,)`` long group ids (any non-negative integers).
    """
    groups = int(index.max()) + 1 if index.numel() else 0
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    s = scores.to(dtype)
    size = torch.zeros(groups, dtype=dtype, device=s.device).index_add_(0, index, torch.ones_like(s))
    total = torch.zeros(groups, dtype=dtype, device=s.device).index_add_(0, index, s)
    mean = (total / size.clamp(min=1))[index]
    sq = torch.zeros(groups, dtype=dtype, device=s.device).index_add_(0, index, (s - mean) ** 2)
    var = sq / (size - 1).clamp(min=1)
    return GroupStats(mean, var.sqrt()[index], size[index])


def zero_signal_groups(scores: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """``(N,)`` bool: responses whose group's valid scores are all equal (a group of one included):
    every group-relative advantage of theirs is 0, so they carry no learning signal (DAPO's
    dynamic sampling leaves them out of the update; Yu et al. 2025)."""
    groups = int(index.max()) + 1 if index.numel() else 0
    big = torch.finfo(torch.float32).max
    s = scores.float()
    lo = torch.full((groups,), big, device=s.device).scatter_reduce(0, index, torch.where(valid, s, big), "amin")
    hi = torch.full((groups,), -big, device=s.device).scatter_reduce(0, index, torch.where(valid, s, -big), "amax")
    return (hi <= lo)[index]
