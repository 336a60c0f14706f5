"""The reward interface: text in, one scalar per sample out.

Backends see only text — the user's prompt and the policy's decoded response — never token ids
or the policy. That keeps any scorer (a classifier, an HTTP judge, a Python function) pluggable
by ``class_path`` in YAML.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from rlhf_lit.errors import UserError


class RewardValueError(UserError, ValueError):
    """A reward backend returned something other than one real number per sample."""


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
        out = _as_output(raw, responses, self.name, f"reward backend {self.name!r} ({type(self).__name__}.score)")
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


EXPECTED = ("one real number per sample: a list of floats, a (B,) tensor or array, or a RewardOutput "
            "(valid=False marks a sample that could not be scored)")


def _numbers(value, what: str, responses: Sequence[str], who: str, dtype: torch.dtype) -> Tensor:
    """``value`` as a flat tensor of ``dtype``, or an error naming the backend, the first bad sample
    and what was expected."""
    if isinstance(value, Tensor):
        if value.dtype.is_complex or (dtype == torch.float32 and value.dtype == torch.bool and what == "scores"):
            raise RewardValueError(f"{who} returned {what} of dtype {value.dtype}; expected {EXPECTED}")
        return value.detach().to("cpu", dtype).reshape(-1)
    if isinstance(value, (str, bytes, dict)) or value is None or not hasattr(value, "__len__"):
        raise RewardValueError(f"{who} returned {type(value).__name__} {str(value)[:80]!r} as {what}; expected {EXPECTED}")
    items = list(value)
    for i, v in enumerate(items):
        # Python and numpy numbers, and one-element tensors/arrays.
        ok = isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "size", None) in (1, None)
                                             and not isinstance(v, (str, bytes)))
        if isinstance(v, Tensor):
            ok = v.numel() == 1 and not v.dtype.is_complex
        if not ok:
            sample = f" (response {responses[i][:80]!r})" if i < len(responses) else ""
            raise RewardValueError(f"{who} returned {type(v).__name__} {str(v)[:80]!r} as {what}[{i}] for sample {i}"
                                   f"{sample}; expected {EXPECTED}")
    return torch.as_tensor([float(v) for v in items], dtype=dtype).reshape(-1) if dtype != torch.bool else \
        torch.as_tensor([bool(v) for v in items], dtype=torch.bool).reshape(-1)


def _as_output(raw: RawScores, responses: Sequence[str], name: str, who: str) -> RewardOutput:
    """The backend's return value as a checked :class:`RewardOutput` of ``len(responses)`` samples.

    Raises:
        RewardValueError: naming the backend (``who``), the first bad sample and what was expected.
    """
    n = len(responses)
    if isinstance(raw, RewardOutput):
        scores = _numbers(raw.scores, "scores", responses, who, torch.float32)
        valid = _numbers(raw.valid, "valid", responses, who, torch.bool)
        components = {k: _numbers(v, f"components[{k!r}]", responses, who, torch.float32)
                      for k, v in dict(raw.components).items()} or {name: scores.clone()}
        metrics = dict(raw.metrics)
    else:
        scores = _numbers(raw, "scores", responses, who, torch.float32)
        valid = torch.ones(scores.shape, dtype=torch.bool)
        components, metrics = {name: scores.clone()}, {}
    for what, t in [("scores", scores), ("valid", valid), *((f"components[{k!r}]", v) for k, v in components.items())]:
        if t.numel() != n:
            raise RewardValueError(f"{who} returned {t.numel()} {what} for {n} samples; expected {EXPECTED}")
    return RewardOutput(torch.where(valid, scores, 0.0), valid, components, metrics)

