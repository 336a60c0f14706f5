"""Reward backends: text in, one scalar per sample out. Pick one in YAML by ``class_path``
(``rlhf_lit.rewards.Detoxify``, ...) with its ``init_args``."""

from .base import RewardBackend, RewardOutput
from .composite import Composite
from .detoxify import Detoxify
from .judge import JudgeError, LLMJudge
from .length import LengthPenalty
from .local_judge import LocalJudge
from .profanity import Profanity
from .reward_model import RewardModel
from .trained_reward_model import TrainedRewardModel

__all__ = [
    "Composite",
    "Detoxify",
    "JudgeError",
    "LLMJudge",
    "LengthPenalty",
    "LocalJudge",
    "Profanity",
    "RewardBackend",
    "RewardModel",
    "RewardOutput",
    "TrainedRewardModel",
]
