"""The reward interface: text in, one scalar per sample out.

Backends see only text — the user's prompt and the policy's decoded response — never token ids
or the policy. That keeps any scorer (a classifier, an HTTP judge, a Python function) pluggable
by ``class_path`` in YAML.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor


class RewardOutput(NamedTuple):
    """What a reward backend returns for a batch of B samples.

    Attributes:
        scores: ``(B,)`` float32, after the backend's scale/shift/clip. Entries where ``valid`` is
            False are 0 and must be ignored.
        valid: ``(B,)`` bool. False marks a sample the backend could not score (for example a
            judge that kept failing under ``on_failure: skip``); the trainer leaves it out of
            the PPO update instead of treating it as a zero reward.
        components: name -> ``(B,)`` raw per-component scores (before post-processing), logged as
            ``reward/<name>``. A single backend reports itself under its ``name``.
        metrics: backend diagnostics for the logger, e.g. ``{"judge/latency_s": 0.4}``.
    """

    scores: Tensor
    valid: Tensor
    components: dict[str, Tensor]
    metrics: dict[str, float]


RawScores = Union[Tensor, Sequence[float], RewardOutput]


class RewardBackend(ABC):
    """Base class of every reward: subclass it and implement :meth:`score`.

    Post-processing shared by all backends: ``reward = clip(scale * raw + shift, clip_min, clip_max)``.

    Args:
        scale: Multiplies the raw score (use -1 to minimise a score instead).
        shift: Added after scaling.
        clip_min: Lower bound after scale and shift; None for no bound.
        clip_max: Upper bound after scale and shift; None for no bound.
        name: Name used for ``reward/<name>`` metrics; defaults to the backend's ``default_name``.
    """

    #: Short name for metrics when ``name`` is not given.
    default_name: str = "reward"

    def __init__(
        self,
        scale: float = 1.0,
        shift: float = 0.0,
        clip_min: Optional[float] = None,
        clip_max: Optional[float] = None,
        name: Optional[str] = None,
    ) -> None:
        if clip_min is not None and clip_max is not None and clip_min > clip_max:
            raise ValueError(f"reward clip_min ({clip_min}) must not exceed clip_max ({clip_max})")
        self.scale = float(scale)
        self.shift = float(shift)
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.name = name or self.default_name
        self.device = torch.device("cpu")

    def setup(self, device: Union[str, torch.device]) -> None:
        """Load heavy resources (models, clients) on ``device``. Called once by the trainer before
        the first rollout; backends that need nothing may keep this default."""
        self.device = torch.device(device)

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str]) -> RawScores:
        """Raw scores for each ``(prompt, response)`` pair: a ``(B,)`` tensor, a list of floats, or a
        :class:`RewardOutput` when some samples can be invalid or there are components."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> RewardOutput:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(
                f"reward backend {self.name!r}: got {len(prompts)} prompts but {len(responses)} responses"
            )
        raw = self.score(prompts, responses)
        out = _as_output(raw, len(responses), self.name)
        bad = out.valid & ~torch.isfinite(out.scores)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"reward backend {self.name!r} returned a non-finite score ({out.scores[i].item()}) for "
                f"sample {i} (response {responses[i][:80]!r}); mark failures as invalid instead"
            )
        return out._replace(scores=torch.where(out.valid, self.postprocess(out.scores), 0.0))

    def postprocess(self, raw: Tensor) -> Tensor:
        """``clip(scale * raw + shift, clip_min, clip_max)``."""
        x = raw * self.scale + self.shift
        if self.clip_min is not None or self.clip_max is not None:
            x = x.clamp(
                min=-math.inf if self.clip_min is None else self.clip_min,
                max=math.inf if self.clip_max is None else self.clip_max,
            )
        return x


def _as_output(raw: RawScores, n: int, name: str) -> RewardOutput:
    if isinstance(raw, RewardOutput):
        scores = torch.as_tensor(raw.scores, dtype=torch.float32).detach().cpu().reshape(-1)
        valid = torch.as_tensor(raw.valid, dtype=torch.bool).cpu().reshape(-1)
        components = dict(raw.components) or {name: scores.clone()}
        metrics = dict(raw.metrics)
    else:
        scores = torch.as_tensor(raw, dtype=torch.float32).detach().cpu().reshape(-1)
        valid = torch.ones(scores.shape, dtype=torch.bool)
        components, metrics = {name: scores.clone()}, {}
    if scores.numel() != n or valid.numel() != n:
        raise ValueError(f"reward backend {name!r} returned {scores.numel()} scores for {n} samples")
    return RewardOutput(torch.where(valid, scores, 0.0), valid, components, metrics)
