"""The chunked LM-head log-probs (rlhf_lit/head_logprobs.py) against hand-computed numbers and
against the plain ``logits -> log_softmax`` path, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from rlhf_lit.algos.logprobs import logprobs_from_logits
from rlhf_lit.algos.head_logprobs import head_logprobs


def test_hand_computed_two_token_vocabulary():
    # h = [1, 2]; W rows [1, 0], [0, 1], [1, 1] -> logits [1, 2, 3]; T = 2 -> z = [0.5, 1, 1.5].
    h = torch.tensor([[[1.0, 2.0]]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lse = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    out = head_logprobs(h, W, torch.tensor([[1]]), temperature=2.0, entropy=True)
    assert out.logprobs.item() == pytest.approx(1.0 - lse, abs=1e-6)
    p = [math.exp(z - lse) for z in (0.5, 1.0, 1.5)]
    assert out.entropy.item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), abs=1e-6)
    # d log p_1 / dh = (W_1 - sum_v p_v W_v) / T
    h.requires_grad_(True)
    (g,) = torch.autograd.grad(head_logprobs(h, W, torch.tensor([[1]]), temperature=2.0).logprobs.sum(), h)
    expected = [(0.0 - p[0] - p[2]) / 2.0, (1.0 - p[1] - p[2]) / 2.0]
    torch.testing.assert_close(g.view(-1), torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_matches_logits_path_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(40, 8, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randint(0, 40, (3, 5), generator=g)
    weights = torch.randn(3, 5, dtype=torch.float64, generator=g)

    out = head_logprobs(h, W, a, temperature=0.7, entropy=True, chunk_tokens=chunk)
    z = (h @ W.T) / 0.7
    ref = torch.log_softmax(z, -1).gather(-1, a[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref)
    torch.testing.assert_close(out.entropy, -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
    assert out.logprobs.dtype == torch.float64 and not out.entropy.requires_grad

    gh, gw = torch.autograd.grad((out.logprobs * weights).sum(), (h, W))
    rh, rw = torch.autograd.grad((ref * weights).sum(), (h, W))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randint(0, 11, (2, 4), generator=g)
    assert torch.autograd.gradcheck(lambda h, W: head_logprobs(h, W, a, 0.5, chunk_tokens=3).logprobs, (h, W))


def test_frozen_head_gets_no_gradient_and_hidden_does():
    h = torch.randn(2, 3, 4, requires_grad=True)
    W = torch.randn(9, 4)  # frozen, like the LM head under LoRA
    out = head_logprobs(h, W, torch.randint(0, 9, (2, 3)), 1.0)
    out.logprobs.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0 and W.grad is None


def test_bf16_autocast_matches_linear_then_log_softmax():
    # Under autocast the head runs in bf16 and the log-softmax in fp32, as nn.Linear + ppo.logprobs_from_logits do.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 6, 32, generator=g).bfloat16().requires_grad_(True)
    W = torch.randn(300, 32, generator=g).bfloat16()
    a = torch.randint(0, 300, (4, 6), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_logprobs(h, W, a, 0.7, chunk_tokens=5)
        ref = logprobs_from_logits(F.linear(h, W), a, 0.7)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)
    gh, = torch.autograd.grad(out.logprobs.sum(), h)
    rh, = torch.autograd.grad(ref.sum(), h)
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), rh.float(), atol=2e-2, rtol=2e-2)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"hidden \(2, 3, 4\) and tokens \(2, 4\)"):
        head_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        head_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), chunk_tokens=0)
