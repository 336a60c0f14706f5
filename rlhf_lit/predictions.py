"""``predict``: the policy adapter's responses to prompts, as JSONL in the run folder.

``python -m rlhf_lit predict --config <run config> [--ckpt_path last]`` samples one or more
responses (``model.eval_samples_per_prompt``, ``model.eval_sampling``) for every prompt of the
data module's test split (``--data.test_file prompts.jsonl`` for a prompt file of one's own) with the
policy adapter: the trained one from ``--ckpt_path`` (or ``model.policy.policy_adapter``), else
the SFT adapter it starts from. Each row of ``predictions.jsonl``::

    {"id": "...", "sample": 0, "prompt": "...", "response": "...", "score": 0.12, "adapter": "..."}

``score`` is the configured reward's (None where it could not score the response).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rlhf_lit.atomic_files import write_jsonl_atomic
from rlhf_lit.run_logging import run_dir

PREDICTIONS = "predictions.jsonl"


def gather_rows(rows: list) -> list:
    """Every rank's rows, rank by rank (a collective call under data parallelism)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p]


def prediction_rows(ids, prompts, texts, scores, valid, sample: int, adapter: str) -> list[dict[str, Any]]:
    """One row per response (see the module docstring)."""
    return [{"id": i, "sample": sample, "prompt": p, "response": t, "score": float(s) if bool(v) else None,
             "adapter": adapter} for i, p, t, s, v in zip(ids, prompts, texts, scores.tolist(), valid.tolist())]


def write_predictions(trainer, rows: list[dict[str, Any]]) -> Optional[Path]:
    """Gather every rank's rows and write them (rank 0, atomically) to ``<run folder>/predictions.jsonl``;
    returns its path on rank 0 (None elsewhere or without a run folder)."""
    folder = run_dir(trainer)  # a broadcast under DDP: every rank asks
    rows = gather_rows(rows)
    if not trainer.is_global_zero or not folder:
        return None
    path = Path(folder) / PREDICTIONS
    write_jsonl_atomic(sorted(rows, key=lambda r: (str(r["id"]), r["sample"])), path)
    return path
