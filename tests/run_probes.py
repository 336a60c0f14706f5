"""Callbacks and reward backends the run-state tests put into a real run through the command line."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import Callback

from rlhf_lit.rewards.base import RewardBackend, RewardOutput


class CrashAtRollout(Callback):
    """Raises once rollout ``rollout`` is done and logged, as the next one starts: a run that dies
    between two checkpoints (as under ``kill -9`` or Ctrl-C)."""

    def __init__(self, rollout: int = 3):
        self.rollout = rollout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.rollouts_done == self.rollout:
            raise RuntimeError(f"simulated crash after rollout {self.rollout}")


#: Trained weights after each rollout of the last run with a RecordWeights callback.
SNAPSHOTS: list = []


class RecordWeights(Callback):
    """Keeps a copy of the trained weights after every rollout (in ``SNAPSHOTS``)."""

    def on_train_start(self, trainer, pl_module):
        SNAPSHOTS.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        SNAPSHOTS.append({k: v.detach().clone() for k, v in pl_module.model.trainable_named_parameters()})


def _text_scores(responses):
    return torch.tensor([((len(r) * 7) % 11) / 11.0 - 0.5 for r in responses])


class ScoredRollouts(RewardBackend):
    """Scores the samples of the first ``scored_calls`` calls; afterwards every sample is invalid
    (a judge outage under ``on_failure: skip``)."""

    default_name = "outage"

    def __init__(self, scored_calls: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.scored_calls, self.calls = scored_calls, 0

    def score(self, prompts, responses):
        self.calls += 1
        valid = torch.full((len(responses),), self.calls <= self.scored_calls)
        return RewardOutput(_text_scores(responses), valid, {}, {})


class FirstSampleOnly(RewardBackend):
    """Scores only the first sample of each batch; the others are invalid."""

    default_name = "first_only"

    def score(self, prompts, responses):
        valid = torch.zeros(len(responses), dtype=torch.bool)
        valid[0] = True
        return RewardOutput(_text_scores(responses), valid, {}, {})


class HangingReward(RewardBackend):
    """Waits on a worker thread that never finishes (a request pool whose calls hang), after writing
    ``marker`` so the test knows the run is inside the reward."""

    default_name = "hang"

    def __init__(self, marker: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker
        self.pool = ThreadPoolExecutor(max_workers=1)

    def score(self, prompts, responses):
        future = self.pool.submit(time.sleep, 3600)
        if self.marker:
            Path(self.marker).write_text("scoring")
        future.result()
        return [0.0] * len(responses)
