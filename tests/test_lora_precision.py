"""fp32 master LoRA weights with bf16 compute copies (rlhf_lit/lora_precision.py), on the CPU.

The copies must give autocast's numbers (the same forward, the same fp32 master gradients), hand the
optimizer, checkpoints and exports the untouched fp32 parameters, and follow each optimizer step.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.model import POLICY, REFERENCE
from rlhf_lit.model.lora_precision import LoraComputeCopies
from rlhf_lit.model.peft_layers import cast_adapter_, lora_linears

from helpers import TEMPERATURE, batch, policy  # the fixture ``assets`` is in conftest.py


def _loss(pm, seed=0):
    q, qm, r, rm = batch(seed)
    out = pm(ResponseBatch(q, qm, r, rm), TEMPERATURE)
    w = torch.linspace(-1, 1, r.numel()).view_as(r)
    return (out.logprobs * w * rm).sum() + 0.1 * (out.values * rm).square().sum()


def _master_grads(pm):
    return {n: p.grad.clone() for n, p in pm.trainable_named_parameters() if p.grad is not None}


def test_reference_stored_in_bf16_policy_keeps_fp32_masters(assets):
    pm = policy(assets, dtype="bfloat16")
    assert pm.lora_compute_dtype == torch.bfloat16
    assert {lin.weight.dtype for lin in lora_linears(pm.peft, REFERENCE)} == {torch.bfloat16}
    assert {lin.weight.dtype for lin in lora_linears(pm.peft, POLICY)} == {torch.float32}
    assert policy(assets).lora_compute_dtype is None  # fp32 model: nothing to do


def test_copies_give_autocast_gradients_on_the_fp32_masters(assets):
    pm = policy(assets, dtype="bfloat16")
    masters = {n: p for n, p in pm.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _loss(pm).backward()  # peft + autocast cast the fp32 factors on every call
    plain = _master_grads(pm)
    pm.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pm.lora_compute_copies() as lora:
        inside = {n: p for n, p in pm.named_parameters()}
        swapped = [n for n in masters if inside[n] is not masters[n]]
        assert swapped and all(".lora_" in n and f".{POLICY}." in n for n in swapped)
        assert all(inside[n].dtype == torch.bfloat16 for n in swapped)
        _loss(pm).backward()
        lora.collect_grads()
        assert all(inside[n].grad is None for n in swapped)  # moved onto the masters
    copies = _master_grads(pm)
    assert all(p is masters[n] for n, p in pm.named_parameters())  # the optimizer's parameters are back
    assert plain.keys() == copies.keys() and len(plain) == len(list(pm.trainable_named_parameters()))
    for n in plain:
        assert copies[n].dtype == torch.float32
        torch.testing.assert_close(copies[n], plain[n], rtol=1e-3, atol=1e-6, msg=n)


def test_gradients_accumulate_over_backward_passes(assets):
    pm = policy(assets, dtype="bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16), pm.lora_compute_copies() as lora:
        for seed in (0, 1):
            _loss(pm, seed).backward()
            lora.collect_grads()
    both = _master_grads(pm)
    pm.zero_grad(set_to_none=True)
    single = {}
    for seed in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16), pm.lora_compute_copies():
            _loss(pm, seed).backward()  # collected on exit
        single[seed] = _master_grads(pm)
        pm.zero_grad(set_to_none=True)
    for n in both:
        torch.testing.assert_close(both[n], single[0][n] + single[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_refresh_follows_the_optimizer_step(assets):
    pm = policy(assets, dtype="bfloat16")
    params = [p for _, p in pm.trainable_named_parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16), pm.lora_compute_copies() as lora:
        _loss(pm).backward()
        lora.collect_grads()
        opt.step()
        stale = [lin.weight.detach().clone() for lin in lora_linears(pm.peft, POLICY)]
        lora.refresh()
        for lin, old, master in zip(lora_linears(pm.peft, POLICY), stale, lora._masters):
            assert torch.equal(lin.weight, master.detach().to(torch.bfloat16))
        assert any(not torch.equal(old, lin.weight) for old, lin in zip(stale, lora_linears(pm.peft, POLICY)))
        after_step = _loss(pm).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(_loss(pm), after_step)  # fresh autocast casts of the masters: the same numbers


def test_fp32_model_is_untouched(assets):
    pm = policy(assets)
    before = {n: p for n, p in pm.named_parameters()}
    with pm.lora_compute_copies() as lora:
        assert all(p is before[n] for n, p in pm.named_parameters())
        lora.collect_grads()
        lora.refresh()


def test_only_frozen_adapters_are_stored_in_half_precision(assets):
    pm = policy(assets)
    with pytest.raises(ValueError, match="adapter 'policy' is trainable"):
        cast_adapter_(pm.peft, POLICY, torch.bfloat16)
    assert cast_adapter_(pm.peft, REFERENCE, torch.bfloat16) == len(lora_linears(pm.peft, REFERENCE)) > 0
    LoraComputeCopies(pm.peft, POLICY, None).__enter__().__exit__(None, None, None)
