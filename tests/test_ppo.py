"""Tests for :mod:`rlhf_lit.algos` (PPO maths): every function against small tensors worked out by hand.

Expected values are computed in the tests with plain Python arithmetic on scalars (or written
out in comments), never by calling the same tensor formula as the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lit.algos.advantages import gae
from rlhf_lit.algos.kl import adaptive_kl_coef, kl_estimate
from rlhf_lit.algos.logprobs import entropy_from_logits, logprobs_from_logits
from rlhf_lit.algos.losses import PolicyLoss, ValueLoss, clipped_policy_loss, clipped_value_loss
from rlhf_lit.algos.masked import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_lit.algos.responses import TruncatedResponse, truncate_after_stop
from rlhf_lit.algos.reward_shaping import RunningMoments, kl_penalized_rewards
from rlhf_lit.algos.rollout_batch import Rollout

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def bmask(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


def expect(actual: torch.Tensor, expected, atol: float = 1e-9, rtol: float = 1e-7) -> None:
    """Compare a tensor with a (nested) Python list or scalar of expected values."""
    expected = torch.as_tensor(expected, dtype=actual.dtype) if not isinstance(expected, torch.Tensor) else expected
    assert_close(actual, expected.to(actual.dtype).reshape(actual.shape), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------
class TestMaskedStats:
    # Masked elements: 1, 2 (row 0) and 5 (row 1).
    X = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    M = [[True, True, False, False], [True, False, False, False]]

    def test_masked_sum(self):
        x, m = t64(self.X), bmask(self.M)
        expect(masked_sum(x, m), 1.0 + 2.0 + 5.0)
        expect(masked_sum(x, m, dim=1), [1.0 + 2.0, 5.0])
        expect(masked_sum(x, m, dim=0), [1.0 + 5.0, 2.0, 0.0, 0.0])

    def test_masked_sum_accepts_int_mask(self):
        x = t64(self.X)
        m = torch.tensor(self.M, dtype=torch.long)
        expect(masked_sum(x, m), 8.0)

    def test_masked_mean(self):
        x, m = t64(self.X), bmask(self.M)
        expect(masked_mean(x, m), (1.0 + 2.0 + 5.0) / 3)
        expect(masked_mean(x, m, dim=1), [(1.0 + 2.0) / 2, 5.0 / 1])
        # columns 2 and 3 have an empty mask: 0, not NaN
        expect(masked_mean(x, m, dim=0), [(1.0 + 5.0) / 2, 2.0, 0.0, 0.0])

    def test_masked_var_unbiased_and_biased(self):
        x, m = t64(self.X), bmask(self.M)
        mean = (1.0 + 2.0 + 5.0) / 3  # 8/3
        ss = (1.0 - mean) ** 2 + (2.0 - mean) ** 2 + (5.0 - mean) ** 2  # 25/9 + 4/9 + 49/9 = 26/3
        expect(masked_var(x, m), ss / (3 - 1))  # 13/3
        expect(masked_var(x, m, unbiased=False), ss / 3)  # 26/9
        expect(masked_var(x, m), 13.0 / 3)
        expect(masked_var(x, m, unbiased=False), 26.0 / 9)

    def test_masked_var_single_element(self):
        x = t64([3.0, 100.0])
        m = bmask([True, False])
        expect(masked_var(x, m), 0.0)  # n - 1 = 0: defined as 0
        expect(masked_var(x, m, unbiased=False), 0.0)  # (3 - 3)^2 / 1

    def test_all_false_mask_gives_zeros_not_nan(self):
        x = t64([[1.0, 2.0], [3.0, float("nan")]])
        m = torch.zeros(2, 2, dtype=torch.bool)
        for out in (
            masked_sum(x, m),
            masked_mean(x, m),
            masked_var(x, m),
            masked_var(x, m, unbiased=False),
            masked_whiten(x, m),
            masked_whiten(x, m, shift_mean=False),
            masked_mean(x, m, dim=1),
        ):
            assert torch.isfinite(out).all()
            assert (out == 0).all()

    def test_nan_under_mask_is_ignored(self):
        nan = float("nan")
        x = t64([1.0, nan, 3.0, float("inf")])
        m = bmask([True, False, True, False])
        expect(masked_sum(x, m), 4.0)
        expect(masked_mean(x, m), 2.0)
        expect(masked_var(x, m), ((1.0 - 2.0) ** 2 + (3.0 - 2.0) ** 2) / 1)  # 2
        w = masked_whiten(x, m)
        assert torch.isfinite(w).all()
        # (1 - 2) / sqrt(2), (3 - 2) / sqrt(2); masked entries 0
        expect(w, [-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2), 0.0], atol=1e-6)

    def test_whiten_hand_values(self):
        x = t64([2.0, 4.0, 6.0, 8.0, 1000.0])
        m = bmask([True, True, True, True, False])
        mean = (2 + 4 + 6 + 8) / 4  # 5
        var = ((-3) ** 2 + (-1) ** 2 + 1**2 + 3**2) / (4 - 1)  # 20/3, unbiased
        std = math.sqrt(var + 1e-8)
        expected = [(2 - mean) / std, (4 - mean) / std, (6 - mean) / std, (8 - mean) / std, 0.0]
        w = masked_whiten(x, m)
        expect(w, expected)
        # whitened: mean 0, unbiased variance ~1 on the mask
        expect(masked_mean(w, m), 0.0, atol=1e-12)
        expect(masked_var(w, m), 1.0, atol=1e-6)

    def test_whiten_keeps_mean_when_shift_mean_false(self):
        x = t64([2.0, 4.0, 6.0, 8.0, 1000.0])
        m = bmask([True, True, True, True, False])
        std = math.sqrt(20.0 / 3 + 1e-8)
        w = masked_whiten(x, m, shift_mean=False)
        expect(w, [-3 / std + 5, -1 / std + 5, 1 / std + 5, 3 / std + 5, 0.0])
        expect(masked_mean(w, m), 5.0)
        expect(masked_var(w, m), 1.0, atol=1e-6)

    def test_whiten_2d(self):
        x = t64([[1.0, 3.0, 9.0], [5.0, -7.0, 9.0]])
        m = bmask([[True, True, False], [True, False, False]])
        # elements 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
        std = math.sqrt(4.0 + 1e-8)
        expect(masked_whiten(x, m), [[-2 / std, 0.0, 0.0], [2 / std, 0.0, 0.0]])


# --------------------------------------------------------------------------------------------
# Log-probs and entropy
# --------------------------------------------------------------------------------------------
LOGITS_2x3x4 = [
    [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.25]],
    [[-0.5, 1.5, 2.5, 0.0], [4.0, 1.0, -3.0, 2.0], [0.1, 0.2, 0.3, 0.4]],
]
TOKENS_2x3 = [[1, 3, 0], [2, 0, 3]]


def manual_logprob(row: list[float], token: int, temperature: float) -> float:
    """log softmax(row / T)[token] with scalar math."""
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return z[token] - lse


def manual_entropy(row: list[float], temperature: float) -> float:
    z = [v / temperature for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    p = [v / s for v in e]
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


class TestLogprobs:
    @pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
    def test_against_manual_log_softmax(self, temperature):
        logits = torch.tensor(LOGITS_2x3x4)
        tokens = torch.tensor(TOKENS_2x3)
        out = logprobs_from_logits(logits, tokens, temperature=temperature)
        assert out.shape == (2, 3) and out.dtype == torch.float32
        expected = [
            [manual_logprob(LOGITS_2x3x4[b][t], TOKENS_2x3[b][t], temperature) for t in range(3)] for b in range(2)
        ]
        expect(out, expected, atol=1e-6, rtol=1e-6)

    def test_hand_value_uniform_row(self):
        # Row [0, 0, 0, 0] at any temperature: log(1/4)
        logits = torch.tensor(LOGITS_2x3x4)
        tokens = torch.tensor(TOKENS_2x3)
        for temperature in (0.5, 2.0):
            out = logprobs_from_logits(logits, tokens, temperature=temperature)
            expect(out[0, 1], -math.log(4.0), atol=1e-6)

    def test_hand_value_two_tokens(self):
        # logits [0, ln 3], T = 1: p = [1/4, 3/4]; T = 0.5: z = [0, 2 ln 3] -> p = [1/10, 9/10]
        logits = torch.tensor([[[0.0, math.log(3.0)]]])
        for temperature, p1 in ((1.0, 3 / 4), (0.5, 9 / 10), (2.0, math.sqrt(3) / (1 + math.sqrt(3)))):
            out = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=temperature)
            expect(out, [[math.log(p1)]], atol=1e-6)

    def test_chunking_is_exact(self):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(7, 5, 11, generator=g)
        tokens = torch.randint(0, 11, (7, 5), generator=g)
        a = logprobs_from_logits(logits, tokens, temperature=0.7, chunk_rows=1)
        b = logprobs_from_logits(logits, tokens, temperature=0.7, chunk_rows=1000)
        c = logprobs_from_logits(logits, tokens, temperature=0.7, chunk_rows=3)
        assert torch.equal(a, b) and torch.equal(a, c)

    def test_gradients_flow(self):
        temperature = 2.0
        logits = torch.tensor(LOGITS_2x3x4, requires_grad=True)
        tokens = torch.tensor(TOKENS_2x3)
        out = logprobs_from_logits(logits, tokens, temperature=temperature, chunk_rows=1)
        out.sum().backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        # d log p_a / d z_v = (1[v = a] - p_v) / T
        row = LOGITS_2x3x4[1][1]
        z = [v / temperature for v in row]
        s = sum(math.exp(v) for v in z)
        p = [math.exp(v) / s for v in z]
        a = TOKENS_2x3[1][1]
        expected = [((1.0 if v == a else 0.0) - p[v]) / temperature for v in range(4)]
        expect(logits.grad[1, 1], expected, atol=1e-6)
        # each position's gradient sums to 0 over the vocabulary (softmax is shift-invariant)
        expect(logits.grad.sum(-1), torch.zeros(2, 3), atol=1e-6)

    def test_bf16_input_gives_fp32_output(self):
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(3, 4, 16, generator=g) * 3
        tokens = torch.randint(0, 16, (3, 4), generator=g)
        out_bf16 = logprobs_from_logits(logits.bfloat16(), tokens, temperature=0.7)
        out_fp32 = logprobs_from_logits(logits, tokens, temperature=0.7)
        assert out_bf16.dtype == torch.float32
        # the same as fp32 on the bf16-rounded logits, and close to the unrounded ones
        assert_close(out_bf16, logprobs_from_logits(logits.bfloat16().float(), tokens, temperature=0.7))
        assert_close(out_bf16, out_fp32, atol=0.1, rtol=0.05)

    def test_does_not_modify_input(self):
        logits = torch.tensor(LOGITS_2x3x4)
        before = logits.clone()
        logprobs_from_logits(logits, torch.tensor(TOKENS_2x3), temperature=0.5)
        assert torch.equal(logits, before)


class TestEntropy:
    @pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
    def test_uniform_logits_give_log_v(self, temperature):
        V = 8
        logits = torch.full((2, 3, V), 1.7)
        out = entropy_from_logits(logits, temperature=temperature)
        assert out.shape == (2, 3) and out.dtype == torch.float32
        expect(out, torch.full((2, 3), math.log(V)), atol=1e-6)

    def test_one_hot_is_zero(self):
        logits = torch.tensor([[[100.0, 0.0, 0.0, 0.0], [0.0, 0.0, 80.0, 0.0]]])
        out = entropy_from_logits(logits)
        assert torch.isfinite(out).all()
        expect(out, [[0.0, 0.0]], atol=1e-5)

    def test_hand_values_with_temperature(self):
        # logits [0, ln 3]: T = 1 -> p = [1/4, 3/4]; T = 2 -> p = [1, sqrt 3] / (1 + sqrt 3)
        logits = torch.tensor([[[0.0, math.log(3.0)]]])
        h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
        q = 1 / (1 + math.sqrt(3))
        h2 = -(q * math.log(q) + (1 - q) * math.log(1 - q))
        expect(entropy_from_logits(logits, temperature=1.0), [[h1]], atol=1e-6)
        expect(entropy_from_logits(logits, temperature=2.0), [[h2]], atol=1e-6)
        assert h2 > h1  # higher temperature, flatter distribution

    def test_against_manual_on_2x3x4(self):
        logits = torch.tensor(LOGITS_2x3x4)
        for temperature in (0.5, 2.0):
            out = entropy_from_logits(logits, temperature=temperature, chunk_rows=1)
            expected = [[manual_entropy(LOGITS_2x3x4[b][t], temperature) for t in range(3)] for b in range(2)]
            expect(out, expected, atol=1e-6, rtol=1e-6)

    def test_chunking_is_exact(self):
        logits = torch.randn(5, 3, 9, generator=torch.Generator().manual_seed(2))
        assert torch.equal(entropy_from_logits(logits, chunk_rows=1), entropy_from_logits(logits, chunk_rows=64))


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
PAD, EOS, EOS2 = 0, 2, 3


class TestTruncateAfterStop:
    def test_cases(self):
        ids = torch.tensor(
            [
                [5, EOS, 7, 8, 9],  # stop in the middle
                [EOS, 5, 6, 7, EOS],  # stop at position 0: single-token response
                [5, 6, 7, 8, 9],  # no stop: hits the length limit
                [PAD, 5, EOS, 9, 9],  # PAD sampled before the stop is an ordinary token
                [5, 6, 7, 8, EOS],  # stop on the last position
            ]
        )
        out = truncate_after_stop(ids, [EOS], PAD)
        assert isinstance(out, TruncatedResponse)
        assert out.response_ids.tolist() == [
            [5, EOS, PAD, PAD, PAD],
            [EOS, PAD, PAD, PAD, PAD],
            [5, 6, 7, 8, 9],
            [PAD, 5, EOS, PAD, PAD],
            [5, 6, 7, 8, EOS],
        ]
        T, F_ = True, False
        assert out.response_mask.dtype == torch.bool
        assert out.response_mask.tolist() == [
            [T, T, F_, F_, F_],
            [T, F_, F_, F_, F_],
            [T, T, T, T, T],
            [T, T, T, F_, F_],
            [T, T, T, T, T],
        ]
        assert out.last_index.tolist() == [1, 0, 4, 2, 4]
        assert out.has_stop.tolist() == [True, True, False, True, True]

    def test_two_stop_ids_first_one_wins(self):
        ids = torch.tensor([[5, EOS2, EOS, 9], [5, 6, EOS, EOS2], [EOS2, 1, 1, 1]])
        out = truncate_after_stop(ids, [EOS, EOS2], PAD)
        assert out.response_ids.tolist() == [[5, EOS2, PAD, PAD], [5, 6, EOS, PAD], [EOS2, PAD, PAD, PAD]]
        assert out.last_index.tolist() == [1, 2, 0]
        assert out.has_stop.tolist() == [True, True, True]

    def test_only_second_stop_id_counts_when_first_absent(self):
        ids = torch.tensor([[4, 4, EOS2, 4]])
        out = truncate_after_stop(ids, (EOS, EOS2), PAD)
        assert out.response_ids.tolist() == [[4, 4, EOS2, PAD]]
        assert out.last_index.tolist() == [2]

    def test_pad_only_response_without_stop_is_not_empty(self):
        # the mask never comes from comparing with PAD
        ids = torch.tensor([[PAD, PAD, PAD]])
        out = truncate_after_stop(ids, [EOS], PAD)
        assert out.response_mask.tolist() == [[True, True, True]]
        assert out.last_index.tolist() == [2] and out.has_stop.tolist() == [False]

    def test_input_not_modified(self):
        ids = torch.tensor([[5, EOS, 7]])
        truncate_after_stop(ids, [EOS], PAD)
        assert ids.tolist() == [[5, EOS, 7]]

    def test_pad_equal_to_stop_raises(self):
        with pytest.raises(ValueError, match="PAD"):
            truncate_after_stop(torch.tensor([[1, 2]]), [EOS], EOS)
        with pytest.raises(ValueError):
            truncate_after_stop(torch.tensor([[1, 2]]), [EOS, EOS2], EOS2)


# --------------------------------------------------------------------------------------------
# KL and rewards
# --------------------------------------------------------------------------------------------
class TestKLEstimate:
    LP = [-1.0, -2.0, -0.3]
    REF = [-1.5, -1.0, -0.3]  # log r = ref - lp = [-0.5, 1.0, 0.0]

    def test_k1(self):
        out = kl_estimate(t64(self.LP), t64(self.REF), "k1")
        expect(out, [0.5, -1.0, 0.0])

    def test_default_is_k1(self):
        expect(kl_estimate(t64(self.LP), t64(self.REF)), [0.5, -1.0, 0.0])

    def test_k2(self):
        out = kl_estimate(t64(self.LP), t64(self.REF), "k2")
        expect(out, [0.5 * 0.25, 0.5 * 1.0, 0.0])

    def test_k3(self):
        out = kl_estimate(t64(self.LP), t64(self.REF), "k3")
        # (r - 1) - log r
        expect(out, [(math.exp(-0.5) - 1) + 0.5, (math.e - 1) - 1.0, 0.0])

    def test_k2_k3_non_negative(self):
        g = torch.Generator().manual_seed(3)
        lp, ref = -torch.rand(4, 50, generator=g) * 5, -torch.rand(4, 50, generator=g) * 5
        assert (kl_estimate(lp, ref, "k2") >= 0).all()
        assert (kl_estimate(lp, ref, "k3") >= 0).all()
        assert (kl_estimate(lp, ref, "k1") < 0).any()  # k1 can go negative

    def test_shape_preserved(self):
        x = torch.zeros(2, 5)
        for est in ("k1", "k2", "k3"):
            assert kl_estimate(x, x, est).shape == (2, 5)

    def test_unknown_estimator(self):
        with pytest.raises(ValueError, match="unknown KL estimator"):
            kl_estimate(torch.zeros(2), torch.zeros(2), "k4")  # type: ignore[arg-type]


class TestKLPenalizedRewards:
    KL = [[0.1, 0.2, 0.3, 0.4]] * 3

    def test_score_on_last_real_token(self):
        kl = t64(self.KL)
        mask = bmask([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
        last_index = torch.tensor([1, -1, 3])  # stop at 1; empty response; no stop (R - 1)
        scores = t64([2.0, 5.0, 3.0])
        beta = 0.5
        out = kl_penalized_rewards(scores, kl, mask, last_index, beta)
        expect(
            out,
            [
                [-0.5 * 0.1, -0.5 * 0.2 + 2.0, 0.0, 0.0],  # score on token 1, padding 0
                [0.0, 0.0, 0.0, 0.0],  # all padding: no score at all
                [-0.5 * 0.1, -0.5 * 0.2, -0.5 * 0.3, -0.5 * 0.4 + 3.0],  # score at R - 1
            ],
        )

    def test_beta_scaling(self):
        kl = t64([[0.1, -0.2, 0.3]])
        mask = bmask([[1, 1, 1]])
        last = torch.tensor([2])
        scores = t64([1.0])
        expect(kl_penalized_rewards(scores, kl, mask, last, 0.0), [[0.0, 0.0, 1.0]])
        expect(kl_penalized_rewards(scores, kl, mask, last, 2.0), [[-0.2, 0.4, -0.6 + 1.0]])
        # beta as a tensor
        expect(kl_penalized_rewards(scores, kl, mask, last, torch.tensor(2.0, dtype=F64)), [[-0.2, 0.4, 0.4]])

    def test_non_score_reward_sum(self):
        # sum of rewards = score - beta * sum of masked kl
        kl = t64([[0.1, 0.2, 0.3, 0.4]])
        mask = bmask([[1, 1, 1, 0]])
        out = kl_penalized_rewards(t64([1.5]), kl, mask, torch.tensor([2]), 0.1)
        expect(out.sum(), 1.5 - 0.1 * (0.1 + 0.2 + 0.3))

    def test_single_token_response(self):
        out = kl_penalized_rewards(t64([4.0]), t64([[0.2, 9.0]]), bmask([[1, 0]]), torch.tensor([0]), 0.5)
        expect(out, [[-0.1 + 4.0, 0.0]])


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------
def gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """The GAE recursion on Python scalars; V and A are 0 after the last token."""
    n = len(rewards)
    adv = [0.0] * n
    next_v, next_a = 0.0, 0.0
    for t in reversed(range(n)):
        delta = rewards[t] + gamma * next_v - values[t]
        next_a = delta + gamma * lam * next_a
        adv[t] = next_a
        next_v = values[t]
    return adv, [a + v for a, v in zip(adv, values)]


class TestGAE:
    R3 = [0.1, -0.2, 1.0]
    V3 = [0.5, 0.4, 0.3]

    def test_gamma1_lam095(self):
        # t=2: delta = 1.0 + 0 - 0.3 = 0.7;                 A2 = 0.7
        # t=1: delta = -0.2 + 0.3 - 0.4 = -0.3;             A1 = -0.3 + 0.95 * 0.7 = 0.365
        # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0;               A0 = 0.0 + 0.95 * 0.365 = 0.34675
        # returns = A + V = [0.84675, 0.765, 1.0]
        adv, ret = gae(t64([self.R3]), t64([self.V3]), bmask([[1, 1, 1]]), gamma=1.0, lam=0.95)
        a2 = 1.0 - 0.3
        a1 = (-0.2 + 1.0 * 0.3 - 0.4) + 1.0 * 0.95 * a2
        a0 = (0.1 + 1.0 * 0.4 - 0.5) + 1.0 * 0.95 * a1
        expect(adv, [[a0, a1, a2]])
        expect(adv, [[0.34675, 0.365, 0.7]])
        expect(ret, [[a0 + 0.5, a1 + 0.4, a2 + 0.3]])
        expect(ret, [[0.84675, 0.765, 1.0]])

    def test_gamma09_lam05(self):
        # gamma * lam = 0.45
        # t=2: delta = 1.0 - 0.3 = 0.7;                     A2 = 0.7
        # t=1: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33;      A1 = -0.33 + 0.45 * 0.7 = -0.015
        # t=0: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04;       A0 = -0.04 + 0.45 * -0.015 = -0.04675
        adv, ret = gae(t64([self.R3]), t64([self.V3]), bmask([[1, 1, 1]]), gamma=0.9, lam=0.5)
        a2 = 1.0 + 0.9 * 0.0 - 0.3
        a1 = (-0.2 + 0.9 * 0.3 - 0.4) + 0.9 * 0.5 * a2
        a0 = (0.1 + 0.9 * 0.4 - 0.5) + 0.9 * 0.5 * a1
        expect(adv, [[a0, a1, a2]])
        expect(adv, [[-0.04675, -0.015, 0.7]])
        expect(ret, [[-0.04675 + 0.5, -0.015 + 0.4, 0.7 + 0.3]])

    def test_padding_does_not_leak(self):
        # Row 0: the 3-token example followed by 2 padded positions holding garbage;
        # row 1: a different 5-token row with no padding.
        rewards = t64([self.R3 + [7.0, -9.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
        values = t64([self.V3 + [4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
        mask = bmask([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
        adv_ref, ret_ref = gae(t64([self.R3]), t64([self.V3]), bmask([[1, 1, 1]]), gamma=1.0, lam=0.95)
        expect(adv[0, :3], adv_ref[0])
        expect(ret[0, :3], ret_ref[0])
        expect(adv[0, 3:], [0.0, 0.0])
        expect(ret[0, 3:], [0.0, 0.0])
        a1, r1 = gae_by_hand([0.0, 0.1, 0.2, 0.3, 0.4], [1.0] * 5, 1.0, 0.95)
        expect(adv[1], a1)
        expect(ret[1], r1)

    def test_hand_recursion_matches_other_settings(self):
        rewards = [0.3, -0.1, 0.0, 2.0]
        values = [0.2, -0.4, 0.6, 1.1]
        for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.5, 0.0)):
            adv, ret = gae(t64([rewards]), t64([values]), bmask([[1, 1, 1, 1]]), gamma=gamma, lam=lam)
            a, r = gae_by_hand(rewards, values, gamma, lam)
            expect(adv, [a])
            expect(ret, [r])
        # lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo return minus baseline)
        adv, ret = gae(t64([rewards]), t64([values]), bmask([[1, 1, 1, 1]]), gamma=1.0, lam=1.0)
        expect(ret, [[2.2, 1.9, 2.0, 2.0]])

    def test_single_token_response(self):
        # A = r - V = 2.0 - 0.5 = 1.5; return = 2.0; padded position 0
        adv, ret = gae(t64([[2.0, 3.0, 3.0]]), t64([[0.5, 9.0, 9.0]]), bmask([[1, 0, 0]]), gamma=1.0, lam=0.95)
        expect(adv, [[1.5, 0.0, 0.0]])
        expect(ret, [[2.0, 0.0, 0.0]])

    def test_all_padding_row(self):
        adv, ret = gae(t64([[1.0, 2.0]]), t64([[3.0, 4.0]]), bmask([[0, 0]]))
        expect(adv, [[0.0, 0.0]])
        expect(ret, [[0.0, 0.0]])

    def test_inputs_not_modified(self):
        values = t64([[0.5, 9.0]])
        gae(t64([[1.0, 1.0]]), values, bmask([[1, 0]]))
        expect(values, [[0.5, 9.0]])


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
class TestClippedPolicyLoss:
    def test_ratio_one(self):
        lp = t64([[-1.0, -2.0, -0.5], [-0.1, -3.0, -4.0]])
        adv = t64([[1.0, -2.0, 0.5], [3.0, 100.0, 100.0]])
        mask = bmask([[1, 1, 1], [1, 0, 0]])
        out = clipped_policy_loss(lp, lp.clone(), adv, mask)
        assert isinstance(out, PolicyLoss)
        expect(out.loss, -(1.0 - 2.0 + 0.5 + 3.0) / 4)  # -mean(A) over the mask = -0.625
        expect(out.clipfrac, 0.0)
        expect(out.approx_kl, 0.0)
        expect(out.ratio_mean, 1.0)
        expect(out.ratio_var, 0.0)

    @staticmethod
    def _hand_example():
        # eps = 0.2, so the clip range is [0.8, 1.2]
        # tok  ratio  A     -A*rho   -A*clip(rho)   max     clipped
        #  0   1.5   +1.0   -1.5     -1.2           -1.2    yes (ratio > 1 + eps, A > 0)
        #  1   0.5   -2.0   +1.0     +1.6           +1.6    yes (ratio < 1 - eps, A < 0)
        #  2   1.1   +0.5   -0.55    -0.55          -0.55   no  (inside the range)
        #  3   0.5   +1.0   -0.5     -0.8           -0.5    no  (pessimistic: unclipped is larger)
        #  4   1.5   -1.0   +1.5     +1.2           +1.5    no  (pessimistic: unclipped is larger)
        #  5   3.0  +100                                     masked out
        ratios = [1.5, 0.5, 1.1, 0.5, 1.5, 3.0]
        advs = [1.0, -2.0, 0.5, 1.0, -1.0, 100.0]
        old = t64([[-1.0, -2.0, -0.7, -0.3, -1.2, -0.4]])
        new = old + t64([[math.log(r) for r in ratios]])
        mask = bmask([[1, 1, 1, 1, 1, 0]])
        return ratios, advs, old, new, mask

    def test_hand_example(self):
        ratios, advs, old, new, mask = self._hand_example()
        out = clipped_policy_loss(new, old, t64([advs]), mask, clip_eps=0.2)
        expect(out.loss, (-1.2 + 1.6 - 0.55 - 0.5 + 1.5) / 5)  # 0.17
        expect(out.loss, 0.17)
        expect(out.clipfrac, 2 / 5)
        logs = [math.log(r) for r in ratios[:5]]
        expect(out.approx_kl, 0.5 * sum(x * x for x in logs) / 5)
        expect(out.ratio_mean, (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5)  # 1.02
        # deviations 0.48, -0.52, 0.08, -0.52, 0.48 -> squares sum 1.008, / (5 - 1)
        expect(out.ratio_var, 1.008 / 4)

    def test_gradient_zero_where_clipped(self):
        ratios, advs, old, new, mask = self._hand_example()
        new = new.clone().requires_grad_(True)
        out = clipped_policy_loss(new, old, t64([advs]), mask, clip_eps=0.2)
        out.loss.backward()
        # d/d logp of (-A * rho) / n = -A * rho / n where the unclipped term is taken; 0 where clipped
        n = 5
        expected = [0.0, 0.0, -0.5 * 1.1 / n, -1.0 * 0.5 / n, 1.0 * 1.5 / n, 0.0]
        expect(new.grad, [expected])

    def test_masked_tokens_ignored(self):
        _, advs, old, new, mask = self._hand_example()
        ref = clipped_policy_loss(new, old, t64([advs]), mask)
        # change everything under the padded position, including a NaN
        new2, adv2 = new.clone(), t64([advs])
        new2[0, 5], adv2[0, 5] = float("nan"), -1e6
        out = clipped_policy_loss(new2, old, adv2, mask)
        for a, b in zip(out, ref):
            expect(a, b)

    def test_all_masked_is_finite(self):
        lp = t64([[-1.0, -2.0]])
        out = clipped_policy_loss(lp + 0.3, lp, t64([[1.0, -1.0]]), bmask([[0, 0]]))
        for v in out:
            assert torch.isfinite(v).all()
        expect(out.loss, 0.0)


class TestClippedValueLoss:
    # eps = 0.2
    # tok  V      V_old  R      V_clip  (V-R)^2   (Vc-R)^2   max       clipped
    #  0   1.0    0.5    1.25   0.7     0.0625    0.3025     0.3025    yes
    #  1   0.625  0.5    0.0    0.625   0.390625  0.390625   0.390625  no (inside)
    #  2   0.0    0.5    1.0    0.3     1.0       0.49       1.0       no (unclipped larger)
    #  3   -1.0   0.0    -1.0   -0.2    0.0       0.64       0.64      yes
    #  4   10.0   0.0    -10.0                                        masked out
    V = [[1.0, 0.625, 0.0, -1.0, 10.0]]
    V_OLD = [[0.5, 0.5, 0.5, 0.0, 0.0]]
    RET = [[1.25, 0.0, 1.0, -1.0, -10.0]]
    MASK = [[1, 1, 1, 1, 0]]

    def test_clipping_on(self):
        out = clipped_value_loss(t64(self.V), t64(self.V_OLD), t64(self.RET), bmask(self.MASK), clip_eps=0.2)
        assert isinstance(out, ValueLoss)
        expect(out.loss, 0.5 * (0.3025 + 0.390625 + 1.0 + 0.64) / 4)  # 0.291640625
        expect(out.clipfrac, 2 / 4)

    def test_clipping_off(self):
        # with a huge eps, V_clip = V and the loss is plain 0.5 * MSE
        out = clipped_value_loss(t64(self.V), t64(self.V_OLD), t64(self.RET), bmask(self.MASK), clip_eps=1e6)
        expect(out.loss, 0.5 * (0.0625 + 0.390625 + 1.0 + 0.0) / 4)  # 0.181640625
        expect(out.clipfrac, 0.0)

    def test_gradient(self):
        v = t64(self.V).requires_grad_(True)
        out = clipped_value_loss(v, t64(self.V_OLD), t64(self.RET), bmask(self.MASK), clip_eps=0.2)
        out.loss.backward()
        # token 0: max is the clipped term, constant in V -> 0
        # token 1: tie inside the range: d/dV 0.5 * (V - R)^2 / 4 = (0.625 - 0) / 4
        # token 2: unclipped: (0 - 1) / 4; token 3: clipped -> 0; token 4 masked -> 0
        expect(v.grad, [[0.0, 0.625 / 4, -1.0 / 4, 0.0, 0.0]])


# --------------------------------------------------------------------------------------------
# Diagnostics and controllers
# --------------------------------------------------------------------------------------------
class TestExplainedVariance:
    RET = [[1.0, 2.0, 3.0, 4.0, 50.0]]
    MASK = [[1, 1, 1, 1, 0]]

    def test_perfect_critic(self):
        r = t64(self.RET)
        expect(explained_variance(r.clone(), r, bmask(self.MASK)), 1.0)

    def test_constant_critic(self):
        # Var[R - c] = Var[R]  ->  1 - 1 = 0
        ev = explained_variance(torch.full((1, 5), 2.5, dtype=F64), t64(self.RET), bmask(self.MASK))
        expect(ev, 0.0, atol=1e-12)

    def test_hand_value(self):
        # R = [1, 2, 3, 4] (unbiased var 5/3); R - V = [0, 0, 0, 1] (mean 0.25, unbiased var 0.75 / 3 = 0.25)
        # 1 - 0.25 / (5/3) = 0.85
        values = t64([[1.0, 2.0, 3.0, 3.0, -7.0]])
        ev = explained_variance(values, t64(self.RET), bmask(self.MASK))
        expect(ev, 1 - 0.25 / (5 / 3))
        expect(ev, 0.85)

    def test_worse_than_constant_is_negative(self):
        values = t64([[4.0, 3.0, 2.0, 1.0, 0.0]])
        # R - V = [-3, -1, 1, 3]: var 20/3; 1 - (20/3) / (5/3) = -3
        expect(explained_variance(values, t64(self.RET), bmask(self.MASK)), -3.0)

    def test_zero_variance_returns(self):
        r = t64([[2.0, 2.0, 2.0]])
        ev = explained_variance(t64([[0.0, 1.0, 5.0]]), r, bmask([[1, 1, 1]]))
        assert torch.isfinite(ev)
        expect(ev, 0.0)
        ev = explained_variance(t64([[0.0, 1.0]]), t64([[1.0, 2.0]]), bmask([[0, 0]]))
        assert torch.isfinite(ev)
        expect(ev, 0.0)


class TestAdaptiveKLCoef:
    def test_hand_values(self):
        beta, target, horizon, n = 0.1, 6.0, 10000.0, 512
        # kl = 12 -> error 1.0, clipped to 0.2: 0.1 * (1 + 0.2 * 512 / 10000) = 0.101024
        assert adaptive_kl_coef(beta, 12.0, target, horizon, n) == pytest.approx(0.101024)
        # kl = 0 -> error -1.0, clipped to -0.2: 0.1 * (1 - 0.0512 * 0.2 / 0.2 ...) = 0.098976
        assert adaptive_kl_coef(beta, 0.0, target, horizon, n) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))
        assert adaptive_kl_coef(beta, 0.0, target, horizon, n) == pytest.approx(0.098976)
        # kl = 6.6 -> error 0.1 (inside the clip): 0.1 * (1 + 0.1 * 0.0512) = 0.100512
        assert adaptive_kl_coef(beta, 6.6, target, horizon, n) == pytest.approx(0.100512)
        # kl = 5.4 -> error -0.1: 0.1 * (1 - 0.00512) = 0.099488
        assert adaptive_kl_coef(beta, 5.4, target, horizon, n) == pytest.approx(0.099488)
        # on target: unchanged
        assert adaptive_kl_coef(beta, 6.0, target, horizon, n) == pytest.approx(0.1)

    def test_clip_boundary(self):
        # error exactly 0.2 and anything larger give the same update
        a = adaptive_kl_coef(1.0, 1.2, 1.0, 100.0, 10)
        b = adaptive_kl_coef(1.0, 1000.0, 1.0, 100.0, 10)
        assert a == pytest.approx(1.0 + 0.2 * 10 / 100) and b == pytest.approx(a)
        c = adaptive_kl_coef(1.0, 0.8, 1.0, 100.0, 10)
        d = adaptive_kl_coef(1.0, -5.0, 1.0, 100.0, 10)
        assert c == pytest.approx(1.0 - 0.2 * 10 / 100) and d == pytest.approx(c)


class TestRunningMoments:
    def test_incremental_equals_concatenation(self):
        batches = [[1.0, 2.0, 3.0], [4.0], [10.0, -2.0, 0.5, 7.0, 7.0], [[3.0, 1.0], [2.0, -4.0]]]
        rm = RunningMoments()
        for b in batches:
            rm.update(torch.tensor(b))
        flat = [v for b in batches for v in (b if not isinstance(b[0], list) else [x for row in b for x in row])]
        n = len(flat)
        mean = sum(flat) / n
        var = sum((v - mean) ** 2 for v in flat) / n  # population variance of the concatenation
        assert rm.mean == pytest.approx(mean, rel=1e-7, abs=1e-7)
        assert rm.var == pytest.approx(var, rel=1e-7)
        assert rm.std == pytest.approx(math.sqrt(var), rel=1e-7)
        assert rm.count == pytest.approx(n)

    def test_empty_update_is_noop(self):
        rm = RunningMoments()
        rm.update(torch.tensor([1.0, 3.0]))
        before = rm.state_dict()
        rm.update(torch.tensor([]))
        assert rm.state_dict() == before

    def test_state_dict_round_trip(self):
        rm = RunningMoments()
        rm.update(torch.tensor([1.0, 5.0, 2.0]))
        rm.update(torch.tensor([-3.0]))
        state = rm.state_dict()
        assert set(state) == {"mean", "var", "count"}
        rm2 = RunningMoments()
        rm2.load_state_dict(state)
        assert rm2.state_dict() == state
        rm.update(torch.tensor([0.5, 0.25]))
        rm2.update(torch.tensor([0.5, 0.25]))
        assert rm2.state_dict() == rm.state_dict()


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------
def test_rollout_select_returns_rows():
    B, P, R = 4, 3, 5
    g = torch.Generator().manual_seed(4)
    fields = dict(
        query_ids=torch.arange(B * P).reshape(B, P),
        query_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.arange(B * R).reshape(B, R),
        response_mask=torch.rand(B, R, generator=g) > 0.5,
        logprobs=torch.randn(B, R, generator=g),
        ref_logprobs=torch.randn(B, R, generator=g),
        values=torch.randn(B, R, generator=g),
        scores=torch.tensor([0.0, 1.0, 2.0, 3.0]),
        rewards=torch.randn(B, R, generator=g),
        advantages=torch.randn(B, R, generator=g),
        returns=torch.randn(B, R, generator=g),
        valid=torch.tensor([True, False, True, True]),
        group_index=torch.tensor([0, 0, 1, 1]),
        is_weights=torch.rand(B, R, generator=g),
    )
    rollout = Rollout(**fields)
    idx = torch.tensor([2, 0])
    mb = rollout.select(idx)
    assert isinstance(mb, Rollout)
    for name, full in fields.items():
        got = getattr(mb, name)
        assert got.shape[0] == 2
        assert torch.equal(got[0], full[2]) and torch.equal(got[1], full[0]), name
    assert mb.scores.tolist() == [2.0, 0.0]
    # a boolean index works too
    mb = rollout.select(fields["valid"])
    assert mb.scores.tolist() == [0.0, 2.0, 3.0]
    assert torch.equal(mb.response_ids, fields["response_ids"][[0, 2, 3]])


def test_largest_divisor_within_budget():
    from rlhf_lit.stages.update_step import largest_divisor_within

    assert largest_divisor_within(16, 1.0, 16.0) == 16
    assert largest_divisor_within(16, 1.0, 15.9) == 8   # 16 does not fit; 8 is the next divisor
    assert largest_divisor_within(12, 2.0, 11.0) == 4   # 6 x 2 = 12 > 11
    assert largest_divisor_within(16, 5.0, 1.0) == 1    # nothing fits: one sequence at a time
    with pytest.raises(ValueError):
        largest_divisor_within(0, 1.0, 1.0)


def test_no_grad_micro_batch_keeps_each_forward_within_the_token_budget():
    """Experience forwards: 4 (16 without checkpointing) training micro-batches of rows, and with
    checkpointing and the row length given, at most NO_GRAD_TOKENS positions (a divisor of the rows)."""
    from types import SimpleNamespace

    from rlhf_lit.stages.update_step import NO_GRAD_TOKENS, UpdateStep

    def step(ckpt: bool, micro: int) -> UpdateStep:
        module = SimpleNamespace(policy_config=SimpleNamespace(gradient_checkpointing=ckpt))
        return UpdateStep(module, micro, 1.0, minibatch_size=16)

    assert step(True, 16).no_grad_micro_batch(64) == 64          # 4 x 16, capped by the rows
    assert step(False, 8).no_grad_micro_batch(512) == 128        # 16 x 8
    # PPO benchmark: 64 rows of 64 + 128 positions -> 32 rows (6,144 positions; 64 would be 12,288)
    assert step(True, 16).no_grad_micro_batch(64, 192) == 32
    assert 32 * 192 <= NO_GRAD_TOKENS < 64 * 192
    assert step(True, 32).no_grad_micro_batch(512, 192) == 32    # 512 rows of 192 -> 32 (a divisor)
    assert step(False, 8).no_grad_micro_batch(512, 192) == 128   # no checkpointing: no token cap
    assert step(True, 4).no_grad_micro_batch(8, 40) == 8         # short rows: the row cap binds
    assert step(True, 16).no_grad_micro_batch(6, NO_GRAD_TOKENS + 1) == 1  # one long row at a time
    # 13 rows of 700: 11 fit, but 13's only divisors are 1 and 13 -> 11 rows, not one at a time
    assert step(True, 4).no_grad_micro_batch(13, 700) == 11
