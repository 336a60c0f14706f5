"""Critic-free estimators, loss aggregation, clip variants, KL in the loss, length shaping and the
sampler correction: each against small tensors worked out by hand (plain Python arithmetic)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from rlhf_lit.algos.advantages import (
    AdvantageInput, discounted_returns, get_advantage_estimator, grpo_advantages, rloo_advantages,
)
from rlhf_lit.algos.aggregation import LOSS_AGG_MODES, agg_loss, agg_units, agg_weight
from rlhf_lit.algos.groups import group_index, group_stats, zero_signal_groups
from rlhf_lit.algos.losses import clipped_policy_loss, kl_loss, truncated_is_weights
from rlhf_lit.algos.reward_shaping import overlong_penalty

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def std(xs):  # unbiased
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------
def test_group_index_keeps_samples_of_a_prompt_adjacent():
    assert group_index(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert group_index(2, 1).tolist() == [0, 1]


def test_group_stats_mean_unbiased_std_size_and_a_group_of_one():
    s = group_stats(t([1.0, 3.0, 8.0, 5.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 2, 2, 2]))
    assert s.mean.tolist() == [2.0, 2.0, 8.0, 5.0, 5.0, 5.0]
    assert s.size.tolist() == [2, 2, 1, 3, 3, 3]
    assert_close(s.std, t([std([1, 3])] * 2 + [0.0] + [0.0] * 3))


def test_zero_signal_groups_ignore_invalid_samples():
    scores = t([1.0, 1.0, 0.0, 2.0, 7.0, 3.0])
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    valid = torch.tensor([True, True, True, True, True, False])  # group 2: one valid sample left
    assert zero_signal_groups(scores, idx, valid).tolist() == [True, True, False, False, True, True]


# ---------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------
def test_grpo_normalised_and_dr_grpo():
    R = [1.0, 0.0, 0.5, 2.0, 2.0]  # groups: [1, 0, 0.5], [2, 2]
    idx = torch.tensor([0, 0, 0, 1, 1])
    m, sd = 0.5, std([1.0, 0.0, 0.5])
    want = [(r - m) / (sd + 1e-6) for r in R[:3]] + [0.0, 0.0]  # equal rewards: 0 / (0 + eps)
    assert_close(grpo_advantages(t(R), idx), t(want))
    assert_close(grpo_advantages(t(R), idx, norm_adv_by_std=False), t([0.5, -0.5, 0.0, 0.0, 0.0]))


def test_grpo_and_rloo_group_of_one_get_the_return_itself():
    idx = torch.tensor([0, 1, 1])
    R = t([3.0, 1.0, 2.0])
    assert grpo_advantages(R, idx, norm_adv_by_std=False)[0] == 3.0
    assert grpo_advantages(R, idx)[0] == pytest.approx(3.0 / (1 + 1e-6))
    assert rloo_advantages(R, idx)[0] == 3.0


def test_rloo_leave_one_out():
    R = [1.0, 4.0, 7.0]
    want = [R[i] - sum(R[j] for j in range(3) if j != i) / 2 for i in range(3)]  # [-4.5, 0, 4.5]
    assert_close(rloo_advantages(t(R), torch.tensor([0, 0, 0])), t(want))


def test_discounted_returns_stop_at_the_mask():
    r = t([[1.0, 2.0, 3.0, 9.0]])
    m = torch.tensor([[True, True, True, False]])
    g = 0.5
    want = [1 + g * (2 + g * 3), 2 + g * 3, 3.0, 0.0]
    assert_close(discounted_returns(r, m, g), t([want]))


def _inp(rewards, mask, scores, groups, values=None):
    return AdvantageInput(t(rewards), values, torch.tensor(mask), t(scores), torch.tensor(groups))


def test_registered_outcome_estimators_put_the_advantage_on_every_unmasked_token():
    x = _inp([[0.0, 1.0], [0.0, 3.0], [2.0, 0.0]], [[True, True], [True, True], [True, False]],
             [1.0, 3.0, 2.0], [0, 0, 1])
    cfg = SimpleNamespace(norm_adv_by_std=False, gamma=1.0)
    adv, ret = get_advantage_estimator("grpo").fn(x, cfg)
    # returns 1, 3 | 2: group mean 2 -> -1, +1; a group of one: its return
    assert_close(adv, t([[-1.0, -1.0], [1.0, 1.0], [2.0, 0.0]]))
    adv, _ = get_advantage_estimator("rloo").fn(x, cfg)
    assert_close(adv, t([[-2.0, -2.0], [2.0, 2.0], [2.0, 0.0]]))


def test_reinforce_plus_plus_whitens_token_returns_over_the_batch():
    x = _inp([[0.0, 1.0], [0.0, 3.0]], [[True, True], [True, True]], [1.0, 3.0], [0, 1])
    adv, ret = get_advantage_estimator("reinforce_plus_plus").fn(x, SimpleNamespace(gamma=1.0))
    assert_close(ret, t([[1.0, 1.0], [3.0, 3.0]]))
    vals = [1.0, 1.0, 3.0, 3.0]
    m, sd = 2.0, std(vals)
    assert_close(adv, t([[(v - m) / math.sqrt(sd**2 + 1e-8) for v in vals[:2]],
                         [(v - m) / math.sqrt(sd**2 + 1e-8) for v in vals[2:]]]))


def test_reinforce_plus_plus_baseline_subtracts_the_group_mean_then_whitens():
    x = _inp([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0], [0.0, 5.0]], [[True, True]] * 4, [1.0, 3.0, 5.0, 5.0],
             [0, 0, 1, 1])
    adv, centred = get_advantage_estimator("reinforce_plus_plus_baseline").fn(x, SimpleNamespace(gamma=1.0))
    assert_close(centred, t([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    vals = [-1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # mean 0
    sd = std(vals)
    assert_close(adv, t([[v / math.sqrt(sd**2 + 1e-8) for v in vals[i:i + 2]] for i in range(0, 8, 2)]))


def test_estimators_declare_whether_they_need_a_critic():
    assert get_advantage_estimator("gae").needs_critic
    for name in ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        assert not get_advantage_estimator(name).needs_critic
    with pytest.raises(ValueError, match="adv_estimator='nope'"):
        get_advantage_estimator("nope")


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------
L = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
M = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])  # row 3: masked out


def test_each_mode_by_hand():
    assert agg_loss(L, M, "token-mean") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert agg_loss(L, M, "seq-mean-token-mean") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert agg_loss(L, M, "seq-mean-token-sum") == pytest.approx(((1 + 2 + 3) + 4) / 2)
    assert agg_loss(L, M, "seq-mean-token-sum-norm", norm_length=8) == pytest.approx(((1 + 2 + 3) / 8 + 4 / 8) / 2)
    assert agg_units(M, "token-mean") == 4 and agg_units(M, "seq-mean-token-mean") == 2


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_add_up_to_the_minibatch_aggregate(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g, dtype=F64)
    mask = torch.rand(6, 5, generator=g) > 0.4
    mask[4] = False  # a row without tokens
    whole = agg_loss(loss, mask, mode, 5)
    units = agg_units(mask, mode)
    for micro in (1, 2, 3):
        parts = sum(agg_loss(loss[i:i + micro], mask[i:i + micro], mode, 5) * agg_weight(mask[i:i + micro], units, mode)
                    for i in range(0, 6, micro))
        assert float(parts) == pytest.approx(float(whole), rel=1e-6), (mode, micro)  # the weight is a float32 ratio


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="loss_agg_mode='token-sum'"):
        agg_loss(L, M, "token-sum")


# ---------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------
def _pg(ratio, adv, **kw):
    new = t([[math.log(r) for r in ratio]])
    return clipped_policy_loss(new, torch.zeros_like(new), t([adv]), torch.ones_like(new, dtype=torch.bool), **kw)


def test_clip_higher_is_asymmetric():
    # ratio 1.25 with A > 0: eps_high 0.28 leaves it alone (-1.25), the symmetric 0.2 clips it (-1.2)
    assert float(_pg([1.25], [1.0], clip_eps=0.2, clip_eps_high=0.28).loss) == pytest.approx(-1.25)
    assert float(_pg([1.25], [1.0], clip_eps=0.2).loss) == pytest.approx(-1.2)
    # ratio 0.7 with A < 0: the lower bound (1 - 0.2) decides: max(0.7, 0.8) -> loss 0.8
    assert float(_pg([0.7], [-1.0], clip_eps=0.2, clip_eps_high=0.28).loss) == pytest.approx(0.8)


def test_dual_clip_bounds_negative_advantages():
    # ratio 5 with A = -1: PPO's loss is max(5, clip(5) = 1.2) = 5; dual clip c = 3 caps it at 3
    out = _pg([5.0], [-1.0], clip_eps=0.2, dual_clip_c=3.0)
    assert float(out.loss) == pytest.approx(3.0) and float(out.dual_clipfrac) == 1.0
    assert float(_pg([5.0], [-1.0], clip_eps=0.2).loss) == pytest.approx(5.0)
    # positive advantages are never dual-clipped
    assert float(_pg([5.0], [1.0], clip_eps=0.2, dual_clip_c=3.0).loss) == pytest.approx(-1.2)


def test_importance_weights_scale_each_token():
    new = t([[0.0, 0.0]])
    out = clipped_policy_loss(new, new.clone(), t([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool),
                              is_weights=t([[0.5, 1.0]]))
    assert float(out.loss) == pytest.approx((-1.0 * 0.5 - 2.0 * 1.0) / 2)


# ---------------------------------------------------------------------------------------------
# KL in the loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_values_and_gradients(estimator):
    lp, ref = [-1.0, -2.0], [-1.5, -1.0]
    logprobs = t([lp]).requires_grad_(True)
    loss = kl_loss(logprobs, t([ref]), torch.ones(1, 2, dtype=torch.bool), estimator)
    loss.backward()
    log_r = [r - p for p, r in zip(lp, ref)]  # log pi_ref - log pi
    if estimator == "k1":
        vals, grads = [-x for x in log_r], [1.0, 1.0]
    elif estimator == "k2":
        vals, grads = [0.5 * x * x for x in log_r], [-x for x in log_r]  # (log pi - log pi_ref)
    else:
        vals, grads = [math.exp(x) - 1 - x for x in log_r], [1 - math.exp(x) for x in log_r]  # 1 - r
    assert float(loss) == pytest.approx(sum(vals) / 2)
    assert_close(logprobs.grad, t([[g / 2 for g in grads]]))


# ---------------------------------------------------------------------------------------------
# length and the sampler
# ---------------------------------------------------------------------------------------------
def test_overlong_penalty_is_linear_in_the_buffer():
    got = overlong_penalty(torch.tensor([10, 12, 14, 16, 20]), max_new_tokens=16, buffer=4, penalty=2.0)
    # free up to 12 tokens, then -2 * (len - 12) / 4, capped at -2
    assert got.tolist() == [0.0, 0.0, -1.0, -2.0, -2.0]


def test_truncated_is_weights_token_and_sequence():
    old = t([[-1.0, -1.0, -1.0]])
    sampler = t([[-1.5, -0.5, -9.0]])
    mask = torch.tensor([[True, True, False]])
    w = truncated_is_weights(old, sampler, mask, "token", cap=1.5)
    assert_close(w, t([[1.5, math.exp(-0.5), 1.0]]))  # e^0.5 = 1.65 capped; masked -> 1
    w = truncated_is_weights(old, sampler, mask, "sequence", cap=10.0)
    assert_close(w, t([[1.0, 1.0, 1.0]]))  # e^(0.5 - 0.5) = 1 on every unmasked token
    with pytest.raises(ValueError, match="rollout_is='tok'"):
        truncated_is_weights(old, sampler, mask, "tok", cap=2.0)
