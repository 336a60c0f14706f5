"""How the policy, the frozen reference and the critic share one base model (CPU, tiny random Qwen2).

Checked here: which parameters train (and that the optimizer gets exactly those), that the reference
role is the SFT adapter (or the bare base without one), that the base weights exist once, that
dropout is off even in train mode, that micro-batching leaves ``ppo_update`` unchanged, and that an
SFT adapter with ``modules_to_save`` loads, stays frozen unless asked, and exports as plain LoRA.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.model import POLICY, REFERENCE, PolicyConfig, PolicyModel

from helpers import (  # the fixture ``assets`` is in conftest.py
    TARGETS, TEMPERATURE, ConstantishReward, batch, hf_logprobs, lora_names, masked_max_diff, policy,
)


def logprobs(pm: PolicyModel, b) -> torch.Tensor:
    with torch.no_grad():
        return pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs


def perturb_policy(pm: PolicyModel, scale: float = 0.2) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f".{POLICY}." in name and "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


# ---------------------------------------------------------------------------------------------
# Roles and trainable parameters
# ---------------------------------------------------------------------------------------------
def test_adapter_roles_and_optimizer_parameters(assets):
    from rlhf_lit.stages import PPOModule

    pm = policy(assets)
    policy_lora, ref_lora = lora_names(pm, POLICY), lora_names(pm, REFERENCE)
    assert len(policy_lora) == len(ref_lora) == 2 * len(TARGETS) * 2  # 2 layers x 7 projections x (A, B)
    expected = policy_lora | {"value_head.weight", "value_head.bias"}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert {n for n, _ in pm.trainable_named_parameters()} == expected
    assert pm.peft.active_adapter == POLICY

    # Switching to the reference and back leaves the flags (and the active adapter) as they were.
    with pm.role(REFERENCE):
        assert pm.peft.active_adapter == REFERENCE
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == expected
    assert pm.peft.active_adapter == POLICY

    # The optimizer gets exactly the policy LoRA and the value head, by name.
    module = PPOModule(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"]),
                       reward=ConstantishReward(), rollout_batch_size=4)
    module.model = pm
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    by_id = {id(p): n for n, p in pm.named_parameters()}
    in_opt = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    assert len(in_opt) == len(set(in_opt))
    assert set(in_opt) == expected
    assert all(PolicyModel.is_trainable_key(n) for n in in_opt)
    assert not any(PolicyModel.is_trainable_key(n) for n in ref_lora)


def test_reference_role_is_the_sft_adapter_and_back(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = policy(assets)
    b = batch()
    mask = b[3].float()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32),
                                    assets["sft"]).eval()
    sft_lp = hf_logprobs(sft, *b)
    pm.eval()
    # Before any update the policy is the SFT adapter.
    assert masked_max_diff(logprobs(pm, b), sft_lp, mask) < 1e-5

    perturb_policy(pm)
    pol_lp = logprobs(pm, b)
    with pm.role(REFERENCE):
        ref_lp = logprobs(pm, b)
    assert masked_max_diff(ref_lp, sft_lp, mask) < 1e-5, "the reference role must give the SFT adapter's log-probs"
    assert masked_max_diff(pol_lp, ref_lp, mask) > 1e-3, "the perturbed policy must differ from the reference"
    # Back to the policy: exactly what it gave before the switch.
    assert torch.equal(logprobs(pm, b), pol_lp)
    with pm.role(POLICY):
        assert torch.equal(logprobs(pm, b), pol_lp)
    # The reference LoRA was not touched by the perturbation or the switches.
    sft_sd = {k: v for k, v in sft.state_dict().items() if "lora_" in k}
    ref_sd = {k.replace(f".{REFERENCE}.", ".default."): v for k, v in pm.peft.state_dict().items()
              if "lora_" in k and f".{REFERENCE}." in k}
    assert sft_sd.keys() == ref_sd.keys()
    assert all(torch.equal(sft_sd[k], ref_sd[k]) for k in sft_sd)


def test_without_sft_adapter_reference_is_the_bare_base(assets):
    from transformers import AutoModelForCausalLM

    pm = policy(assets, sft_adapter=None, lora_r=4, lora_alpha=8)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == lora_names(pm, POLICY) | {
        "value_head.weight", "value_head.bias"}
    assert not lora_names(pm, REFERENCE)
    b = batch(1)
    mask = b[3].float()
    base_lp = hf_logprobs(AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32).eval(), *b)
    pm.eval()
    assert masked_max_diff(logprobs(pm, b), base_lp, mask) < 1e-5  # a fresh LoRA starts as the identity
    perturb_policy(pm)
    pol_lp = logprobs(pm, b)
    with pm.role(REFERENCE):
        ref_lp = logprobs(pm, b)
    assert masked_max_diff(ref_lp, base_lp, mask) < 1e-5
    assert masked_max_diff(pol_lp, base_lp, mask) > 1e-3
    assert torch.equal(logprobs(pm, b), pol_lp)


def test_base_weights_exist_once(assets):
    from transformers import AutoModelForCausalLM

    pm = policy(assets)
    base = AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32)
    base_numel = sum(p.numel() for p in base.parameters())
    shared = [(n, p) for n, p in pm.peft.named_parameters() if "lora_" not in n]
    assert len(shared) == len(list(base.parameters()))
    assert sum(p.numel() for _, p in shared) == base_numel
    ptrs = {p.untyped_storage().data_ptr() for _, p in shared}
    assert len(ptrs) == len(shared), "two base parameters share (or duplicate) one storage"
    lora_numel = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    per_adapter = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n and f".{POLICY}." in n)
    assert lora_numel == 2 * per_adapter  # reference + policy LoRA, nothing else
    total = sum(p.numel() for p in pm.parameters())
    assert total == base_numel + lora_numel + pm.value_head.weight.numel() + pm.value_head.bias.numel()


def test_dropout_is_off_even_in_train_mode(assets):
    pm = policy(assets)  # the SFT adapter has lora_dropout=0.1 and the base attention_dropout=0.1
    pm.train()
    dropouts = [m for m in pm.modules() if isinstance(m, nn.Dropout)]
    assert dropouts, "expected LoRA dropout modules in this adapter"
    assert all(m.p == 0.0 for m in dropouts)
    attn = [m for m in pm.modules() if hasattr(m, "attention_dropout")]
    assert attn and all(float(m.attention_dropout) == 0.0 for m in attn)
    b = batch(2)
    torch.manual_seed(0)
    out1 = pm(ResponseBatch(*b), TEMPERATURE)
    torch.manual_seed(1)
    out2 = pm(ResponseBatch(*b), TEMPERATURE)
    assert torch.equal(out1.logprobs, out2.logprobs) and torch.equal(out1.values, out2.values)


# ---------------------------------------------------------------------------------------------
# ppo_update: micro-batching leaves losses and gradients unchanged
# ---------------------------------------------------------------------------------------------
def _sgd_zero(params):
    return torch.optim.SGD(params, lr=0.0)  # gradients are computed, the weights never move


@pytest.mark.parametrize("critic", ["value_head", "adapter"])
def test_micro_batch_size_leaves_update_unchanged(assets, tmp_path, critic):
    import lightning as L

    from rlhf_lit.data import PromptDataModule
    from rlhf_lit.stages import PPOConfig, PPOModule
    from rlhf_lit.rollout import SamplingConfig

    captured = {}

    class Probe(PPOModule):
        def training_step(self, batch_, batch_idx):
            rollout, _, _ = self.make_rollout(batch_)
            # Ragged response lengths so the token weighting of micro-batches matters.
            lengths = torch.tensor([2, 8, 5, 8, 1, 7, 3, 6])[: rollout.response_mask.shape[0]]
            idx = torch.arange(rollout.response_mask.shape[1])
            mask = rollout.response_mask & (idx < lengths[:, None])
            rollout = rollout._replace(response_mask=mask, logprobs=rollout.logprobs * mask,
                                       values=rollout.values * mask, advantages=rollout.advantages * mask,
                                       returns=rollout.returns * mask)
            opt = self.optimizers().optimizer
            for micro in (None, 1, 2):
                grads = []
                hook = opt.register_step_pre_hook(lambda o, a, k: grads.append(
                    {n: p.grad.detach().clone() for n, p in self.model.trainable_named_parameters()}))
                self.update_step.micro_batch_size = micro
                torch.manual_seed(99)  # same minibatch permutation for every setting
                stats = self.ppo_update(rollout)
                hook.remove()
                captured[micro] = (stats, grads)

    module = Probe(
        # A non-zero head, so that the value loss reaches the critic's LoRA too (lr 0 never moves it).
        policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32", critic=critic,
                            value_head_init_std=0.1),
        reward=ConstantishReward(),
        ppo=PPOConfig(ppo_epochs=2, num_minibatches=2, max_grad_norm=None),
        sampling=SamplingConfig(max_new_tokens=8, min_new_tokens=8),
        rollout_engine="hf", optimizer=_sgd_zero, rollout_batch_size=8, output_dir=str(tmp_path / "adapter"),
        log_samples=0,
    )
    data = PromptDataModule(prompt_file=assets["prompts"], tokenizer=assets["base"], batch_size=8,
                            val_fraction=0.0, test_fraction=0.0)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, limit_train_batches=1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)

    full_stats, full_grads = captured[None]
    assert len(full_grads) == 4  # 2 epochs x 2 minibatches
    assert full_stats["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    for micro in (1, 2):
        stats, grads = captured[micro]
        assert stats.keys() == full_stats.keys()
        assert stats["perf/micro_batch_size"] == (micro or 4)
        for k, v in full_stats.items():
            if k != "perf/micro_batch_size":
                assert stats[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (micro, k)
        assert len(grads) == len(full_grads)
        for g_full, g in zip(full_grads, grads):
            assert g_full.keys() == g.keys()
            for n in g_full:
                torch.testing.assert_close(g[n], g_full[n], rtol=1e-4, atol=1e-7, msg=f"micro={micro} {n}")
        assert any(float(g.abs().max()) > 0 for g in full_grads[0].values())
    if critic == "adapter":  # both adapters and the head get gradients
        nonzero = {n for n, g in full_grads[0].items() if float(g.abs().max()) > 0}
        assert any(".critic." in n for n in nonzero) and any(".policy." in n for n in nonzero)
        assert {"value_head.weight"} <= nonzero


# ---------------------------------------------------------------------------------------------
# modules_to_save in the SFT adapter, and the plain-LoRA export
# ---------------------------------------------------------------------------------------------
def _extra_names(pm: PolicyModel, adapter: str) -> set[str]:
    return {n for n, _ in pm.named_parameters() if "modules_to_save" in n and f".{adapter}." in n}


def test_modules_to_save_adapter_loads_frozen_by_default(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = policy(assets, sft_adapter=assets["sft_mts"])
    assert _extra_names(pm, POLICY) and _extra_names(pm, REFERENCE)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == lora_names(pm, POLICY) | {"value_head.weight", "value_head.bias"}
    with pm.role(REFERENCE):
        pass
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == trainable
    # The adapter's own lm_head copy is used: the reference equals the SFT adapter loaded by PEFT.
    b = batch(3)
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32),
                                    assets["sft_mts"]).eval()
    pm.eval()
    with pm.role(REFERENCE):
        ref_lp = logprobs(pm, b)
    assert masked_max_diff(ref_lp, hf_logprobs(sft, *b), b[3].float()) < 1e-5


def test_modules_to_save_train_when_asked_and_export_plain_lora(assets, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf_lit.export import export_adapter

    pm = policy(assets, sft_adapter=assets["sft_mts"], train_extra_modules=True)
    extra_pol, extra_ref = _extra_names(pm, POLICY), _extra_names(pm, REFERENCE)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == lora_names(pm, POLICY) | extra_pol | {"value_head.weight", "value_head.bias"}
    assert not (trainable & extra_ref)
    with pm.role(REFERENCE):
        pass
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == trainable

    # One optimizer step moves the policy's extra modules and LoRA, never the reference's.
    params = dict(pm.trainable_named_parameters())
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=1.0)
    pm.train()
    out = pm(ResponseBatch(*batch(4)), TEMPERATURE)
    (-(out.logprobs * batch(4)[3]).sum() + out.values.pow(2).sum()).backward()
    opt.step()
    after = dict(pm.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in extra_pol)
    assert all(torch.equal(before[n], after[n]) for n in extra_ref | lora_names(pm, REFERENCE))

    out_dir = export_adapter(pm.peft, POLICY, tmp_path / "export", base_model=assets["base"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(out_dir / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors), [k for k in tensors if "lora_" not in k]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == assets["base"]
    # It loads with PEFT, and its LoRA weights are the trained policy's.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32),
                                       out_dir)
    lsd = {k.replace(".default.", "."): v for k, v in loaded.state_dict().items() if "lora_" in k}
    psd = {k.replace(f".{POLICY}.", "."): v for k, v in pm.peft.state_dict().items() if "lora_" in k and f".{POLICY}." in k}
    assert lsd.keys() == psd.keys()
    assert all(torch.equal(lsd[k], psd[k]) for k in lsd)
    assert not any("modules_to_save" in k for k in loaded.state_dict())


# ---------------------------------------------------------------------------------------------
# policy.compile: the update's layers compiled, the same numbers as eager
# ---------------------------------------------------------------------------------------------
def test_compiled_layers_give_eager_gradients_and_compile_once(assets):
    from torch._dynamo.utils import counters

    pm = policy(assets, compile=True, gradient_checkpointing=True)
    pm.train()

    def grads(seed):
        pm.zero_grad(set_to_none=True)
        q, qm, r, rm = batch(seed)
        out = pm(ResponseBatch(q, qm, r, rm), TEMPERATURE)
        ((out.logprobs * rm).sum() + (out.values * rm).square().sum()).backward()
        return {n: p.grad.clone() for n, p in pm.trainable_named_parameters()}

    eager = grads(0)
    torch._dynamo.reset()
    counters.clear()
    with pm.compiled():
        layers = pm.peft.get_base_model().get_decoder().layers
        assert all(layer._compiled_call_impl is not None for layer in layers)
        compiled = grads(0)
        frames = counters["stats"]["unique_graphs"]
        grads(1)  # same shapes, other data: no new graph
        assert counters["stats"]["unique_graphs"] == frames >= 1
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again outside the block
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(float(g.abs().max()) > 0 for g in eager.values())


def test_activation_memory_budget_saves_fewer_activations_for_the_same_gradients(assets):
    """``activation_memory_budget`` below 1: the compiled layers keep fewer bytes for the backward
    (the partitioner recomputes cheap ops) and the gradients are still eager's."""
    def run(**kw):
        pm = policy(assets, compile=True, **kw)
        pm.train()
        pm.zero_grad(set_to_none=True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        q, qm, r, rm = batch(0)
        torch._dynamo.reset()
        with pm.compiled(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pm(ResponseBatch(q, qm, r, rm), TEMPERATURE)
        ((out.logprobs * rm).sum() + (out.values * rm).square().sum()).backward()
        return sum(saved), {n: p.grad.clone() for n, p in pm.trainable_named_parameters()}

    full_bytes, full = run()
    budget_bytes, budget = run(activation_memory_budget=0.5)
    assert budget_bytes < 0.9 * full_bytes, (budget_bytes, full_bytes)
    for n in full:
        torch.testing.assert_close(budget[n], full[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kw,expected", [
    ({"activation_memory_budget": 0.0, "compile": True}, "expected null or a number in (0, 1]"),
    ({"activation_memory_budget": float("nan"), "compile": True}, "expected null or a number in (0, 1]"),
    ({"activation_memory_budget": 0.8}, "needs model.policy.compile: true"),
    ({"activation_memory_budget": "0.5", "compile": True}, "expected null or a number in (0, 1]"),
    ({"activation_memory_budget": True, "compile": True}, "expected null or a number in (0, 1]"),
    ({"activation_memory_budget": 0.8, "compile": True, "gradient_checkpointing": True},
     "does nothing with model.policy.gradient_checkpointing: true"),
])
def test_activation_memory_budget_bad_values_are_named(kw, expected):
    from rlhf_lit.errors import ConfigError
    from rlhf_lit.model import PolicyConfig

    with pytest.raises(ConfigError, match="model.policy.activation_memory_budget") as err:
        PolicyConfig(**kw)
    assert expected in str(err.value)


def test_compiled_experience_forwards_match_eager_and_compile_once_per_role(assets):
    """``evaluate`` (old and reference log-probs, values) runs the compiled layers too: the same
    numbers as eager for both roles, and a second rollout of the same shapes compiles nothing."""
    from torch._dynamo.utils import counters

    eager_pm = policy(assets, value_head_init_std=0.5)
    with torch.no_grad():  # the policy a few updates away from the reference (both start as the SFT adapter)
        for _, p in eager_pm.trainable_named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    pm = policy(assets, compile=True)
    pm.load_state_dict(eager_pm.state_dict())
    pm.eval()
    eager_pm.eval()
    b = ResponseBatch(*batch(0))
    eager = [eager_pm.evaluate(b, TEMPERATURE, role, micro_batch_size=2) for role in (POLICY, REFERENCE)]
    torch._dynamo.reset()
    counters.clear()
    compiled = [pm.evaluate(b, TEMPERATURE, role, micro_batch_size=2) for role in (POLICY, REFERENCE)]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the layers ran compiled, under each role
    [pm.evaluate(ResponseBatch(*batch(1)), TEMPERATURE, role, micro_batch_size=2) for role in (POLICY, REFERENCE)]
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes, other data: no new graph
    layers = pm.peft.get_base_model().get_decoder().layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again outside
    mask = b.response_mask
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.logprobs * mask, e.logprobs * mask, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[0].values * mask, eager[0].values * mask, rtol=1e-4, atol=1e-5)
    assert float((eager[0].logprobs - eager[1].logprobs).abs().max()) > 1e-4  # the roles differ
    assert float(eager[0].values.abs().max()) > 1e-4


def test_micro_batch_size_auto_is_the_minibatch_on_the_cpu_and_bad_values_are_named():
    from rlhf_lit.stages import PPOConfig, PPOModule

    module = PPOModule(ppo=PPOConfig(num_minibatches=2, micro_batch_size="auto"), rollout_batch_size=8)
    assert module.update_step.micro_batch(4) == 4 and module.update_step.micro_batch(8) == 4
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide the minibatch size 4"):
        PPOModule(ppo=PPOConfig(num_minibatches=2, micro_batch_size=3), rollout_batch_size=8)
    with pytest.raises(ValueError, match="micro_batch_size='big'"):
        PPOModule(ppo=PPOConfig(num_minibatches=2, micro_batch_size="big"), rollout_batch_size=8)


def test_attention_auto_is_sdpa_without_flash_attn(monkeypatch):
    import importlib.util

    from rlhf_lit.model.loading import resolve_attn_implementation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "sdpa"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"  # flash-attn is CUDA-only
    assert resolve_attn_implementation("eager", torch.device("cuda")) == "eager"
