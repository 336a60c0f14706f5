"""What every rollout engine is: the sampling settings and the engine interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from rlhf_lit.errors import ConfigError


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
            raise ConfigError(f"model.sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("model.sampling.min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"model.sampling.temperature must be > 0 (PPO needs a sampling policy), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("model.sampling.top_k must be >= 0 and model.sampling.top_p in (0, 1]")


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

    @property
    def last_sampler_logprobs(self) -> Optional[Tensor]:
        """``(B, R)`` float32 log-probs under which the last ``generate`` call drew each token (after
        temperature, stop suppression, top-k and top-p), 0 after the stop; None when the engine does
        not record them. The training forward's log-probs differ by numerics and by the filters:
        PPO measures that gap and can correct for it (``model.ppo.rollout_is``)."""
        return None

    @property
    def name(self) -> str:
        """The engine that samples (for a fallback wrapper: the one in use now)."""
        return type(self).__name__

    def release(self) -> None:
        """Free memory held between rollouts (caches, graphs) so the update phase gets it back."""
