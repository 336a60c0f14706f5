"""Reference log-probs of preference pairs, computed once and kept in the run folder.

The DPO reference is frozen, so ``log pi_ref(y_c | x)`` and ``log pi_ref(y_r | x)`` of a pair never
change: one no-grad pass over the training and validation pairs before the first step replaces a
reference forward in every step of every epoch. The table lives in ``<run folder>/reference_logps.pt``
so a resumed run reads it instead of recomputing it. Entries are keyed by a hash of the pair's token
ids (:func:`rlhf_lit.preference_data.pair_key`; content-addressed: a changed data file or tokenizer simply misses), and the file records the
model that computed them (base model, SFT adapter, quantization, ...); a file written for another
model is ignored with a warning and recomputed.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from rlhf_lit.atomic_files import write_bytes_atomic

log = logging.getLogger(__name__)

FILE_NAME = "reference_logps.pt"
VERSION = 1


class ReferenceCache:
    """``key -> (log pi_ref(y_c | x), log pi_ref(y_r | x))`` for the pairs seen so far.

    Args:
        fingerprint: What computed the values (model config); a saved table with another one is not used.
    """

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = {k: (None if v is None else str(v)) for k, v in fingerprint.items()}
        self.table: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, keys: list[str], device: torch.device) -> Optional[tuple[Tensor, Tensor]]:
        """``(B,)`` chosen and rejected reference log-probs (float32) of ``keys``, or None when any is missing."""
        if not all(k in self.table for k in keys):
            return None
        values = torch.tensor([self.table[k] for k in keys], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]

    def fill(self, batches: Iterable[dict[str, Any]], compute: Callable[[dict[str, Any]], tuple[Tensor, Tensor]],
             rank: int = 0, world_size: int = 1) -> int:
        """Compute the missing entries of ``batches`` (pair batches with a ``key`` list) with
        ``compute(batch) -> (chosen, rejected)``; under data parallelism each rank computes every
        ``world_size``-th batch and the tables are merged on all ranks. Returns the entries added."""
        new: dict[str, tuple[float, float]] = {}
        for i, batch in enumerate(batches):
            if i % world_size != rank or all(k in self.table for k in batch["key"]):
                continue
            chosen, rejected = compute(batch)
            new.update(zip(batch["key"], zip(chosen.float().tolist(), rejected.float().tolist())))
        if world_size > 1:
            import torch.distributed as dist

            parts: list = [None] * world_size
            dist.all_gather_object(parts, new)
            new = {k: v for part in parts for k, v in part.items()}
        self.table.update(new)
        return len(new)

    # ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the table atomically (a ``torch.load(weights_only=True)``-safe file)."""
        keys = sorted(self.table)
        values = torch.tensor([self.table[k] for k in keys], dtype=torch.float32).reshape(-1, 2)
        buf = io.BytesIO()
        torch.save({"version": VERSION, "fingerprint": self.fingerprint, "keys": keys, "logps": values}, buf)
        write_bytes_atomic(Path(path), buf.getvalue())

    def load(self, path: str | Path) -> bool:
        """Read a table written by :meth:`save` for this fingerprint; False (and a warning) when the
        file was written for another model or cannot be read."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: recompute rather than fail the run
            log.warning("ignoring %s (%s): the reference log-probs are recomputed", path, e)
            return False
        if state.get("version") != VERSION or state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: it was computed for %s, this run has %s; the reference log-probs are "
                        "recomputed", path, state.get("fingerprint"), self.fingerprint)
            return False
        self.table.update(zip(state["keys"], map(tuple, state["logps"].tolist())))
        return True
