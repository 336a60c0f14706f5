"""The run folder around one command: checked before anything loads, locked while ``fit`` runs,
summarised at the end.

- :func:`check_start`: every folder the run will write (the run folder, the checkpoint folder, the
  adapter's ``model.output_dir``) is writable *now*, not after hours of training; a fresh ``fit``
  refuses a folder that holds checkpoints; ``--ckpt_path last`` refuses a folder whose
  ``last.ckpt`` is gone but whose other checkpoints are not (it would start over); a damaged
  checkpoint is named with the last good one before any model loads, and so is one written by
  another number of data-parallel ranks.
- :class:`RunFolderGuard`: the :class:`~rlhf_lit.run_lock.RunFolderLock` of a ``fit``, released when
  the run ends, fails or is interrupted; a run folder this ``fit`` created and that fails before its
  first step (a missing prompt file, a tokenizer that does not load) is removed again when it holds
  only what the start wrote (the lock, the empty checkpoint folder, TensorBoard's first event file),
  with the parents the start created; in a folder that existed, only the empty event file goes.
- :func:`summary`: where the run folder, adapter, checkpoint and report are, and key figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback

from rlhf_lit.checkpoint_io import (
    DamagedCheckpointError, check_checkpoint, checkpoint_settings, newest_intact_checkpoint, resume_checkpoint,
)
from rlhf_lit.errors import RunStateError
from rlhf_lit.export import check_replaceable
from rlhf_lit.parallel import WORLD_SIZE_SETTING, check_resume_world_size
from rlhf_lit.run_lock import LOCK_NAME, OWNER_NAME, RunFolderLock

log = logging.getLogger(__name__)


def run_folder(trainer) -> Optional[Path]:
    """The trainer's run folder (its logger's folder), or None without a logger."""
    return Path(trainer.log_dir) if trainer.loggers and trainer.log_dir else None


def checkpoint_folders(trainer) -> list[Path]:
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` (and parents) and a file in it, then remove the file.

    Raises:
        RunStateError: naming ``what`` (the option that sets the folder) and the OS error.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rlhf_lit-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunStateError(f"{what} {folder} is not writable ({e.strerror or e}); "
                         f"choose a folder this user can write to") from None


def check_start(trainer, subcommand: str, ckpt_path: Optional[str], output_dir: Optional[str]) -> None:
    """The checks of the module docstring, run by the CLI before the model is built.

    Raises:
        RunStateError: a folder is not writable, a fresh ``fit`` in a folder with checkpoints, or
            ``--ckpt_path last`` with only other checkpoints left.
            Also for a damaged checkpoint to resume from, naming the last good one.
        ConfigError: ``fit`` resuming a checkpoint written by another number of data-parallel ranks.
    """
    folders = checkpoint_folders(trainer)
    if subcommand == "fit":
        run = run_folder(trainer)
        if run is not None:
            check_writable(run, "the run folder (trainer.logger.init_args.save_dir)")
        for folder in folders:
            check_writable(folder, "the checkpoint folder")
        if output_dir:  # the export writes beside its target, then renames it into place
            check_replaceable(output_dir, "model.output_dir")
            check_writable(Path(output_dir).expanduser().resolve().parent, "the folder of model.output_dir")
        if ckpt_path is None:
            for folder in folders:
                found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))
                if found:
                    raise RunStateError(
                        f"{found[0]} exists: this run folder already holds a run. Resume it with "
                        f"'--ckpt_path last', or start a new run in another folder "
                        f"(--trainer.logger.init_args.save_dir=...)."
                    )
    resume_from = None
    if ckpt_path == "last":
        resume_from = resume_checkpoint(folders)  # the one Lightning picks
        if resume_from is not None:
            _check_intact(resume_from)
        else:
            others = [good for good in (newest_intact_checkpoint(f) for f in folders) if good is not None]
            if not others and subcommand == "fit":  # Lightning only warns, with an unrelated hint
                log.warning("--ckpt_path last: no checkpoint in %s: this fit starts a new run",
                            ", ".join(str(f) for f in folders) or "the run folder")
            if others:
                raise RunStateError(
                    f"--ckpt_path last: there is no last.ckpt in {others[0].parent}, but {others[0]} is "
                    f"there; resume from it with --ckpt_path {others[0]} (starting over would discard its run)."
                )
    elif ckpt_path and ckpt_path not in ("best", "hpc") and Path(ckpt_path).is_file():
        resume_from = Path(ckpt_path)
        _check_intact(resume_from)
    if subcommand == "fit" and resume_from is not None:
        saved = checkpoint_settings(resume_from).get(WORLD_SIZE_SETTING)
        check_resume_world_size(saved, trainer.world_size, str(resume_from), trainer.num_nodes, trainer.num_devices)


def _check_intact(path: Path) -> None:
    try:
        check_checkpoint(path)
    except DamagedCheckpointError as e:
        raise RunStateError(str(e)) from None


class RunFolderGuard(Callback):
    """Holds the run folder's lock for one ``fit``; releases it when the fit ends or fails.

    Args:
        folder: the run folder.
        created: the outermost folder this ``fit`` creates for it (the run folder or one of its
            parents; None: the run folder existed). If the fit fails before its first optimizer step,
            the run folder is removed when it holds only what the start wrote
            (:func:`remove_start_leftovers`), and so are the then empty parents up to ``created``.
            In a folder that existed, a TensorBoard event file this start wrote and nothing was
            logged to is removed.
    """

    def __init__(self, folder: Path, created: Optional[Path] = None) -> None:
        self.lock = RunFolderLock(folder, "fit")
        self.folder = Path(folder)
        self.created = created
        self._event_files = set(self.folder.glob("events.out.tfevents.*"))

    def acquire(self) -> None:
        """Raises RunStateError with the lock's message when another process holds it."""
        from rlhf_lit.run_lock import RunFolderBusy

        try:
            self.lock.acquire()
        except RunFolderBusy as e:
            raise RunStateError(str(e)) from None

    def release(self) -> None:
        self.lock.release()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()
        if self.created is not None and trainer.global_step == 0:
            if remove_start_leftovers(self.folder):
                _remove_empty_parents(self.folder, self.created)
            return
        for path in set(self.folder.glob("events.out.tfevents.*")) - self._event_files:
            if not _has_scalars(path):
                path.unlink(missing_ok=True)


