"""Log-probs of chosen tokens straight from hidden states, without materialising the logits.

For a 152k-token vocabulary the LM head's logits dominate a PPO micro-batch's activation memory:
``16 x 128`` response positions give a 0.6 GB bf16 logit tensor, and the fp32 softmax that autograd
keeps for the backward pass is twice that again. Here the head's matrix product and the
log-softmax run ``chunk_tokens`` positions at a time, the forward keeps only the hidden states and
one ``logsumexp`` per position, and the backward recomputes each chunk's logits (one extra head
GEMM) to form its gradient. Peak extra memory: a few ``chunk_tokens x V`` fp32 buffers, whatever
the micro-batch.

Numerics match :func:`rlhf_lit.algos.logprobs.logprobs_from_logits` of ``lm_head(h)`` under autocast:
the head's product runs in the autocast dtype (bf16 on a GPU) and everything after it in fp32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class HeadLogprobs(NamedTuple):
    """Per-position outputs of :func:`head_logprobs`.

    Attributes:
        logprobs: ``(..., )`` float32 (float64 for float64 inputs) ``log softmax(h W^T / T)[a]``, differentiable in ``h`` (and ``W``).
        entropy: ``(..., )`` float32 entropy of ``softmax(h W^T / T)``, or None when not asked; never
            differentiable.
    """

    logprobs: Tensor
    entropy: Optional[Tensor]


def head_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, temperature: float = 1.0,
                  entropy: bool = False, chunk_tokens: int = 256) -> HeadLogprobs:
    """``log pi(a) = z_a - logsumexp(z)`` with ``z = (h W^T) / T``, chunked over positions.

    Gradients: ``dL/dz = g (onehot(a) - softmax(z))``, ``dL/dh = (dL/dz / T) W`` and
    ``dL/dW = (dL/dz / T)^T h``, formed chunk by chunk in the backward pass from recomputed logits.

    Args:
        hidden: ``(..., d)`` hidden states that feed the LM head.
        weight: ``(V, d)`` LM-head weight (no bias).
        tokens: ``(...)`` long, the chosen tokens.
        temperature: sampling temperature ``T``.
        entropy: also return ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.
        chunk_tokens: positions per chunk; each chunk holds a few ``chunk_tokens x V`` fp32 buffers.
    Returns:
        :class:`HeadLogprobs` with ``(...)``-shaped float32 tensors.
    """
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} disagree")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lead = tokens.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    a = tokens.reshape(-1)
    dtype = _compute_dtype(hidden, weight)
    logp, ent = _HeadLogprobs.apply(h, weight, a, float(temperature), bool(entropy), int(chunk_tokens), dtype)
    return HeadLogprobs(logp.view(lead), ent.view(lead) if entropy else None)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's when it is on (as ``nn.Linear`` would)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, weight: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    z = torch.mm(h.to(dtype), weight.to(dtype).t())
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # softmax maths in fp32 (fp64 stays fp64)
    return z.div_(temperature) if temperature != 1.0 else z


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, tokens, temperature, want_entropy, chunk, dtype):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else logp.new_empty(0)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z = _chunk_logits(h[s:e], weight, dtype, temperature)
                lse[s:e] = torch.logsumexp(z, dim=-1)
                logp[s:e] = z.gather(1, tokens[s:e, None]).squeeze(1) - lse[s:e]
                if want_entropy:
                    # H = lse - sum p z, with p = exp(z - lse): one more chunk-sized buffer, exp'd in place.
                    zp = torch.sub(z, lse[s:e, None]).exp_().mul_(z)
                    ent[s:e] = lse[s:e] - zp.sum(-1)
        ctx.save_for_backward(h, weight, tokens, lse)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        h, weight, tokens, lse = ctx.saved_tensors
        T, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        w = weight.to(dtype)
        g = grad_logp.to(lse.dtype) / T  # dz/d(hW^T) = 1/T
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                z = _chunk_logits(h[s:e], weight, dtype, T)
                # dL/d(hW^T) = (g / T) (onehot(a) - p): p in place over z's buffer (one chunk-sized
                # fp32 buffer fewer while every layer's activations are still held), then the one-hot term.
                dz = z.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
                dz.scatter_add_(1, tokens[s:e, None], g[s:e, None])
                dz = dz.to(dtype)
                if need_h:
                    grad_h[s:e] = torch.mm(dz, w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(dz.t().to(lse.dtype), h[s:e].to(lse.dtype))
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None
