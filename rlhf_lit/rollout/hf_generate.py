"""The portable engine: transformers' ``generate`` with a dynamic KV cache."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from transformers import LogitsProcessor

from rlhf_lit.rollout.base import RolloutEngine
from rlhf_lit.rollout.sampling import filter_logits


class _SamplerLogprobs(LogitsProcessor):
    """A logits processor that records the log-prob of each sampled token under the distribution
    it was drawn from. transformers runs custom processors before its own temperature / top-k /
    top-p warpers, so this one applies the same warpers (``filter_logits`` mirrors HF's) to the
    scores it sees and, one step later, reads the log-prob of the token that was drawn."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.steps: list[Tensor] = []
        self._prev: Optional[Tensor] = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._take(input_ids[:, -1])
        self._prev = torch.log_softmax(filter_logits(scores.float() / self.temperature, self.top_k, self.top_p), -1)
        return scores

    def _take(self, tokens: Tensor) -> None:
        if self._prev is not None:
            self.steps.append(self._prev.gather(1, tokens[:, None])[:, 0])
            self._prev = None

    def finish(self, new_tokens: Tensor) -> Tensor:
        """``(B, R)`` log-probs of ``new_tokens`` (the last step's token is read here)."""
        if new_tokens.shape[1] > len(self.steps):
            self._take(new_tokens[:, len(self.steps)])
        lp = torch.stack(self.steps, 1) if self.steps else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return lp[:, : new_tokens.shape[1]]


@contextlib.contextmanager
def without_model_generation_defaults(model) -> Iterator[None]:
    """Run the block with the model's own ``generation_config`` replaced by an empty one.

    transformers fills every field a passed ``GenerationConfig`` leaves unset (``min_p``,
    ``typical_p``, ``no_repeat_ngram_size``, ``suppress_tokens``, ...) from the model's
    ``generation_config`` (``GenerationMixin._prepare_generation_config``), so a checkpoint that
    ships such defaults would sample from a distribution other than the one PPO's log-probs (and
    the recorded sampler log-probs) describe. With an empty one, only what the engine sets acts.
    """
    from transformers import GenerationConfig

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


class HFGenerate(RolloutEngine):
    """transformers' ``generate`` with a dynamic KV cache: works everywhere (CPU included).

    Only the configured sampling acts: temperature, top-k, top-p and the lengths of
    ``model.sampling``, nothing of the model's own ``generation_config`` (Qwen2.5 ships
    ``repetition_penalty=1.05, top_k=20, top_p=0.8``; others ``min_p``, ``no_repeat_ngram_size``...;
    :func:`without_model_generation_defaults`). The log-probs each token was sampled with are
    recorded (:attr:`last_sampler_logprobs`).
    """

    def __init__(self) -> None:
        self._last_logprobs: Optional[Tensor] = None

    @property
    def last_sampler_logprobs(self) -> Optional[Tensor]:
        return self._last_logprobs

    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id):
        from transformers import GenerationConfig, LogitsProcessorList

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
        recorder = _SamplerLogprobs(sampling.temperature, sampling.top_k, sampling.top_p)
        with without_model_generation_defaults(model):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([recorder]))
        tokens = out[:, input_ids.shape[1]:]
        stopped = torch.isin(tokens, torch.as_tensor(list(stop_token_ids), device=tokens.device))
        after_stop = (stopped.cumsum(-1) - stopped.long()) > 0  # PAD after each row's first stop
        self._last_logprobs = recorder.finish(tokens).masked_fill(after_stop, 0.0)
        return tokens
