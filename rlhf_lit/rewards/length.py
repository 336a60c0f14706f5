"""Response length as a reward term (to penalise or encourage length inside a :class:`Composite`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from .base import RewardBackend


class LengthPenalty(RewardBackend):
    """The length of the response: words, characters or tokens.

    The raw score is the (positive) length; make it a penalty with a negative weight in a
    :class:`~rlhf_lit.rewards.Composite` (e.g. toxicity weight 1, length weight -0.01) or with
    ``scale: -0.01``. Useful against the usual drift of PPO towards longer (or empty) outputs.

    Args:
        unit: ``words`` (whitespace-separated), ``chars``, or ``tokens`` of ``tokenizer``.
        tokenizer: Tokenizer folder (or Hub id) for ``unit: tokens``; loaded at first use.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``length``; use a negative ``scale`` for a penalty.
    """

    default_name = "length"

    def __init__(
        self,
        unit: Literal["words", "chars", "tokens"] = "words",
        tokenizer: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if unit not in ("words", "chars", "tokens"):
            raise ValueError(f"LengthPenalty: unit must be 'words', 'chars' or 'tokens', got {unit!r}")
        if unit == "tokens" and not tokenizer:
            raise ValueError("LengthPenalty: unit 'tokens' needs the option 'tokenizer' (a tokenizer folder or Hub id)")
        self.unit = unit
        self.tokenizer = tokenizer
        self._tok: Any = None

    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def _load(self) -> None:
        if self.unit == "tokens" and self._tok is None:
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.tokenizer)
            except Exception as e:
                raise OSError(f"LengthPenalty: could not load tokenizer {self.tokenizer!r}: {e}") from e

    def score(self, prompts: list[str], responses: list[str]):
        if self.unit == "words":
            return [float(len(r.split())) for r in responses]
        if self.unit == "chars":
            return [float(len(r)) for r in responses]
        self._load()
        if not responses:
            return []
        ids = self._tok(list(responses), add_special_tokens=False)["input_ids"]
        return [float(len(x)) for x in ids]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tok"] = None
        return state
