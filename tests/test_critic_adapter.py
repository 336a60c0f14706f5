"""``policy.critic: adapter``: the critic as its own LoRA adapter on the shared base, plus the head.

Checked here: the three adapters and which parameters train (the optimizer gets exactly those),
that the critic starts as the SFT adapter and its role switches back cleanly, that values come only
from the critic's hidden states, that each loss reaches only its own adapter (also under gradient
checkpointing, whose recomputed forward must see the critic adapter), that compiled layers serve both
adapters, and that a checkpoint of one critic kind does not load into the other.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lit.model import CRITIC, POLICY, REFERENCE, PolicyConfig, PolicyModel
from rlhf_lit.algos.rollout_batch import ResponseBatch

from helpers import (  # the fixture ``assets`` is in conftest.py
    TARGETS, TEMPERATURE, ConstantishReward, batch, fast_args, hf_logprobs, lora_names, masked_max_diff, policy,
    run_cli,
)

HEAD = {"value_head.weight", "value_head.bias"}


def critic_policy(assets, **kw) -> PolicyModel:
    return policy(assets, critic="adapter", **kw)


def perturb(pm: PolicyModel, adapter: str, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f".{adapter}." in name and "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
        if adapter == CRITIC:
            pm.value_head.weight.normal_(0, 0.5, generator=g)


def grads_of(pm: PolicyModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}


def test_three_adapters_and_the_trained_set(assets):
    from rlhf_lit.stages import PPOModule

    pm = critic_policy(assets)
    pol, ref, crit = lora_names(pm, POLICY), lora_names(pm, REFERENCE), lora_names(pm, CRITIC)
    assert len(pol) == len(ref) == len(crit) == 2 * len(TARGETS) * 2
    expected = pol | crit | HEAD
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == expected
    assert {n for n, _ in pm.trainable_named_parameters()} == expected
    assert all(PolicyModel.is_trainable_key(n) for n in expected)
    assert not any(PolicyModel.is_trainable_key(n) for n in ref)
    # Three adapters, one base: the LoRA parameters are three equal shares.
    per_adapter = sum(p.numel() for n, p in pm.named_parameters() if n in pol)
    assert sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) == 3 * per_adapter

    for role in (CRITIC, REFERENCE):
        with pm.role(role):
            assert pm.peft.active_adapter == role
            assert {n for n, p in pm.named_parameters() if p.requires_grad} == expected
        assert pm.peft.active_adapter == POLICY
        assert {n for n, p in pm.named_parameters() if p.requires_grad} == expected

    module = PPOModule(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], critic="adapter"),
                       reward=ConstantishReward(), rollout_batch_size=4)
    module.model = pm
    opt = module.configure_optimizers()
    by_id = {id(p): n for n, p in pm.named_parameters()}
    in_opt = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(expected)


def test_critic_starts_as_the_sft_adapter_and_values_come_from_it(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = critic_policy(assets)
    pm.eval()
    b = batch(5)
    mask = b[3].float()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32),
                                    assets["sft"]).eval()
    with torch.no_grad(), pm.role(CRITIC):
        critic_lp = pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs
    assert masked_max_diff(critic_lp, hf_logprobs(sft, *b), mask) < 1e-5

    with pytest.raises(RuntimeError, match="role\\(CRITIC\\)"):
        pm(ResponseBatch(*b), TEMPERATURE, values=True)  # the policy's hidden states are not the critic's

    def outputs():
        with torch.no_grad():
            lp = pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs
            with pm.role(CRITIC):
                out = pm(ResponseBatch(*b), TEMPERATURE, values=True, logprobs=False)
        assert out.logprobs is None and out.entropy is None
        return lp, out.values

    perturb(pm, CRITIC, seed=0)  # a non-zero head, and a critic LoRA unlike the SFT one
    lp0, v0 = outputs()
    perturb(pm, POLICY, seed=1)
    lp1, v1 = outputs()
    assert masked_max_diff(lp0, lp1, mask) > 1e-3 and torch.equal(v0, v1)  # the policy moved, the values did not
    perturb(pm, CRITIC, seed=2)
    lp2, v2 = outputs()
    assert torch.equal(lp1, lp2) and masked_max_diff(v1, v2, mask) > 1e-3  # and the other way round


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_loss_reaches_only_its_adapter(assets, checkpointing):
    """The policy loss trains the policy LoRA; the value loss trains the critic LoRA and the head.

    The value loss's backward runs inside ``role(CRITIC)``; with gradient checkpointing that is what
    makes the recomputed forward use the critic adapter. A backward after switching back to the
    policy recomputes with the policy adapter and gets other gradients: the last check."""
    pm = critic_policy(assets, gradient_checkpointing=checkpointing)
    perturb(pm, CRITIC, seed=0)
    perturb(pm, POLICY, seed=1)
    pm.train()
    q, qm, r, rm = batch(6)
    pol, crit = lora_names(pm, POLICY), lora_names(pm, CRITIC)

    pm.zero_grad(set_to_none=True)
    (pm(ResponseBatch(q, qm, r, rm), TEMPERATURE, values=False).logprobs * rm).sum().backward()
    g_pol = grads_of(pm)
    assert set(g_pol) == pol

    def value_loss():
        return (pm(ResponseBatch(q, qm, r, rm), TEMPERATURE, logprobs=False).values * rm).square().sum()

    pm.zero_grad(set_to_none=True)
    with pm.role(CRITIC):
        value_loss().backward()
    g_crit = grads_of(pm)
    assert set(g_crit) == crit | HEAD

    if checkpointing:
        eager = critic_policy(assets)
        eager.load_state_dict(pm.state_dict())
        eager.train()
        with eager.role(CRITIC):
            (eager(ResponseBatch(q, qm, r, rm), TEMPERATURE, logprobs=False).values * rm).square().sum().backward()
        for n in g_crit:
            torch.testing.assert_close(g_crit[n], dict(eager.named_parameters())[n].grad, msg=n)

        pm.zero_grad(set_to_none=True)
        with pm.role(CRITIC):
            loss = value_loss()
        loss.backward()  # wrong on purpose: recomputed under the policy adapter
        wrong = grads_of(pm)
        assert any(not torch.allclose(wrong.get(n, torch.zeros(())), g_crit[n]) for n in g_crit)


def test_compiled_layers_serve_both_adapters(assets):
    from torch._dynamo.utils import counters

    pm = critic_policy(assets, compile=True, gradient_checkpointing=True)
    perturb(pm, CRITIC, seed=0)
    pm.train()

    def grads(seed):
        pm.zero_grad(set_to_none=True)
        q, qm, r, rm = batch(seed)
        (pm(ResponseBatch(q, qm, r, rm), TEMPERATURE, values=False).logprobs * rm).sum().backward()
        with pm.role(CRITIC):
            (pm(ResponseBatch(q, qm, r, rm), TEMPERATURE, logprobs=False).values * rm).square().sum().backward()
        return {n: p.grad.clone() for n, p in pm.trainable_named_parameters()}

    eager = grads(0)
    torch._dynamo.reset()
    counters.clear()
    with pm.compiled():
        compiled = grads(0)
        graphs = counters["stats"]["unique_graphs"]
        grads(1)  # same shapes, other data: neither adapter compiles again
        assert counters["stats"]["unique_graphs"] == graphs >= 2
    for n in eager:  # the value loss's gradients are in the hundreds: tolerance relative to each tensor's scale
        scale = float(eager[n].abs().max())
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-4, atol=1e-6 * max(1.0, scale), msg=n)
    assert any(float(eager[n].abs().max()) > 0 for n in lora_names(pm, CRITIC))


def test_fresh_critic_without_sft_adapter(assets):
    pm = critic_policy(assets, sft_adapter=None, lora_r=4, lora_alpha=8)
    crit = lora_names(pm, CRITIC)
    assert crit and not lora_names(pm, REFERENCE)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == lora_names(pm, POLICY) | crit | HEAD
    # A fresh LoRA is the identity: the critic's hidden states are the bare base's.
    b = batch(7)
    pm.eval()
    with torch.no_grad(), pm.role(CRITIC):
        critic_lp = pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs
    with torch.no_grad(), pm.role(REFERENCE):
        base_lp = pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs
    assert masked_max_diff(critic_lp, base_lp, b[3].float()) < 1e-6
    # The bare-base reference switched every adapter off and back on: both still train.
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == lora_names(pm, POLICY) | crit | HEAD


def test_unknown_critic_kind_is_named(assets):
    with pytest.raises(ValueError, match="model.policy.critic='twin'"):
        policy(assets, critic="twin")


def test_ppo_step_trains_both_adapters_and_the_checkpoint_fits_only_its_kind(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_rollouts=1", "--model.policy.critic=adapter"]
    cli = run_cli("fit", *fast_args(run_dir, *common))
    module = cli.model
    sft = PolicyModel(PolicyConfig(critic="adapter"), torch.device("cpu")).state_dict()
    trained = module.model.state_dict()
    for adapter in (POLICY, CRITIC):
        keys = [k for k in trained if "lora_B" in k and f".{adapter}." in k]
        assert keys and any(not torch.equal(trained[k], sft[k]) for k in keys), f"the {adapter} adapter did not train"
    assert all(torch.equal(trained[k], sft[k]) for k in trained if f".{REFERENCE}." in k)

    # The export is the policy adapter alone, as plain LoRA: the critic stays with the run.
    from safetensors.torch import load_file

    exported = load_file(next(run_dir.rglob("adapter_model.safetensors")))
    policy_lora = {k.replace(f".{POLICY}.", "."): v for k, v in trained.items() if "lora_" in k and f".{POLICY}." in k}
    assert len(exported) == len(policy_lora) and not any(CRITIC in k for k in exported)
    for k, v in exported.items():
        torch.testing.assert_close(v, policy_lora[k.replace("base_model.model.", "peft.base_model.model.", 1)])

    ckpt = torch.load(next(run_dir.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert any(f".{CRITIC}." in k for k in keys) and any(f".{POLICY}." in k for k in keys)
    assert not any(f".{REFERENCE}." in k for k in keys)
    assert ckpt["rlhf_lit"]["critic"] == "adapter"
    for k in keys:
        torch.testing.assert_close(ckpt["state_dict"][k], trained[k[len("model."):]])

    # A checkpoint fits only its own critic kind: a clear error either way, never a silently fresh
    # or silently dropped critic.
    from rlhf_lit.stages import PPOModule

    def module(critic: str) -> PPOModule:
        m = PPOModule(policy=PolicyConfig(critic=critic), reward=ConstantishReward())
        m.model = PolicyModel(m.policy_config, torch.device("cpu"))
        return m

    from rlhf_lit.errors import ConfigError

    module("adapter").on_load_checkpoint(ckpt)
    with pytest.raises(ConfigError, match="unexpected") as e:
        module("value_head").on_load_checkpoint(ckpt)
    assert "critic='adapter'" in str(e.value) and "critic='value_head'" in str(e.value)
    assert "--model.policy.critic adapter" in str(e.value)  # what to give instead
    head_only = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if f".{CRITIC}." not in k},
                 "rlhf_lit": {**ckpt["rlhf_lit"], "critic": "value_head"}}
    module("value_head").on_load_checkpoint(head_only)
    with pytest.raises(ConfigError, match="missing") as e:
        module("adapter").on_load_checkpoint(head_only)
    assert "critic='value_head'" in str(e.value) and "critic='adapter'" in str(e.value)