def first_missing_folder(folder: Path) -> Optional[Path]:
    """The outermost of ``folder`` and its parents that does not exist yet (None: ``folder`` exists)."""
    folder = Path(folder).absolute()
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _remove_empty_parents(folder: Path, outermost: Path) -> None:
    """Remove the empty parents of the removed ``folder``, up to and including ``outermost``."""
    folder, outermost = Path(folder).absolute(), Path(outermost).absolute()
    if folder == outermost or outermost not in folder.parents:
        return
    parent = folder.parent
    while True:
        try:
            parent.rmdir()  # only an empty folder
        except OSError:
            return
        if parent == outermost:
            return
        parent = parent.parent


#: What the start of a ``fit`` writes into its run folder before the first step.
_START_FILES = (LOCK_NAME, OWNER_NAME, "hparams.yaml")


def remove_start_leftovers(folder: Path) -> bool:
    """Remove ``folder`` if it holds nothing but what a fit's start writes: the lock files, empty
    folders (``checkpoints/``), ``hparams.yaml`` and TensorBoard event files with no scalar in them
    (the 88-byte header TensorBoard writes when the logger starts). Anything else (a checkpoint, a
    metrics line, a user's file) keeps the whole folder.

    Returns:
        Whether the folder was removed.
    """
    import shutil

    if not folder.is_dir():
        return False
    for path in folder.rglob("*"):
        if path.is_dir() or path.name in _START_FILES:
            continue
        if path.name.startswith("events.out.tfevents.") and path.stat().st_size <= 4096 and not _has_scalars(path):
            continue
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def _has_scalars(path: Path) -> bool:
    """Whether a TensorBoard event file holds any summary value (a logged scalar, text, ...)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return any(event.HasField("summary") and event.summary.value for event in EventFileLoader(str(path)).Load())
    except Exception:  # unreadable: keep it
        return True


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _fmt(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.4g}"


def summary(trainer, module, subcommand: str, folder: Optional[Path] = None) -> str:
    """A few lines for the end of ``fit``/``test``/``predict``: the files a user looks for next.
    ``folder``: the run folder, when the caller has it (reading it is a collective under DDP);
    None reads it here."""
    folder = folder if folder is not None else run_folder(trainer)
    lines = []
    if subcommand == "fit":
        rows = _history(folder) if folder else []
        scores = [r.get("objective/scores") for r in rows if isinstance(r.get("objective/scores"), (int, float))]
        done = module.history_done() if hasattr(module, "history_done") else None
        unit = "rollouts" if getattr(module, "history_counter", "rollout") == "rollout" else "optimizer steps"
        head = f"rlhf_lit: fit done: {len(rows) if done is None else done} {unit}"
        held_out = [r[k] for r in rows for k in ("validation/rewards/accuracies", "validation/accuracy")
                    if isinstance(r.get(k), (int, float))]
        if held_out:  # the pair stages' figure of merit
            head += f", held-out accuracy {_fmt(held_out[0])} (first) -> {_fmt(held_out[-1])} (last)"
        if scores:
            head += f", objective/scores {_fmt(scores[0])} (first) -> {_fmt(scores[-1])} (last)"
        if rows and rows[-1].get("objective/kl") is not None:
            head += f", objective/kl {_fmt(rows[-1]['objective/kl'])}"
        lines.append(head)
        adapter = getattr(module, "exported_adapter", None)
        if adapter:
            lines.append(f"  adapter (PEFT LoRA):  {adapter}")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") if trainer.checkpoint_callback else ""
        if ckpt:
            lines.append(f"  last checkpoint:      {ckpt}   (continue: --ckpt_path last)")
    elif subcommand == "test":
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if "test/score_rlhf" in metrics:
            lines.append(f"rlhf_lit: test done: score {_fmt(metrics.get('test/score_rlhf'))} (RLHF adapter) vs "
                         f"{_fmt(metrics.get('test/score_sft'))} (SFT adapter), win rate "
                         f"{_fmt(metrics.get('test/win_rate'))}")
        else:
            lines.append("rlhf_lit: test done")
        if folder and (folder / "report.md").is_file():
            lines.append(f"  report:               {folder / 'report.md'}   (and report.json, test_samples.jsonl)")
    elif subcommand == "predict":
        out = getattr(module, "predictions_path", None)
        lines.append(f"rlhf_lit: predict done: {out}" if out else "rlhf_lit: predict done")
    else:
        lines.append(f"rlhf_lit: {subcommand} done")
    if folder:
        lines.append(f"  run folder:           {folder}   (tensorboard --logdir {folder})")
    return "\n".join(lines)
