"""What a run writes beside TensorBoard's scalars: ``metrics.jsonl`` (one line per rollout, the
plan's "local JSON") and sample text (TensorBoard text + ``samples.jsonl``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_lit.atomic_files import write_jsonl_atomic
from rlhf_lit.markdown import markdown_cell


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

    def append_metrics(self, rollout: int, metrics: dict[str, float], counter: str = "rollout") -> None:
        """One line of ``metrics.jsonl``: ``{counter: rollout, "step": global_step, **metrics}`` (a stage
        without rollouts names its own counter, e.g. ``train_step``); non-finite values become null."""
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
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
            tb.add_text("samples", table, global_step=rollout)

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
