"""Choosing the rollout engine (``model.rollout_engine``), and falling back when it cannot run.

``auto`` is the CUDA-graph engine on a GPU and HF ``generate`` on the CPU (``cuda_graph_merged``: the
CUDA-graph engine decoding from merged LoRA weight copies, faster for ~13 GB more on a 7B model); when the CUDA-graph
engine meets a model it does not know (not a Llama-family decoder), ``auto`` falls back to
``generate`` for the rest of the run, with a warning. An explicit ``cuda_graph`` fails instead.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch

from rlhf_lit.errors import ConfigError
from rlhf_lit.rollout.base import RolloutEngine
from rlhf_lit.rollout.hf_generate import HFGenerate

log = logging.getLogger(__name__)

EngineName = Literal["auto", "hf", "cuda_graph", "cuda_graph_merged"]
KernelsName = Literal["auto", "triton", "torch"]


class FallbackEngine(RolloutEngine):
    """Samples with ``primary`` until it raises ``UnsupportedModelError``, then with HF ``generate``."""

    def __init__(self, primary: RolloutEngine) -> None:
        self.active = primary

    @property
    def name(self) -> str:
        return self.active.name

    @property
    def last_sampler_logprobs(self):
        return self.active.last_sampler_logprobs

    def generate(self, model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id):
        from rlhf_lit.rollout.cuda_graph import UnsupportedModelError

        try:
            return self.active.generate(model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id)
        except UnsupportedModelError as e:
            if isinstance(self.active, HFGenerate):
                raise
            log.warning("rollout_engine=auto: falling back to HF generate (%s)", e)
            self.active.release()
            self.active = HFGenerate()
            return self.active.generate(model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id)

    def release(self) -> None:
        self.active.release()


def check_kernels(name: str, kernels: str) -> None:
    """``model.rollout_kernels`` against ``model.rollout_engine``, before anything loads.

    Raises:
        ConfigError: an unknown kernels value, or one other than ``auto`` with the ``hf`` engine
            (transformers generate has no glue kernels to choose).
    """
    if kernels not in get_args(KernelsName):
        raise ConfigError(f"model.rollout_kernels={kernels!r}: expected 'auto', 'triton' or 'torch'")
    if name == "hf" and kernels != "auto":
        raise ConfigError(f"model.rollout_kernels={kernels!r} chooses the cuda_graph engines' decode kernels; "
                          "model.rollout_engine is 'hf' (transformers generate), which has none: leave it 'auto'")


def make_engine(name: EngineName, device: torch.device, kernels: KernelsName = "auto") -> RolloutEngine:
    """The engine ``name`` for ``device``; ``kernels``: the CUDA-graph engine's decode-step glue
    (``StaticCudaGraphGenerate(kernels=...)``: Triton kernels, torch ops, or ``auto``).

    Raises:
        ValueError: ``cuda_graph`` without a CUDA device, or an unknown name.
        ConfigError: see :func:`check_kernels`.
    """
    check_kernels(name, kernels)
    if name == "auto" and device.type != "cuda" and kernels != "auto":
        log.warning("model.rollout_kernels=%r has no effect here: rollout_engine=auto samples with HF generate "
                    "on the %s", kernels, device.type)
    if name == "hf" or (name == "auto" and device.type != "cuda"):
        return HFGenerate()
    if name not in ("auto", "cuda_graph", "cuda_graph_merged"):
        raise ValueError(f"model.rollout_engine={name!r}: expected 'auto', 'hf', 'cuda_graph' or 'cuda_graph_merged'")
    if device.type != "cuda":
        raise ValueError(f"model.rollout_engine={name} needs a CUDA GPU; use 'hf' or 'auto' on the CPU")
    from rlhf_lit.rollout.cuda_graph import StaticCudaGraphGenerate

    engine = StaticCudaGraphGenerate(sampler_logprobs=True, lora="merged" if name == "cuda_graph_merged" else "fused",
                                     kernels=kernels)
    return FallbackEngine(engine) if name == "auto" else engine
