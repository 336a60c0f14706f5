"""Offensive-language probability from alt-profanity-check: small, CPU-only, fully offline."""

from __future__ import annotations

from typing import Any

from .base import RewardBackend


class Profanity(RewardBackend):
    """Probability that the text is offensive, from alt-profanity-check's ``predict_prob``.

    A linear SVM on word features trained on labelled toxic comments, shipped inside the
    ``alt-profanity-check`` wheel: needs no download and no GPU, which makes it the offline default.
    The raw score is in [0, 1] (1 = offensive); use ``scale: -1`` to reward clean text. Being a
    bag-of-words model it scores swear words as offensive whatever the intent, so a policy
    optimised against it learns to avoid words, not harm.

    Args:
        include_prompt: Score ``prompt + "\\n" + response`` instead of the response alone.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``profanity``.
    """

    default_name = "profanity"

    def __init__(
        self,
        include_prompt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.include_prompt = bool(include_prompt)
        self._predict_prob: Any = None

    def _load(self) -> None:
        if self._predict_prob is None:
            try:
                from profanity_check import predict_prob
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "reward backend Profanity needs the 'alt-profanity-check' package "
                    "(pip install alt-profanity-check); importing profanity_check failed: " + str(e)
                ) from e
            self._predict_prob = predict_prob

    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def score(self, prompts: list[str], responses: list[str]):
        self._load()
        if not responses:
            return []
        texts = [p + "\n" + r for p, r in zip(prompts, responses)] if self.include_prompt else responses
        return [float(x) for x in self._predict_prob(texts)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_predict_prob"] = None
        return state
