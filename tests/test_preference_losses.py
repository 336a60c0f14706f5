"""The preference losses against hand-computed values (rlhf_lit/algos/preference_losses.py).

Two pairs with beta = 0.5:
    policy  log pi(y_c) = [-1.0, -3.0], log pi(y_r) = [-2.0, -1.0]
    ref     log pi(y_c) = [-1.5, -2.0], log pi(y_r) = [-1.5, -1.5]
so the log-ratios are chosen [0.5, -1.0], rejected [-0.5, 0.5], Delta = [1.0, -1.5] and
beta * Delta = [0.5, -0.75]. With softplus(x) = log(1 + e^x) and -log sigma(x) = softplus(-x):
    softplus(-0.5) = 0.4740770, softplus(0.5) = 0.9740770, softplus(0.75) = 1.1368710,
    softplus(-0.75) = 0.3868710, softplus(-1) = 0.3132617, softplus(1) = 1.3132617.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lit.algos.preference_losses import (bradley_terry_loss, check_dpo_options, dpo_loss, pair_mean, pair_units,
                                              pair_weight, sequence_logps)

PI_C, PI_R = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
REF_C, REF_R = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5])
BETA = 0.5


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b), atol=2e-6, rtol=0)


def test_sigmoid_is_dpo():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "sigmoid")
    close(out.losses, [0.4740770, 1.1368710])       # softplus(-0.5), softplus(0.75)
    close(out.chosen_rewards, [0.25, -0.5])          # beta * chosen log-ratio
    close(out.rejected_rewards, [-0.25, 0.25])


def test_sigmoid_with_label_smoothing_is_cdpo():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "sigmoid", label_smoothing=0.1)
    # 0.9 * softplus(-0.5) + 0.1 * softplus(0.5); 0.9 * softplus(0.75) + 0.1 * softplus(-0.75)
    close(out.losses, [0.9 * 0.4740770 + 0.1 * 0.9740770, 0.9 * 1.1368710 + 0.1 * 0.3868710])
    close(out.losses, [0.5240770, 1.0618710])


def test_robust():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "robust", label_smoothing=0.1)
    # (0.9 * softplus(-0.5) - 0.1 * softplus(0.5)) / 0.8 ; (0.9 * softplus(0.75) - 0.1 * softplus(-0.75)) / 0.8
    close(out.losses, [0.4115770, 1.2306210])
    # Without label noise it is plain DPO.
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "robust").losses, [0.4740770, 1.1368710])


def test_hinge():
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "hinge").losses, [0.5, 1.75])  # relu(1 - [0.5, -0.75])


def test_ipo_averages_log_ratios_over_tokens():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "ipo", chosen_lengths=torch.tensor([2, 4]),
                   rejected_lengths=torch.tensor([1, 5]))
    # per-token Delta = [0.5/2 + 0.5/1, -1.0/4 - 0.5/5] = [0.75, -0.35]; 1/(2 beta) = 1
    close(out.losses, [0.0625, 1.8225])               # (0.75 - 1)^2, (-0.35 - 1)^2
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, "ipo")


def test_sigmoid_gradient():
    pi_c = PI_C.clone().requires_grad_()
    dpo_loss(pi_c, PI_R, REF_C, REF_R, BETA, "sigmoid").losses[0].backward()
    # d/d log pi(y_c) of -log sigma(beta Delta) = -beta * sigma(-beta Delta) = -0.5 * sigma(-0.5)
    close(pi_c.grad, [-0.5 * 0.3775407, 0.0])


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    close(bradley_terry_loss(chosen, rejected), [0.3132617, 1.3132617])               # softplus(-1), softplus(1)
    close(bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0])), [0.4740770, 1.3132617])  # softplus(-0.5)
    # + c (r_c + r_r)^2 with c = 0.1: + 0.1 * 9 and + 0.1 * 1
    close(bradley_terry_loss(chosen, rejected, center_coefficient=0.1), [0.3132617 + 0.9, 1.3132617 + 0.1])


def test_options_are_checked_with_their_config_names():
    with pytest.raises(ValueError, match="model.dpo.loss_type='kto'"):
        check_dpo_options("kto", 0.1, 0.0)
    with pytest.raises(ValueError, match="model.dpo.beta=0"):
        check_dpo_options("sigmoid", 0.0, 0.0)
    with pytest.raises(ValueError, match="model.dpo.label_smoothing=0.5"):
        check_dpo_options("robust", 0.1, 0.5)
    with pytest.raises(ValueError, match="only the"):
        check_dpo_options("hinge", 0.1, 0.1)


def test_sequence_logps_ignore_padding_even_nan():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    close(sequence_logps(lp, mask), [-3.0, -4.75])


def test_pair_aggregation_is_exact_under_micro_batching():
    losses = torch.tensor([0.3, 1.2, 0.7, 2.0, 0.1])
    units = pair_units(5)
    for micro in (1, 2, 3, 5):
        total = sum(pair_mean(losses[s:s + micro]) * pair_weight(len(losses[s:s + micro]), units)
                    for s in range(0, 5, micro))
        close(total, 0.86)                            # (0.3 + 1.2 + 0.7 + 2.0 + 0.1) / 5
    assert float(pair_mean(torch.zeros(0))) == 0.0
