"""Statistics of the test report: pure functions of 1-D tensors, and the torchmetrics states
that collect per-sample values across data-parallel ranks.

Nothing here reads or writes files or knows about Lightning: every function takes tensors (or
texts) and returns numbers, so each can be checked against a direct numpy computation.

- :func:`summary_stats`, :func:`win_rate`, :func:`group_means`, :func:`bootstrap_ci`: figures of
  score series;
- :func:`ngrams`, :func:`distinct_n`: lexical diversity of responses;
- :func:`stable_hash`: a process-independent 64-bit hash (prompt keys, n-gram ids);
- :class:`Int64Cat`, :class:`DistinctN`: metric states synced (concatenated) across ranks at
  ``compute()``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


# -------------------------------------------------------------------------------------------
# Statistics: pure functions of 1-D tensors
# -------------------------------------------------------------------------------------------
def summary_stats(x: Tensor) -> dict[str, Optional[float]]:
    """``n``, ``mean``, ``std`` (sample std, ddof 1; 0 for one value), ``median``, ``p10``, ``p90``
    (linear interpolation, as ``numpy.quantile``), ``min`` and ``max``; None when ``x`` is empty."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    n = int(x.numel())
    if n == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "median", "p10", "p90", "min", "max"))}
    q = torch.quantile(x, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
    return {
        "n": n, "mean": float(x.mean()), "std": float(x.std()) if n > 1 else 0.0,
        "median": float(q[0]), "p10": float(q[1]), "p90": float(q[2]), "min": float(x.min()), "max": float(x.max()),
    }


def win_rate(a: Tensor, b: Tensor) -> dict[str, Optional[float]]:
    """Paired comparison of ``a`` (RLHF) with ``b`` (SFT): counts of wins, ties and losses, and
    ``win_rate = (wins + ties / 2) / n`` (None for no pairs)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).reshape(-1), torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = int(a.numel())
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": n - wins - ties}


def group_means(values: Tensor, keys: Tensor) -> Tensor:
    """Mean of ``values`` per distinct key (e.g. the per-prompt mean over several samples), in
    the order of the sorted keys."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    uniq, inverse = torch.unique(torch.as_tensor(keys).reshape(-1), return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, values)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    return sums / counts


def bootstrap_ci(x: Tensor, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap confidence interval of the mean of ``x``.

    ``n_resamples`` means of ``len(x)`` values drawn with replacement from ``sorted(x)`` by
    ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``; the interval is their
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles. Sorting first makes the interval
    a function of the values only, not of their order (which depends on how ranks split the data).
    None for an empty ``x``.
    """
    d = np.sort(np.asarray(torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()))
    n = len(d)
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for s in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - s)
        means[s:s + k] = d[rng.integers(0, n, (k, n))].mean(1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word n-grams of ``text`` (whitespace tokens, case kept)."""
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of all ``texts``
    (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def stable_hash(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


# -------------------------------------------------------------------------------------------
# torchmetrics states: synced across data-parallel ranks at compute()
# -------------------------------------------------------------------------------------------
class Int64Cat(Metric):
    """Concatenates int64 values across updates and ranks (``CatMetric`` casts to float, which
    would corrupt 64-bit hashes)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor) -> None:
        self.values.append(torch.as_tensor(values, dtype=torch.int64, device=self.device).reshape(-1))

    def compute(self) -> Tensor:
        if isinstance(self.values, list) and not self.values:
            return torch.zeros(0, dtype=torch.int64)
        return dim_zero_cat(self.values)  # a list of updates, or one tensor after a distributed sync


class DistinctN(Metric):
    """Distinct-n over every response seen by every rank: n-grams are kept as 64-bit hashes, so
    the distinct count is taken over the union of all ranks' n-grams, not averaged per rank."""

    full_state_update = False

    def __init__(self, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.add_state("hashes", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str]) -> None:
        hs = [stable_hash("\x1f".join(g)) for t in texts for g in ngrams(t, self.n)]
        self.hashes.append(torch.tensor(hs, dtype=torch.int64, device=self.device))
        self.total += len(hs)

    def compute(self) -> Tensor:
        total = int(self.total)
        if total == 0:
            return torch.tensor(0.0)
        return torch.tensor(torch.unique(dim_zero_cat(self.hashes)).numel() / total)


__all__ = ["DistinctN", "Int64Cat", "bootstrap_ci", "distinct_n", "group_means", "ngrams", "stable_hash",
           "summary_stats", "win_rate"]
