"""Offline assets for the PPO benchmark: random models of production shape, a tokenizer, an SFT
LoRA adapter, a reward model folder and a prompt file. Nothing is downloaded.

Tokenizer: the test kit's ChatML tokenizer (:func:`rlhf_lit.testing.tokenizers.build_chatml_tokenizer`),
a ``Qwen2Tokenizer`` whose ids below Qwen2.5's special tokens are single characters and then
space-led words (`` abc``) up to 151642, with Qwen2.5's ChatML specials at their real ids:
``<|endoftext|>`` (PAD, 151643), ``<|im_start|>`` (151644), ``<|im_end|>`` (EOS, 151645). A random
policy samples ids all over the 152,064-entry vocabulary; each sampled word id decodes to a word
that re-encodes to that one token, so the reward model reads texts as long as the real ones (a
tiny trained BPE would decode most random ids to nothing). Ids from 151646 to 152063 (unused
padding rows in Qwen2.5 too) decode to nothing. The folders hold a Qwen2 ``config.json``, so
``AutoTokenizer`` loads them as a ``Qwen2Tokenizer`` whatever the tokenizer files say: a
tokenizer of another pipeline (a word-level one) would reload encoding prompts to almost nothing.

Prompts: ``user`` turns (a letter, then space-led words) whose chat-templated ids (no system
prompt) are exactly ``prompt_tokens`` long, so batches need no padding and every run sees the same
64-token prompts.
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lit.testing.tokenizers import ALPHABET, build_chatml_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Shapes:
    """Model shapes (Qwen2 family) and the workload."""

    vocab_size: int  # the models' vocabulary (rows of the embedding / lm_head)
    special_start: int  # id of <|endoftext|>; the tokenizer's characters and words fill the ids below it
    policy: dict
    reward: dict
    batch: int  # prompts per rollout
    prompt_tokens: int
    new_tokens: int
    micro_batch: int


QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_POLICY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
TINY_REWARD = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=512)

FULL = Shapes(vocab_size=152064, special_start=151643, policy=QWEN25_7B, reward=QWEN25_05B,
              batch=64, prompt_tokens=64, new_tokens=128, micro_batch=8)
TINY = Shapes(vocab_size=512, special_start=509, policy=TINY_POLICY, reward=TINY_REWARD,
              batch=8, prompt_tokens=24, new_tokens=12, micro_batch=1)


def build_tokenizer(special_start: int):
    """The ChatML tokenizer with ``special_start`` ids below PAD, ``<|im_start|>`` and EOS; left padding."""
    tok = build_chatml_tokenizer(size=special_start, padding_side="left", model_max_length=32768)
    assert (tok.pad_token_id, tok.eos_token_id) == (special_start, special_start + 2)
    return tok


def qwen2_config(shape: dict, shapes: Shapes, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=shapes.vocab_size, tie_word_embeddings=False, bos_token_id=shapes.special_start,
                       eos_token_id=shapes.special_start + 2, pad_token_id=shapes.special_start,
                       attention_dropout=0.0, **shape, **extra)


def _build_on(device, dtype, fn):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return fn()
    finally:
        torch.set_default_dtype(old)


def templated_ids(tok, text: str) -> list[int]:
    """Prompt ids exactly as ``PromptDataModule`` makes them (user turn, no system prompt)."""
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok(chat, add_special_tokens=False)["input_ids"]


def write_prompts(path: Path, tok, n: int, prompt_tokens: int, n_words: int, seed: int = 0) -> None:
    """``n`` prompts whose templated ids (user turn only, generation prompt) are ``prompt_tokens`` long:
    a lower-case letter (one token at the start of the turn), then space-led words, one token each."""
    g = torch.Generator().manual_seed(seed)
    overhead = len(templated_ids(tok, "a")) - 1
    k = prompt_tokens - overhead
    assert k >= 1, "prompt_tokens is shorter than the chat template"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            first = string.ascii_lowercase[int(torch.randint(26, (1,), generator=g))]
            ids = torch.randint(len(ALPHABET), n_words, (k - 1,), generator=g).tolist()
            text = first + tok.decode(ids)
            f.write(json.dumps({"id": f"bench-{i:04d}", "prompt": text, "split": "train"}) + "\n")
            check = templated_ids(tok, text)
            assert len(check) == prompt_tokens, (len(check), prompt_tokens)


def build_assets(root: str | Path, shapes: Shapes, device: str, n_prompts: int, seed: int = 0) -> dict:
    """Write base/, sft_adapter/, reward/ and prompts.jsonl under ``root`` (skipped if already there)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    root = Path(root)
    paths = {"base": root / "base", "sft_adapter": root / "sft_adapter", "reward": root / "reward",
             "prompts": root / "prompts.jsonl"}
    done = root / "DONE"
    if done.is_file():
        return {k: str(v) for k, v in paths.items()} | json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    timings = {}
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = build_tokenizer(shapes.special_start)

    t = time.perf_counter()
    model = _build_on(device, dtype, lambda: Qwen2ForCausalLM(qwen2_config(shapes.policy, shapes)))
    model.generation_config.eos_token_id = shapes.special_start + 2
    model.generation_config.pad_token_id = shapes.special_start
    timings["build_policy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(paths["base"], safe_serialization=True)
    tok.save_pretrained(paths["base"])
    timings["save_policy_s"] = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())

    # The SFT adapter: r=16, alpha 16, all seven projections, B non-zero so the adapter matters.
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
    peft_model.save_pretrained(paths["sft_adapter"])
    del peft_model, model
    if device == "cuda":
        torch.cuda.empty_cache()

    t = time.perf_counter()
    rm = _build_on(device, dtype, lambda: Qwen2ForSequenceClassification(qwen2_config(shapes.reward, shapes, num_labels=1)))
    rm.save_pretrained(paths["reward"], safe_serialization=True)
    tok.save_pretrained(paths["reward"])
    timings["reward_model_s"] = time.perf_counter() - t
    del rm
    if device == "cuda":
        torch.cuda.empty_cache()

    write_prompts(paths["prompts"], tok, n_prompts, shapes.prompt_tokens, shapes.special_start, seed)
    meta = {"policy_params": n_params, **{k: round(v, 1) for k, v in timings.items()}}
    done.write_text(json.dumps(meta))
    return {k: str(v) for k, v in paths.items()} | meta
