"""What the stages trained on preference pairs share (DPO, the reward model).

One training step is one optimizer step over a batch of ``data.batch_size`` pairs: the stage's
:meth:`PairTraining.pair_update` runs it (through the shared :class:`UpdateStep`), and this mixin
counts the steps (``steps_done``, kept in checkpoints; :class:`~rlhf_lit.checkpointing.RolloutCheckpoint`
counts them too), logs them to TensorBoard and ``metrics.jsonl`` (``train_step``, then the figures;
validation lines get the same counter), checks the micro-batch size against the batch, and exports
every ``export_every_n_steps``.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lit.parallel import mean_over_ranks
from rlhf_lit.stages.update_step import check_micro_batch_size


class PairTraining:
    """Mixin for a LightningModule stage (put it before the stage base class).

    The stage sets ``update_step`` (an :class:`UpdateStep`), ``steps_done = 0``,
    ``export_every_n_steps`` and :attr:`micro_batch_option`, and implements :meth:`pair_update`.
    """

    #: The config key of the stage's micro-batch size, for error messages.
    micro_batch_option = "micro_batch_size"
    #: Pair stages count optimizer steps, not rollouts.
    history_counter = "train_step"

    def history_done(self) -> int:
        return int(self.steps_done)

    def pair_update(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step over the pair batch; returns this rank's figures (batch means)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        # The batch is the data module's (fit, validate and test all size no-grad forwards from it).
        size = getattr(self.trainer.datamodule, "batch_size", None)
        if size is not None:
            check_micro_batch_size(self.update_step.micro_batch_size, size, "= data.batch_size",
                                   self.micro_batch_option)
            self.update_step.minibatch_size = size

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self._clock()
        metrics = self.pair_update(batch)
        self.steps_done += 1
        B = len(batch["key"])
        metrics |= {"lr": self.optimizers().param_groups[0]["lr"], "time/step_s": self._clock() - t0,
                    "pairs": float(self.steps_done * B * self.trainer.world_size)}
        if self.device.type == "cuda":
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics = mean_over_ranks(metrics)  # one collective for all scalars; metrics.jsonl gets the means too
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=B)
        self._run_log.append_metrics(self.steps_done, metrics, counter=self.history_counter)
        if self.export_every_n_steps and self.steps_done % self.export_every_n_steps == 0:
            self.export_adapter()

    def step_lr_scheduler(self) -> None:
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()

    def length_scale(self, batch: dict[str, Any]) -> float:
        """From this batch's sequence length to the longest the data module lets through
        (``micro_batch_size: auto`` measures one pair of this batch)."""
        dm = self.trainer.datamodule
        P, R = batch["input_ids"].shape[1], batch["chosen_ids"].shape[1]
        longest = getattr(dm, "max_prompt_tokens", P) + getattr(dm, "max_response_tokens", R)
        return max(longest / (P + R), 1.0)

    def stage_state(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state.get("steps_done", 0))
