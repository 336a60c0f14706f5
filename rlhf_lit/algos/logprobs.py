"""Log-probabilities and entropies of sampled tokens, from logits.

For log-probs straight from hidden states (no ``B x R x V`` logits at all), see
:mod:`rlhf_lit.algos.head_logprobs`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int = 4) -> Tensor:
    """``log softmax(z / T)[a]`` for the chosen tokens ``a``.

    ``log pi(a) = z_a / T - logsumexp(z / T)``, computed in fp32 ``chunk_rows`` sequences at a time
    so fp32 logits of shape ``(B, R, V)`` are never materialised at once (152k-token vocabularies).

    Args:
        logits: ``(B, R, V)`` in any float dtype.
        tokens: ``(B, R)`` long.
        temperature: the sampling temperature; the same one must be used for old, new and
            reference log-probs, or the PPO ratio does not start at 1.
    Returns:
        ``(B, R)`` float32.
    """
    out = []
    for z, a in zip(logits.split(chunk_rows), tokens.split(chunk_rows)):
        z = z.float() / temperature
        out.append(z.gather(-1, a.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_rows: int = 4) -> Tensor:
    """Entropy of ``softmax(z / T)``: ``H = logsumexp(z) - sum_v p_v z_v`` with ``z = logits / T``.

    Args:
        logits: ``(B, R, V)``.
    Returns:
        ``(B, R)`` float32.
    """
    out = []
    for z in logits.split(chunk_rows):
        z = z.float() / temperature
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.cat(out)
