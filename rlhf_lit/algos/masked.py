"""Masked statistics over the response tokens: sums, means, variances, whitening.

Masks are boolean (or 0/1) tensors broadcastable to the values; entries outside the mask never
contribute, even when they hold NaN or inf.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """``sum_i x_i * m_i`` over ``dim`` (all elements when None). NaNs under the mask are ignored."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """``sum(x * m) / sum(m)``; 0 where the mask is empty (never NaN)."""
    n = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements: ``sum(m * (x - mean)^2) / (n - 1)`` (``/ n`` if not unbiased).

    Returns 0 when fewer than two elements (one for biased) are under the mask.
    """
    n = mask.bool().sum()
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return sq / denom.clamp(min=1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked elements; add the mean back when
    ``shift_mean`` is False (reward whitening keeps the mean). Masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse. NaN-free: 0 when the returns have no variance."""
    var_r = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-12)
    return torch.where(var_r > 0, ev, torch.zeros_like(ev))
