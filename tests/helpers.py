"""Plain helpers shared by several test files (fixtures live in conftest.py).

The tiny random Qwen2 of the policy tests, its ChatML tokenizer, SFT-like adapters, the
batches and reference log-probs the policy tests compare against, and the CLI runner of the
end-to-end tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lit.algos.logprobs import logprobs_from_logits
from rlhf_lit.model import PolicyConfig, PolicyModel
from rlhf_lit.rewards.base import RewardBackend
from rlhf_lit.testing.tokenizers import build_chatml_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_WORDS, VOCAB = 250, 256  # tokenizer ids 0..249, ChatML specials 250..252, model rows 256
PAD_ID, IM_START_ID, EOS_ID = 250, 251, 252
TEMPERATURE = 0.7


# ---------------------------------------------------------------------------------------------
# A tiny random Qwen2, its ChatML tokenizer and SFT-like adapters
# ---------------------------------------------------------------------------------------------
def build_tokenizer(n_words: int = N_WORDS):
    """The test kit's ChatML tokenizer with ``n_words`` ids below the specials: PAD, <|im_start|>,
    EOS at ``n_words``, ``n_words + 1``, ``n_words + 2``; left padding, for prompts."""
    tok = build_chatml_tokenizer(size=n_words, padding_side="left")
    assert (tok.pad_token_id, tok.eos_token_id) == (n_words, n_words + 2)
    return tok


def tiny_qwen2():
    """A random two-layer Qwen2 with ``VOCAB`` rows, attention dropout on (the policy must turn it off)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, attention_dropout=0.1,  # dropout on purpose: it must be turned off
                      bos_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return Qwen2ForCausalLM(cfg)


def write_adapter(base_dir, out_dir, seed: int, modules_to_save=None, rows=None, tokenizer=None) -> None:
    """An SFT-like adapter; ``rows``: the SFT run resized the vocabulary (and saved the table) first;
    ``tokenizer``: saved beside the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():  # the SFT run learned the new rows
            model.get_input_embeddings().weight[VOCAB:].normal_(0, 0.5)
            model.get_output_embeddings().weight[VOCAB:].normal_(0, 0.5)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM",
                      modules_to_save=modules_to_save)
    pm = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)  # the SFT run changed these weights too
    pm.save_pretrained(out_dir, save_embedding_layers=rows is not None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# The policy under test, its inputs and the independent reference
# ---------------------------------------------------------------------------------------------
def policy(assets, **kw) -> PolicyModel:
    """A CPU float32 ``PolicyModel`` on the ``assets`` fixture's base and SFT adapter; ``kw`` overrides."""
    cfg = dict(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32")
    cfg.update(kw)
    return PolicyModel(PolicyConfig(**cfg), torch.device("cpu"))


def batch(seed: int = 0, B: int = 3, P: int = 6, R: int = 5):
    """Left-padded prompts (row 0 has 2 pads) and responses (row 1 ends early at a stop token)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(4, N_WORDS, (B, P), generator=g)
    q_mask = torch.ones(B, P, dtype=torch.long)
    q[0, :2], q_mask[0, :2] = PAD_ID, 0
    r = torch.randint(4, N_WORDS, (B, R), generator=g)
    r_mask = torch.ones(B, R, dtype=torch.bool)
    r[1, 2], r[1, 3:], r_mask[1, 3:] = EOS_ID, PAD_ID, False
    return q, q_mask, r, r_mask


def hf_logprobs(model, q, q_mask, r, r_mask) -> torch.Tensor:
    """Log-probs of the response tokens from a plain HF/PEFT forward (the independent reference)."""
    ids = torch.cat([q, r], 1)
    mask = torch.cat([q_mask, r_mask.long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P, R = q.shape[1], r.shape[1]
    return logprobs_from_logits(logits[:, P - 1:P + R - 1], r, TEMPERATURE)


def masked_max_diff(a, b, mask) -> float:
    """The largest absolute difference of ``a`` and ``b`` where ``mask`` is set."""
    return float(((a - b).abs() * mask).max())


def lora_names(pm: PolicyModel, adapter: str) -> set[str]:
    """Names of the LoRA parameters of one adapter of ``pm``."""
    return {n for n, _ in pm.named_parameters() if ".lora_" in n and f".{adapter}." in n}


class ConstantishReward(RewardBackend):
    """Deterministic, varied scores from the text alone (no model)."""

    default_name = "lengthish"

    def score(self, prompts, responses):
        return [((len(r) * 7) % 11) / 11.0 - 0.5 for r in responses]


# ---------------------------------------------------------------------------------------------
# The CLI, in process
# ---------------------------------------------------------------------------------------------
def run_cli(*args: str):
    """``python -m rlhf_lit *args`` in this process; returns the ``LightningCLI``."""
    from rlhf_lit.cli import main

    with mock.patch.object(sys, "argv", ["python -m rlhf_lit"]):
        return main(list(args))


def fast_args(run_dir: Path, *extra: str) -> list[str]:
    """The demo config shrunk to seconds: 8 prompts per rollout, 12 new tokens."""
    return [
        "--config", DEMO,
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--data.batch_size=8",
        f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}",
        "--model.ppo.ppo_epochs=2",
        "--model.sampling.max_new_tokens=12",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# Preference pairs for the tiny tokenizer
# ---------------------------------------------------------------------------------------------
def write_pairs(path: Path, n: int = 16, seed: int = 0, test: int = 0) -> Path:
    """``n`` preference pairs of random words, ragged lengths (left padding, unequal responses), a
    ``meta.score_diff`` on every other pair, the last ``test`` of them in the test split; 2 pairs per thread."""
    import json

    g = torch.Generator().manual_seed(seed)

    def words(lo: int, hi: int) -> str:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(f"w{int(j)}" for j in torch.randint(4, N_WORDS, (k,), generator=g))

    with Path(path).open("w") as f:
        for i in range(n):
            meta = {"context_id": f"t{i // 2}", "split": "test" if i >= n - test else "train"}
            if i % 2:
                meta["score_diff"] = 0.5 + (i % 3)
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(2, 7)}],
                                "chosen": [{"role": "assistant", "content": words(1, 6)}],
                                "rejected": [{"role": "assistant", "content": words(1, 6)}], "meta": meta}) + "\n")
    return Path(path)



class DieInValidation(Callback):
    """Kills its process (``os._exit``, like ``kill -9``: no handler runs) when the validation after
    optimizer step ``at_step`` starts. For crash-and-resume tests run in a subprocess with ``tests/``
    on ``PYTHONPATH``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and pl_module.history_done() == self.at_step:
            os._exit(137)
