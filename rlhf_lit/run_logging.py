"""What a run writes beside TensorBoard's scalars: ``metrics.jsonl`` (one line per rollout, the
plan's "local JSON") and sample text (TensorBoard text + ``samples.jsonl``).

History ends where the restored state ends: a run resumed from the checkpoint of rollout N (after
a crash, ``kill -9`` or Ctrl-C at rollout N + k) first cuts ``metrics.jsonl`` and ``samples.jsonl``
back to rollouts 1..N and tells TensorBoard to drop what the lost rollouts logged
(:meth:`RunLog.rewind`), so the replayed rollouts appear once. TensorBoard's step of rollout r is
r - 1 (Lightning's logging step), for the scalars and the sample text alike.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_lit.atomic_files import write_jsonl_atomic, write_text_atomic
from rlhf_lit.markdown import markdown_cell

log = logging.getLogger(__name__)

HISTORY_FILES = ("metrics.jsonl", "samples.jsonl")


class RunLog:
    """Writes into the trainer's log folder, on rank 0 only."""

    def __init__(self, trainer, log_dir: Optional[str] = None) -> None:
        self.trainer = trainer
        if log_dir is None:
            log_dir = run_dir(trainer)
        self.dir: Optional[Path] = Path(log_dir) if log_dir and trainer.is_global_zero else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.dir is None:
            return
        with (self.dir / name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def rewind(self, rollouts: int, counter: str = "rollout") -> None:
        """Cut the history back to its first ``rollouts`` rollouts (0: none), on rank 0; ``counter``
        is the field that counts them (``train_step`` for a stage without rollouts).

        ``metrics.jsonl`` and ``samples.jsonl`` keep their lines with ``rollout <= rollouts`` (a
        torn last line of a killed run is dropped too), rewritten atomically; TensorBoard gets a
        session-restart event at step ``rollouts`` (``SummaryWriter(purge_step=...)``'s event),
        after which its readers discard the earlier events at that step or later."""
        if self.dir is None:
            return
        for name in HISTORY_FILES:
            path = self.dir / name
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [line for line in lines if (n := _count_of(line, counter)) is not None and n <= rollouts]
            if len(keep) != len(lines):
                write_text_atomic(path, "".join(keep))
                log.info("%s: dropped %d lines past %s %d (the run resumes from there)", path,
                         len(lines) - len(keep), counter.replace("_", " "), rollouts)
        tb = tensorboard_writer(self.trainer)
        if tb is not None:
            purge_tensorboard_from(tb, rollouts)

    def append_metrics(self, rollout: int, metrics: dict[str, float], counter: str = "rollout") -> None:
        """One line of ``metrics.jsonl``: ``{counter: rollout, "step": global_step, **metrics}`` (a stage
        without rollouts names its own counter, e.g. ``train_step``); non-finite values become null."""
        # The counter stays the integer given here (a stage may also log it as a float scalar).
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items() if k != counter}
        self._append("metrics.jsonl", {counter: rollout, "step": self.trainer.global_step, **clean})

    def samples(self, rollout: int, prompts: Sequence[str], responses: Sequence[str],
                scores: Sequence[float], n: int) -> None:
        rows = list(zip(prompts, responses, scores))[:n]
        for p, r, s in rows:
            self._append("samples.jsonl", {"rollout": rollout, "prompt": p, "response": r, "score": s})
        tb = tensorboard_writer(self.trainer)
        if tb is not None and self.dir is not None:
            table = "| prompt | response | score |\n|---|---|---|\n" + "\n".join(
                f"| {markdown_cell(p, 300)} | {markdown_cell(r, 300)} | {s:.3f} |" for p, r, s in rows
            )
            tb.add_text("samples", table, global_step=logging_step(self.trainer, rollout - 1))

    def write_test_samples(self, rows: list[dict[str, Any]]) -> None:
        if self.dir is None:
            return
        write_jsonl_atomic(rows, self.dir / "test_samples.jsonl")


def run_dir(trainer) -> Optional[str]:
    """The run folder, or None for a run without a logger (Lightning then reports the working
    directory as ``log_dir``, and nothing should land there). ``trainer.log_dir`` is a broadcast
    under DDP: every rank must call this the same number of times."""
    log_dir = trainer.log_dir
    return log_dir if trainer.loggers else None


def tensorboard_writer(trainer):
    """The ``SummaryWriter`` of the trainer's first ``TensorBoardLogger``, or None when it has none
    (then text, figures and histograms are simply not sent to TensorBoard)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def _count_of(line: str, counter: str) -> Optional[float]:
    """The ``counter`` field of a history line, or None for a line that does not parse."""
    try:
        value = json.loads(line).get(counter)
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def logging_step(trainer, default: int) -> int:
    """The step Lightning logs this batch's scalars at (its count of batches before this one), so
    text and figures sit at the same step as the scalars; ``default`` where the trainer has none."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else default


def purge_tensorboard_from(writer, step: int) -> None:
    """Write a session-restart event at ``step`` to ``writer`` (a ``SummaryWriter``): TensorBoard then
    drops every earlier event at ``step`` or later (what ``SummaryWriter(purge_step=step)`` writes
    when it opens)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    file_writer = writer._get_file_writer() if hasattr(writer, "_get_file_writer") else writer.file_writer
    file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    file_writer.flush()
