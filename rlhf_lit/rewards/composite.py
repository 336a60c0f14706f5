"""A weighted sum of reward backends."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .base import RewardBackend, RewardOutput


class Composite(RewardBackend):
    """Weighted sum of other reward backends: ``raw = sum_i weights[i] * backend_i(prompt, response)``,
    where each backend's score already has its own scale/shift/clip; this backend's scale/shift/clip
    then apply to the sum.

    A sample is valid only if every backend scored it. Every backend's components are passed on
    (logged as ``reward/<backend name>``, raw, before any post-processing; a component name used by
    two backends is prefixed with the backend's name), and so are their metrics; the sum itself is
    reported as ``reward/<name>``. Backend names must be unique: set ``name`` on backends of the same
    class.

    Example (YAML)::

        reward:
          class_path: rlhf_lit.rewards.Composite
          init_args:
            backends:
              - class_path: rlhf_lit.rewards.Detoxify
                init_args: {scale: -1.0}
              - class_path: rlhf_lit.rewards.LengthPenalty
            weights: [1.0, -0.01]

    Args:
        backends: The reward backends to combine (each given by ``class_path``/``init_args``).
        weights: One weight per backend; None weighs each by 1.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` (default ``total``) names the weighted sum's ``reward/<name>``; ``scale`` etc. apply to the weighted sum.
    """

    default_name = "total"

    def __init__(
        self,
        backends: list[RewardBackend],
        weights: Optional[list[float]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        backends = list(backends)
        if not backends:
            raise ValueError("Composite: 'backends' must list at least one reward backend")
        for i, b in enumerate(backends):
            if not isinstance(b, RewardBackend):
                raise TypeError(f"Composite: backends[{i}] must be a RewardBackend, got {type(b).__name__}")
        weights = [1.0] * len(backends) if weights is None else [float(w) for w in weights]
        if len(weights) != len(backends):
            raise ValueError(f"Composite: got {len(weights)} weights for {len(backends)} backends")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"Composite: weights must be finite, got {weights}")
        names = [b.name for b in backends]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Composite: backend names must be unique, {dup} repeats; set 'name' on those backends")
        if self.name in names:
            raise ValueError(f"Composite: its name {self.name!r} is also a backend's name; choose another")
        self.backends = backends
        self.weights = weights

    def setup(self, device) -> None:
        super().setup(device)
        for b in self.backends:
            b.setup(device)

    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        n = len(responses)
        total = torch.zeros(n, dtype=torch.float32)
        valid = torch.ones(n, dtype=torch.bool)
        components: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        outs = [(b, w, b(prompts, responses)) for b, w in zip(self.backends, self.weights)]
        comp_count: dict[str, int] = {}
        met_count: dict[str, int] = {}
        for _, _, out in outs:
            for k in out.components:
                comp_count[k] = comp_count.get(k, 0) + 1
            for k in out.metrics:
                met_count[k] = met_count.get(k, 0) + 1
        for b, w, out in outs:
            total += w * out.scores
            valid &= out.valid
            for k, v in out.components.items():
                components[k if comp_count[k] == 1 else f"{b.name}/{k}"] = v
            for k, v in out.metrics.items():
                metrics[k if met_count[k] == 1 else f"{b.name}/{k}"] = v
        components[self.name] = total.clone()
        return RewardOutput(total, valid, components, metrics)
