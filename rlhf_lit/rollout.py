"""Rollout engines: turn a batch of left-padded prompts into sampled responses.

The PPO module never calls ``generate`` itself; it asks an engine, chosen in the config. Engines
return tokens only: the module recomputes old log-probs with the same forward pass it trains
with, so the PPO ratio starts at exactly 1 whatever the engine does internally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn


@dataclass
class SamplingConfig:
    """How responses are sampled during rollouts (and evaluation)."""

    max_new_tokens: int = 128
    """Longest response in tokens; responses without a stop token by then are cut (and may get
    ``missing_eos_penalty``)."""
    min_new_tokens: int = 0
    """Suppress the stop token before this many tokens (benchmarks use it to force fixed lengths)."""
    temperature: float = 0.7
    """Sampling temperature; the same T divides the logits of old, new and reference log-probs."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 turns it off (the PPO default)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 turns it off (the PPO default)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("sampling.min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0 (PPO needs a sampling policy), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("sampling.top_k must be >= 0 and sampling.top_p in (0, 1]")


class RolloutEngine(ABC):
    """Samples responses from whichever adapter is active on ``model``."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        sampling: SamplingConfig,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
    ) -> Tensor:
        """Sample continuations.

        Args:
            model: a causal LM (a ``peft.PeftModel`` or a transformers model) in eval mode.
            input_ids: ``(B, P)`` prompt ids, left-padded with ``pad_token_id``.
            attention_mask: ``(B, P)``, 0 on the padding.
            sampling: temperature, top-k/p and lengths.
            stop_token_ids: tokens that end a response (kept in the output).
        Returns:
            ``(B, R)`` new tokens with ``R <= sampling.max_new_tokens``, PAD after each stop token.
        """

    def release(self) -> None:
        """Free memory held between rollouts (caches, graphs) so the update phase gets it back."""


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
