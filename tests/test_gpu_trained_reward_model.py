"""A trained reward model folder scored on a GPU: resident or offloaded to pinned host memory, bf16 or
nf4 (the offload moves the 4-bit quantization states too), the same scores either way.

Skipped without CUDA (CI has none); the nf4 cases also need bitsandbytes. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N_WORDS, VOCAB = 509, 512
PROMPTS = ["the news today", "why vote", "hello world and thanks", "what is this thread"] * 3
RESPONSES = ["good post", "you idiot", "thanks for the news, great reply", "no", "i love this", "bad take",
             "please vote today", "stupid", "nice", "what", "hello", "the people like it"]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    """A reward model folder as the stage exports it: a random tiny Qwen2 base, a LoRA and a head
    with non-zero weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helpers import build_tokenizer
    from rlhf_lit.export import export_reward_model
    from rlhf_lit.model import POLICY, PolicyConfig, PolicyModel

    root = tmp_path_factory.mktemp("gpu_rm")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=N_WORDS, eos_token_id=N_WORDS + 2, pad_token_id=N_WORDS)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "base")
    tok = build_tokenizer(N_WORDS)
    tok.save_pretrained(root / "base")
    pm = PolicyModel(PolicyConfig(base_model=str(root / "base"), sft_adapter=None, dtype="float32", lora_r=8,
                                  lora_alpha=16, value_head_init_std=0.5), torch.device("cpu"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    export_reward_model(pm.peft, POLICY, pm.value_head, tok, root / "rm",
                        {"base_model": str(root / "base"), "system_prompt": "be civil", "max_prompt_tokens": 128,
                         "max_response_tokens": 64})
    return root / "rm"


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_offloaded_scores_equal_resident_and_hold_no_gpu_memory(rm_folder, quantization):
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    from rlhf_lit.rewards import TrainedRewardModel

    # sdpa for both: offloaded bf16 weights load on the CPU, where 'auto' never picks flash-attn.
    resident = TrainedRewardModel(str(rm_folder), quantization=quantization, batch_size=5, attn_implementation="sdpa")
    resident.setup("cuda")
    want = resident(PROMPTS, RESPONSES).scores
    assert torch.isfinite(want).all() and float(want.std()) > 0
    del resident
    torch.cuda.empty_cache()

    before = torch.cuda.memory_allocated()
    offloaded = TrainedRewardModel(str(rm_folder), quantization=quantization, batch_size=5, offload=True,
                                   attn_implementation="sdpa")
    offloaded.setup("cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20, "the offloaded weights must wait in host memory"
    for _ in range(2):  # twice: the host copies come back intact after a round trip
        got = offloaded(PROMPTS, RESPONSES).scores
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20


def test_bf16_scores_track_the_fp32_cpu_scores(rm_folder):
    from rlhf_lit.rewards import TrainedRewardModel

    cpu = TrainedRewardModel(str(rm_folder), device="cpu")
    cpu.setup("cpu")
    gpu = TrainedRewardModel(str(rm_folder))
    gpu.setup("cuda")
    got, want = gpu(PROMPTS, RESPONSES).scores, cpu(PROMPTS, RESPONSES).scores
    # bf16 rounds every hidden state: on this random 2-layer model that moves the scores by up to
    # ~0.13 score std, the same on the CPU in bf16 (0.126 std, correlation 0.9998 with fp32). A wrong
    # token read, a wrong head or a lost adapter would break the correlation.
    assert float(torch.corrcoef(torch.stack([got, want]))[0, 1]) > 0.99
    torch.testing.assert_close(got, want, atol=0.25 * float(want.std()), rtol=0)
