"""The production path on a GPU: nf4 base + LoRA adapters + bf16-mixed, one real PPO step each
through ``PPOModule`` in a Lightning ``Trainer``, on a small random Qwen2 saved to a temporary folder.

Skipped without CUDA (CI has none); run them on a GPU machine with ``pytest -m gpu``. The nf4 test
also needs bitsandbytes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_WORDS, VOCAB = 509, 512
PAD_ID, EOS_ID = 509, 511
BATCH, MINIBATCHES, MICRO, NEW_TOKENS = 8, 2, 2, 16


def _tokenizer():
    from helpers import build_tokenizer

    return build_tokenizer(N_WORDS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("gpu_prod")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(root / "sft")
    g = torch.Generator().manual_seed(0)
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(2 * BATCH):
            n = int(torch.randint(4, 12, (1,), generator=g))  # ragged: left padding
            words = " ".join(f"w{int(j)}" for j in torch.randint(4, N_WORDS, (n,), generator=g))
            f.write(json.dumps({"id": f"p{i}", "prompt": words, "split": "train"}) + "\n")
    return root


def _reward():
    from rlhf_lit.rewards.base import RewardBackend

    class TextReward(RewardBackend):
        default_name = "text"

        def score(self, prompts, responses):
            return [((len(r) * 7) % 11) / 11.0 - 0.5 for r in responses]

    return TextReward()


_RUNS: dict[str, dict] = {}


def one_ppo_step(assets, quantization: str, tmp_path_factory, compile: bool = False, micro=MICRO,
                 critic: str = "value_head") -> dict:
    """Fit one PPO iteration (cached per setting) and return what the tests inspect."""
    key = (quantization, compile, micro, critic)
    if key in _RUNS:
        return _RUNS[key]
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from rlhf_lit.data import PromptDataModule
    from rlhf_lit.stages import PPOConfig, PPOModule
    from rlhf_lit.model import CRITIC, POLICY, REFERENCE, PolicyConfig
    from rlhf_lit.rollout import SamplingConfig

    out: dict = {}

    class Probe(PPOModule):
        def ppo_update(self, rollout):
            # A fresh forward of the first micro-batch, as the update computes it (train mode, grad on),
            # before any optimizer step: it must reproduce the log-probs recorded at rollout time.
            self.model.train()
            mb = rollout.select(torch.arange(MICRO, device=rollout.query_ids.device))
            new = self.model(mb.batch, self.sampling.temperature, values=False)
            out["fresh_logprobs"] = new.logprobs.detach().float().cpu()
            out["rollout_logprobs"] = mb.logprobs.float().cpu()
            out["mask"] = mb.response_mask.cpu()
            out["param_dtypes"] = {n: p.dtype for n, p in self.model.trainable_named_parameters()}
            return super().ppo_update(rollout)

    class Snap(Callback):
        def on_train_start(self, trainer, module):
            out["before"] = {n: p.detach().float().cpu().clone() for n, p in module.model.named_parameters()
                             if "lora_" in n}
            out["engine"] = module.engine.name
            out["base_layer_types"] = {type(m.base_layer).__name__ for m in module.model.modules()
                                       if hasattr(m, "base_layer") and hasattr(m, "lora_A")}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            out["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
            out["after"] = {n: p.detach().float().cpu().clone() for n, p in module.model.named_parameters()
                            if "lora_" in n}

    tmp = tmp_path_factory.mktemp(f"fit_{quantization}_{'compiled' if compile else 'eager'}_{micro}_{critic}")
    module = Probe(
        policy=PolicyConfig(base_model=str(assets / "base"), sft_adapter=str(assets / "sft"), quantization=quantization,
                            dtype="bfloat16", gradient_checkpointing=True, compile=compile, critic=critic),
        reward=_reward(),
        ppo=PPOConfig(ppo_epochs=2, num_minibatches=MINIBATCHES, micro_batch_size=micro),
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
        rollout_engine="auto", rollout_batch_size=BATCH, output_dir=str(tmp / "adapter"), log_samples=0,
    )
    data = PromptDataModule(prompt_file=str(assets / "prompts.jsonl"), tokenizer=str(assets / "base"),
                            batch_size=BATCH, val_fraction=0.0, test_fraction=0.0)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_epochs=1, limit_train_batches=1,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp),
                        callbacks=[Snap()])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    out["policy_keys"] = [n for n in out["before"] if f".{POLICY}." in n]
    out["reference_keys"] = [n for n in out["before"] if f".{REFERENCE}." in n]
    out["critic_keys"] = [n for n in out["before"] if f".{CRITIC}." in n]
    out["export"] = tmp / "adapter"
    _RUNS[key] = out
    return out


def _check_step(run: dict) -> None:
    m = run["metrics"]
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "policy/grad_norm", "time/iteration_s",
                "perf/peak_mem_gb", "perf/tokens_per_sec"):
        assert key in m and math.isfinite(m[key]), key
    assert m["response/length_mean"] == pytest.approx(NEW_TOKENS)  # min_new_tokens forces the length
    assert m["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=5e-3)
    assert m["policy/updates"] == 2 * MINIBATCHES
    moved = [n for n in run["policy_keys"] if not torch.equal(run["before"][n], run["after"][n])]
    assert moved, "the optimizer step did not change the policy adapter"
    assert all(torch.equal(run["before"][n], run["after"][n]) for n in run["reference_keys"]), \
        "the reference adapter changed"
    # LoRA (fp32 masters of the bf16 compute copies) and value head train in float32 under bf16-mixed.
    assert set(run["param_dtypes"].values()) == {torch.float32}
    assert (run["export"] / "adapter_model.safetensors").is_file()


def test_nf4_load_and_one_ppo_step(assets, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    run = one_ppo_step(assets, "nf4", tmp_path_factory)
    assert run["base_layer_types"] == {"Linear4bit"}, run["base_layer_types"]
    _check_step(run)


def test_bf16_mixed_one_ppo_step(assets, tmp_path_factory):
    run = one_ppo_step(assets, "none", tmp_path_factory)
    assert run["base_layer_types"] == {"Linear"}
    _check_step(run)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_rollout_logprobs_equal_a_fresh_forward(assets, tmp_path_factory, quantization):
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    run = one_ppo_step(assets, quantization, tmp_path_factory)
    mask = run["mask"].float()
    diff = (run["fresh_logprobs"] - run["rollout_logprobs"]).abs() * mask
    # Same adapter, same micro-batch rows, same autocast: equal up to bf16 kernel differences.
    assert float(diff.max()) < 2e-2, float(diff.max())
    assert float(diff.sum() / mask.sum()) < 2e-3
    ratio = (torch.exp(run["fresh_logprobs"] - run["rollout_logprobs"]) * mask).sum() / mask.sum()
    assert float(ratio) == pytest.approx(1.0, abs=2e-3)


def test_bf16_compiled_layers_one_ppo_step(assets, tmp_path_factory):
    run = one_ppo_step(assets, "none", tmp_path_factory, compile=True)
    _check_step(run)
    eager = one_ppo_step(assets, "none", tmp_path_factory)
    # Same seed, same rollout: the compiled update starts from the same losses as the eager one.
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl"):
        assert run["metrics"][key] == pytest.approx(eager["metrics"][key], rel=5e-2, abs=5e-3), key


def test_nf4_compiled_critic_adapter_one_ppo_step(assets, tmp_path_factory):
    """``critic: adapter`` on the production settings (nf4, checkpointing, compiled layers): both
    trained adapters move, the reference does not, and the losses start where the value-head run's do
    (the same rollout: only the critic differs)."""
    pytest.importorskip("bitsandbytes")
    run = one_ppo_step(assets, "nf4", tmp_path_factory, compile=True, critic="adapter")
    _check_step(run)
    assert run["critic_keys"] and len(run["critic_keys"]) == len(run["policy_keys"])
    assert any(not torch.equal(run["before"][n], run["after"][n]) for n in run["critic_keys"]), \
        "the optimizer step did not change the critic adapter"
    # Same seed: the rollout (sampled with the policy adapter alone) scores as the value-head run's does.
    shared = one_ppo_step(assets, "nf4", tmp_path_factory)
    for key in ("objective/scores", "objective/kl"):
        assert run["metrics"][key] == pytest.approx(shared["metrics"][key], rel=2e-2, abs=5e-3), key


def test_head_logprobs_on_cuda_match_the_logits_path():
    from torch.nn import functional as F

    from rlhf_lit.algos.logprobs import entropy_from_logits, logprobs_from_logits
    from rlhf_lit.algos.head_logprobs import head_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 96, 256, device="cuda", generator=g).bfloat16().requires_grad_(True)
    W = (torch.randn(32000, 256, device="cuda", generator=g) * 0.05).bfloat16()
    a = torch.randint(0, 32000, (4, 96), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = head_logprobs(h, W, a, 0.7, entropy=True)
        ref = logprobs_from_logits(F.linear(h, W), a, 0.7)
        ref_entropy = entropy_from_logits(F.linear(h, W), 0.7)
    torch.testing.assert_close(out.logprobs, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.entropy, ref_entropy.detach(), atol=1e-3, rtol=0)
    gh, = torch.autograd.grad(out.logprobs.sum(), h)
    rh, = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(gh.float(), rh.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["reward_model", "detoxify"])
def test_offloaded_reward_scores_alike_and_leaves_the_gpu(backend, tmp_path):
    from rlhf_lit.rewards import Detoxify, RewardModel
    from rlhf_lit.testing.models import build_detoxify_checkpoint, build_sequence_classifier

    texts = ["you are a stupid idiot", "what a lovely day", "no", "news today, read it"] * 4
    if backend == "reward_model":
        folder = str(build_sequence_classifier(tmp_path, labels=("negative", "positive")))
        make = lambda offload: RewardModel(folder, label="positive", offload=offload)  # noqa: E731
    else:
        ckpt, hf = build_detoxify_checkpoint(tmp_path)
        make = lambda offload: Detoxify(checkpoint=str(ckpt), huggingface_config_path=str(hf), offload=offload)  # noqa: E731
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    resident, offloaded = make(False), make(True)
    resident.setup("cuda")
    held = torch.cuda.memory_allocated() - base
    offloaded.setup("cuda")
    assert torch.cuda.memory_allocated() - base == held  # the offloaded copy holds no GPU memory at rest
    expected = resident([""] * len(texts), texts).scores  # also warms cuBLAS (its workspace is allocated)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    got = offloaded([""] * len(texts), texts).scores
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # the weights left the GPU after scoring
    assert held > 0


def test_micro_batch_size_auto_picks_a_divisor_from_free_memory(assets, tmp_path_factory):
    run = one_ppo_step(assets, "none", tmp_path_factory, micro="auto")
    _check_step(run)
    # A tiny model on an 80 GB card: the whole minibatch fits.
    assert run["metrics"]["perf/micro_batch_size"] == BATCH // MINIBATCHES
