"""Rollout engines: turn a batch of left-padded prompts into sampled responses.

The training loop never calls ``generate`` itself; it asks an engine, chosen in the config. Engines
return tokens only: the loop recomputes old log-probs with the same forward pass it trains with, so
the PPO ratio starts at exactly 1 whatever the engine does internally.

- ``base.py``        :class:`SamplingConfig` (``model.sampling``) and the :class:`RolloutEngine` interface
- ``hf_generate.py`` transformers' ``generate``: works everywhere
- ``cuda_graph.py``  static KV cache + the decode step replayed as a CUDA graph (Llama-family decoders)
- ``auto.py``        ``model.rollout_engine`` and ``model.rollout_kernels``: the choice, and the fallback of ``auto``
"""

from rlhf_lit.rollout.auto import EngineName, FallbackEngine, KernelsName, make_engine
from rlhf_lit.rollout.base import RolloutEngine, SamplingConfig
from rlhf_lit.rollout.hf_generate import HFGenerate

__all__ = ["EngineName", "FallbackEngine", "HFGenerate", "KernelsName", "RolloutEngine", "SamplingConfig", "make_engine"]
