"""Checkpoint every N PPO rollouts (N optimizer steps of a stage without rollouts: DPO, the reward
model), and where a run stops.

Under manual optimization Lightning's ``global_step`` counts optimizer steps — ``ppo_epochs x
num_minibatches`` per rollout, fewer when the epochs stop early on ``target_approx_kl``, none when
no sample was scored — so ``every_n_train_steps`` would drift. This callback counts rollouts
(training batches) instead, and also saves the rollout a run stops at mid-epoch (``max_rollouts``,
``max_steps``), so that ``--ckpt_path last`` continues from there.

A checkpoint due at a step that a validation follows is written after that validation: it then
holds the validation's results in ``metrics.jsonl`` and the random state the validation left (its
data loader draws a seed from the global generator), and a resumed run neither skips the validation
(Lightning fast-forwards past a validation that follows a checkpoint of the train batch's end) nor
samples from a different random state than a straight run. A run killed during that validation
resumes from the checkpoint before it and repeats the steps in between.

A run folder that was copied or moved (or named by another spelling of its path) resumes from a
checkpoint that records the folder it was written in. Lightning then takes the folder's
``last.ckpt`` for another run's and writes ``last-v1.ckpt`` beside it (its version counter), so
``last.ckpt`` goes stale. The callback owns its folder: resumed from a checkpoint in it, it reads
the recorded file paths as paths in this folder, and keeps writing ``last.ckpt`` and replacing its
own older files exactly as an unmoved resume does. A checkpoint of another folder is left as
Lightning treats it (new files get versioned names; the files already there stay).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import ModelCheckpoint


class RolloutCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_rollouts`` rollouts (and keeps ``last.ckpt``).

    Args:
        every_n_rollouts: Save after every N rollouts (training steps of the DPO and reward-model stages);
            0 saves only at epoch ends.
        filename: Checkpoint file name pattern (``rollout`` is the rollout count).
        save_last: Also keep ``last.ckpt`` (what ``--ckpt_path last`` resumes from).
        auto_insert_metric_name: Prefix metric names in ``filename`` automatically.
        **kwargs: Any ``ModelCheckpoint`` argument (dirpath, filename, save_top_k, ...).
    """

    def __init__(
        self,
        every_n_rollouts: int = 1,
        filename: Optional[str] = "rollout-{rollout:.0f}",
        save_last: Optional[bool] = True,
        auto_insert_metric_name: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(filename=filename, save_last=save_last, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.every_n_rollouts = every_n_rollouts
        self._after_validation = False  # a save due at this step waits for the validation that follows
        self._resume_path: Optional[str] = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Lightning calls this just before load_state_dict, with 'last' resolved to a file.
        self._resume_path = trainer.ckpt_path

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded = state_dict.get("dirpath")
        if recorded and self.dirpath and recorded != self.dirpath and self._resumes_own_folder():
            state_dict = _moved_to(state_dict, recorded, self.dirpath)
        super().load_state_dict(state_dict)

    def _resumes_own_folder(self) -> bool:
        """Whether the checkpoint being resumed lies in this callback's folder (a local one)."""
        path = self._resume_path
        if not path or "://" in str(path) or "://" in str(self.dirpath):
            return False
        return Path(path).resolve().parent == Path(self.dirpath).resolve()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = pl_module.history_done() if hasattr(pl_module, "history_done") else None
        n = batch_idx + 1 if done is None else done
        # A run that stops here (max_rollouts, max_steps, an early stop) keeps a checkpoint of this
        # rollout: saved at the epoch's end instead, it would resume into the next epoch and skip
        # the rest of this one.
        stopping = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        due = self.every_n_rollouts >= 1 and n % self.every_n_rollouts == 0
        # Rollouts count, not optimizer steps: a rollout without a scored sample makes no step.
        if not (due or stopping) or self._should_skip_saving_checkpoint_ignoring_step(trainer):
            return
        if _validation_follows(trainer):
            self._after_validation = True
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._after_validation and not self._should_skip_saving_checkpoint_ignoring_step(trainer):
            self._after_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # A checkpoint taken at an epoch's last batch resumes into an epoch with no batches left and
        # then trains no further; rewrite last.ckpt once the epoch has ended (even at the same
        # step) so '--ckpt_path last' continues with the next epoch.
        # Only when the epoch ran to its last batch: a stop on max_steps mid-epoch keeps the
        # mid-epoch checkpoint, which resumes exactly where it stopped.
        epoch_finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.save_last and epoch_finished and not self._should_skip_saving_checkpoint_ignoring_step(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _should_skip_saving_checkpoint_ignoring_step(self, trainer) -> bool:
        return bool(trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.sanity_checking)



def _moved_to(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``ModelCheckpoint``'s state with the paths of files in folder ``old`` (last, best, k-th best,
    the top-k) turned into the same files in folder ``new``; other paths are kept."""
    old_dir = os.path.normpath(old)

    def move(path: Any) -> Any:
        if isinstance(path, str) and path and os.path.normpath(os.path.dirname(path)) == old_dir:
            return os.path.join(new, os.path.basename(path))
        return path

    moved = {**state, "dirpath": new}
    for key in ("last_model_path", "best_model_path", "kth_best_model_path"):
        if key in state:
            moved[key] = move(state[key])
    if isinstance(state.get("best_k_models"), dict):
        moved["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return moved


def _validation_follows(trainer) -> bool:
    """Whether Lightning runs a validation right after the current training batch (asked at the
    batch's end, as the training loop itself asks just after). False when the loop does not say."""
    loop = trainer.fit_loop.epoch_loop
    check, fetcher = getattr(loop, "_should_check_val_fx", None), getattr(trainer.fit_loop, "_data_fetcher", None)
    if check is None or fetcher is None or not trainer.num_val_batches or not any(trainer.num_val_batches):
        return False
    return bool(check(fetcher))
