"""Rollouts without a single scored sample: no update, no fake score, and a stop when they persist.

A reward backend marks a sample it could not score as invalid (a judge outage under
``on_failure: skip``, a classifier that rejects the text); invalid samples are left out of the
update. When *every* sample of a rollout is invalid there is nothing to learn from: an optimizer
step on zero gradients would still move the weights (Adam's momentum, weight decay), and the mean
of no scores would read 0.0. :class:`UnscoredRollouts` makes such a rollout skip its update, log
``objective/scores`` (and ``objective/rlhf_reward``, ``reward/*``) as NaN with a warning, and stops
the run with an error after ``model.ppo.max_unscored_rollouts`` of them in a row.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

#: The metrics that average scores over scored samples: NaN when there are none.
SCORE_METRICS = ("objective/scores", "objective/rlhf_reward")


class UnscoredRollouts:
    """The streak of consecutive unscored rollouts (kept in checkpoints).

    Args:
        limit: stop after this many in a row (``model.ppo.max_unscored_rollouts``); None never stops.
    """

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.streak = 0

    def check(self, n_scored: int, rollout: int, reward_name: str, metrics: dict[str, float]) -> bool:
        """Whether rollout number ``rollout`` (1-based) has a scored sample (``n_scored`` over all
        ranks). If not: its score metrics become NaN in ``metrics``, a warning names it, the streak grows."""
        if n_scored:
            self.streak = 0
            return True
        self.streak += 1
        for k in metrics:
            if k in SCORE_METRICS or k.startswith("reward/"):
                metrics[k] = math.nan
        stop = "" if self.limit is None else f", the run stops at {self.limit}"
        rank_zero_warn(f"rollout {rollout}: no sample was scored (every reward came back invalid, e.g. "
                       f"{reward_name!r} failed); no update was made ({self.streak} such rollout(s) in a row{stop})")
        return False

    def stop_if_too_many(self, rollout: int, reward_name: str) -> None:
        """Raises RuntimeError once the streak, ending at rollout number ``rollout``, reaches the limit."""
        if self.limit is None or self.streak < self.limit:
            return
        raise RuntimeError(
            f"rollouts {rollout - self.streak + 1}-{rollout}: {self.streak} rollouts in a row without a single scored "
            f"sample (the reward backend {reward_name!r} marked every sample invalid, e.g. a judge outage under "
            f"on_failure: skip). Stopping (model.ppo.max_unscored_rollouts={self.limit}); these rollouts made no "
            f"update, and the last checkpoint holds the state before them."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))
