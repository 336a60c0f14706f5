"""``max_rollouts``: stop ``fit`` after N rollouts (PPO iterations), counting a resumed run's.

Lightning's ``trainer.max_steps`` counts optimizer steps, and a PPO rollout makes ``ppo_epochs x
num_minibatches`` of them (fewer when ``target_approx_kl`` stops its epochs early, none when no
sample was scored), so ``max_steps`` cannot say "N rollouts". :class:`MaxRollouts` counts the
stage's rollouts (``rollouts_done``; a stage without one: training batches) and asks the trainer
to stop once N are done; the CLI adds it for ``--max_rollouts N``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lit.errors import ConfigError


class MaxRollouts(Callback):
    """Stop ``fit`` once ``max_rollouts`` rollouts are done (see the module docstring).

    Args:
        max_rollouts: Rollouts in total, including those of the run a resume continues.

    Raises:
        ValueError: ``max_rollouts < 1``.
    """

    def __init__(self, max_rollouts: int) -> None:
        if max_rollouts < 1:
            raise ConfigError(f"--max_rollouts {max_rollouts}: expected an integer >= 1 (or leave it out)")
        self.max_rollouts = max_rollouts

    def _done(self, trainer, pl_module) -> int:
        n = getattr(pl_module, "rollouts_done", None)
        return int(n) if n is not None else int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._done(trainer, pl_module) >= self.max_rollouts:
            rank_zero_info(f"rlhf_lit: max_rollouts={self.max_rollouts} already reached: nothing to train")
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._done(trainer, pl_module) >= self.max_rollouts:
            if not trainer.should_stop:
                rank_zero_info(f"rlhf_lit: stopping after {self.max_rollouts} rollouts (max_rollouts)")
            trainer.should_stop = True
