"""The portable engine: transformers' ``generate`` with a dynamic KV cache."""

from __future__ import annotations

import torch

from rlhf_lit.rollout.base import RolloutEngine


class HFGenerate(RolloutEngine):
    """transformers' ``generate`` with a dynamic KV cache: works everywhere (CPU included).

    A generation config is built from scratch so a model's shipped defaults (Qwen2.5 ships
    ``repetition_penalty=1.05, top_k=20, top_p=0.8``) never change the sampling distribution.
    """

    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id):
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
            repetition_penalty=1.0,
        )
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return out[:, input_ids.shape[1]:]
