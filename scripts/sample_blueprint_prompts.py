#!/usr/bin/env python
"""Sample thread openers of one BluePrint cluster into a prompt JSONL for PPO rollouts.

Input: one or more local BluePrint exports (``.jsonl``, ``.jsonl.gz`` -- gzip is detected by
content, not name -- or ``.parquet``, which needs ``pip install pyarrow``), one thread a record::

    {"cluster_id": 13, "thread": [{"text": "...", "user_id": "u1", "relative_integer_time": 5,
                                   "actions": {...}}, ...]}

``cluster_id`` is the cluster of the author of the *last* message; the opener is ``thread[0]``.

Output (default ``prompts/cluster{k}_prompts.jsonl``, relative to the working directory), one
record a line, in input order::

    {"id": "13-<12 hex>", "prompt": "<opener text>", "split": "train"|"val"|"test",
     "meta": {"cluster_id": 13, "source": "<input file name>", "line": <1-based line, or row for
              Parquet>, "thread_len": n, "opener_user_is_cluster_user": bool}}

How it works, in one streaming pass with memory bounded by ``--n`` (plus one 8-byte hash per
distinct eligible opener when de-duplicating):

* records of other clusters are counted and skipped (but still validated, so a malformed file
  fails the same way whatever ``--cluster`` is);
* filters, in order: ``--own-cluster-only`` (``thread[0].user_id == thread[-1].user_id``), empty
  opener, ``--min/--max-words``, ``--min/--max-chars``, then de-duplication on normalised text
  (NFKC, case-folded, whitespace collapsed; the first occurrence is kept; ``--no-dedup`` turns it
  off);
* every eligible opener gets its split from a hash of its normalised text (independent of
  ``--seed`` and ``--n``), so a given opener text is always in the same split: splits are
  disjoint even with ``--no-dedup``, and resampling with another seed never moves an evaluation
  prompt into train;
* each split keeps a reservoir (Algorithm R, its own RNG seeded from ``--seed``) of exactly
  ``round(n * fraction)`` openers (train gets the rest), or all eligible ones if there are fewer.

The ``id`` is ``<cluster>-<hash of the thread's (user_id, time, text) triples>``: stable across
JSONL and Parquet exports of the same data (``actions`` are left out of the hash).

Malformed records stop the run with ``file:line: what was expected``; ``--skip-bad`` counts and
skips them instead. The output is written to a temporary file and renamed into place.

Example (the shipped demo)::

    python scripts/sample_blueprint_prompts.py scripts/examples/blueprint_sample.jsonl \\
        --cluster 13 --n 10 --own-cluster-only --min-words 4 --val-fraction 0.2 \\
        --test-fraction 0.2 --seed 0 --out scripts/examples/cluster13_prompts.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlhf_lit.atomic_files import write_jsonl_atomic

SPLITS = ("train", "val", "test")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_WS = re.compile(r"\s+")


class MalformedRecord(ValueError):
    """A record that does not have BluePrint's shape (message names file, line and expectation)."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _is_parquet(path: Path, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "parquet"
    return path.suffix.lower() in (".parquet", ".pq")


def _open_text(path: Path) -> io.TextIOBase:
    """Open a JSONL file as text, transparently gunzipping it (detected by magic bytes)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_raw_records(path: str | os.PathLike, fmt: str = "auto") -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record_or_error)`` for every non-blank line (JSONL) or row (Parquet).

    A line that is not valid JSON yields a :class:`MalformedRecord` instead of a record, so the
    caller decides whether to raise or skip. Line numbers are 1-based.
    """
    path = Path(path)
    if _is_parquet(path, fmt):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SystemExit(
                f"{path}: reading Parquet needs pyarrow, which is not installed; "
                "run `pip install pyarrow` (or convert the export to JSONL)"
            ) from exc
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["cluster_id", "thread"]):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
        return
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, MalformedRecord(
                    f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line"
                )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_record(rec: Any, where: str) -> None:
    """Raise :class:`MalformedRecord` unless ``rec`` has the fields the sampler uses."""
    if isinstance(rec, MalformedRecord):
        raise rec
    if not isinstance(rec, dict):
        raise MalformedRecord(f"{where}: expected a JSON object with 'cluster_id' and 'thread', got {type(rec).__name__}")
    if "cluster_id" not in rec:
        raise MalformedRecord(f"{where}: missing 'cluster_id' (expected an integer)")
    if not _is_int(rec["cluster_id"]):
        raise MalformedRecord(f"{where}: 'cluster_id' must be an integer, got {rec['cluster_id']!r}")
    thread = rec.get("thread")
    if not isinstance(thread, list) or not thread:
        raise MalformedRecord(f"{where}: 'thread' must be a non-empty list of messages, got {thread!r:.80}")
    for pos, msg in ((0, thread[0]), (len(thread) - 1, thread[-1])):
        if not isinstance(msg, dict):
            raise MalformedRecord(f"{where}: thread[{pos}] must be an object with 'text' and 'user_id', got {msg!r:.80}")
        uid = msg.get("user_id")
        if not (isinstance(uid, str) or _is_int(uid)):
            raise MalformedRecord(f"{where}: thread[{pos}].user_id must be a string, got {uid!r}")
    if not isinstance(thread[0].get("text"), str):
        raise MalformedRecord(f"{where}: thread[0].text must be a string, got {thread[0].get('text')!r:.80}")


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    """Key for de-duplication: NFKC, zero-width characters removed, case-folded, whitespace collapsed."""
    text = _ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))
    return _WS.sub(" ", text).strip().casefold()


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")


def thread_hash(thread: list[dict]) -> str:
    """12 hex characters identifying a thread by its messages' (user_id, time, text)."""
    key = json.dumps(
        [[str(m.get("user_id")), m.get("relative_integer_time"), m.get("text")] if isinstance(m, dict) else None for m in thread],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.blake2b(key.encode("utf-8"), digest_size=6).hexdigest()


def assign_split(norm_text: str, val_fraction: float, test_fraction: float) -> str:
    """Split of an opener from a hash of its normalised text (deterministic, seed-independent)."""
    u = _hash64("split:" + norm_text) / 2.0**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    cluster: int
    n: int
    own_cluster_only: bool = False
    min_words: int | None = None
    max_words: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    dedup: bool = True
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    skip_bad: bool = False
    fmt: str = "auto"
    progress: bool = False
    progress_every: int = 100_000

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("--val-fraction + --test-fraction must be < 1 (train would be empty)")
        for lo, hi in (("min_words", "max_words"), ("min_chars", "max_chars")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"--{lo.replace('_', '-')} ({a}) is larger than --{hi.replace('_', '-')} ({b})")


@dataclass
class SampleStats:
    lines_read: int = 0
    bad_records: int = 0
    other_cluster: int = 0
    in_cluster: int = 0
    filtered: dict[str, int] = field(
        default_factory=lambda: {
            "not_own_cluster": 0,
            "empty": 0,
            "too_few_words": 0,
            "too_many_words": 0,
            "too_few_chars": 0,
            "too_many_chars": 0,
        }
    )
    duplicates: int = 0
    eligible: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    requested: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    first_bad: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def report(self) -> str:
        lines = [
            f"records read:          {self.lines_read}",
            f"malformed (skipped):   {self.bad_records}",
            f"other clusters:        {self.other_cluster}",
            f"in cluster:            {self.in_cluster}",
        ]
        lines += [f"  filtered {k + ':':<17}{v}" for k, v in self.filtered.items()]
        lines.append(f"  duplicates:          {self.duplicates}")
        lines.append(f"eligible:              {sum(self.eligible.values())} "
                     f"({', '.join(f'{s} {self.eligible[s]}' for s in SPLITS)})")
        lines.append(f"kept:                  {sum(self.kept.values())} "
                     f"({', '.join(f'{s} {self.kept[s]}' for s in SPLITS)})")
        for s in SPLITS:
            if self.kept[s] < self.requested[s]:
                lines.append(f"warning: {s} has {self.kept[s]} of the {self.requested[s]} requested "
                             "(not enough eligible openers)")
        for msg in self.first_bad:
            lines.append(f"  skipped: {msg}")
        return "\n".join(lines)


class _Progress:
    """tqdm on stderr when available, else a plain counter every ``every`` records."""

    def __init__(self, enabled: bool, every: int) -> None:
        self.enabled, self.every, self.n, self._pending = enabled, max(1, every), 0, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(unit=" records", file=sys.stderr, mininterval=0.5)
            except ImportError:
                pass

    def tick(self) -> None:
        if not self.enabled:
            return
        self.n += 1
        self._pending += 1
        if self._pending >= (1000 if self._bar is not None else self.every):
            if self._bar is not None:
                self._bar.update(self._pending)
            else:
                print(f"... {self.n} records read", file=sys.stderr, flush=True)
            self._pending = 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._pending)
            self._bar.close()


def _length_filter(text: str, cfg: SampleConfig) -> str | None:
    if cfg.min_words is not None or cfg.max_words is not None:
        words = len(text.split())
        if cfg.min_words is not None and words < cfg.min_words:
            return "too_few_words"
        if cfg.max_words is not None and words > cfg.max_words:
            return "too_many_words"
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "too_few_chars"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_many_chars"
    return None


def sample_prompts(inputs: Sequence[str | os.PathLike], cfg: SampleConfig) -> tuple[list[dict], SampleStats]:
    """Stream the inputs once and return ``(records, stats)``; records are in input order."""
    stats = SampleStats()
    stats.requested = split_sizes(cfg.n, cfg.val_fraction, cfg.test_fraction)
    reservoirs: dict[str, list[tuple[int, int, dict]]] = {s: [] for s in SPLITS}
    rngs = {s: random.Random(f"{cfg.seed}:{s}") for s in SPLITS}
    seen: set[int] = set()
    progress = _Progress(cfg.progress, cfg.progress_every)
    try:
        for file_idx, path in enumerate(inputs):
            path = Path(path)
            for line_no, rec in iter_raw_records(path, cfg.fmt):
                stats.lines_read += 1
                progress.tick()
                try:
                    validate_record(rec, f"{path}:{line_no}")
                except MalformedRecord as exc:
                    if not cfg.skip_bad:
                        raise
                    stats.bad_records += 1
                    if len(stats.first_bad) < 5:
                        stats.first_bad.append(str(exc))
                    continue
                if rec["cluster_id"] != cfg.cluster:
                    stats.other_cluster += 1
                    continue
                stats.in_cluster += 1
                thread = rec["thread"]
                own = str(thread[0]["user_id"]) == str(thread[-1]["user_id"])
                if cfg.own_cluster_only and not own:
                    stats.filtered["not_own_cluster"] += 1
                    continue
                text = thread[0]["text"].strip()
                if not text:
                    stats.filtered["empty"] += 1
                    continue
                reason = _length_filter(text, cfg)
                if reason:
                    stats.filtered[reason] += 1
                    continue
                norm = normalise_text(text)
                if cfg.dedup:
                    h = _hash64(norm)
                    if h in seen:
                        stats.duplicates += 1
                        continue
                    seen.add(h)
                split = assign_split(norm, cfg.val_fraction, cfg.test_fraction)
                stats.eligible[split] += 1
                cap = stats.requested[split]
                if cap == 0:
                    continue
                item = (
                    file_idx,
                    line_no,
                    {
                        "id": f"{cfg.cluster}-{thread_hash(thread)}",
                        "prompt": text,
                        "split": split,
                        "meta": {
                            "cluster_id": cfg.cluster,
                            "source": path.name,
                            "line": line_no,
                            "thread_len": len(thread),
                            "opener_user_is_cluster_user": own,
                        },
                    },
                )
                res, count = reservoirs[split], stats.eligible[split]
                if len(res) < cap:
                    res.append(item)
                else:
                    j = rngs[split].randrange(count)
                    if j < cap:
                        res[j] = item
    finally:
        progress.close()
    items = sorted((it for s in SPLITS for it in reservoirs[s]), key=lambda it: (it[0], it[1]))
    records = [it[2] for it in items]
    # Identical thread records (possible with --no-dedup) would share an id: number the repeats.
    counts: dict[str, int] = {}
    for r in records:
        c = counts[r["id"]] = counts.get(r["id"], 0) + 1
        if c > 1:
            r["id"] = f"{r['id']}-{c}"
    for s in SPLITS:
        stats.kept[s] = len(reservoirs[s])
    return records, stats


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sample BluePrint thread openers of one cluster into a prompt JSONL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="BluePrint export(s): .jsonl, .jsonl.gz or .parquet")
    p.add_argument("--cluster", type=int, required=True, help="cluster id k to sample")
    p.add_argument("--n", type=int, default=1000, help="number of openers to keep (all splits)")
    p.add_argument("--out", default=None, help="output JSONL (default prompts/cluster{k}_prompts.jsonl)")
    p.add_argument("--own-cluster-only", action="store_true",
                   help="keep threads whose opener was written by the cluster's user (thread[0].user_id == thread[-1].user_id)")
    p.add_argument("--min-words", type=int, default=None)
    p.add_argument("--max-words", type=int, default=None)
    p.add_argument("--min-chars", type=int, default=None)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep duplicate openers (normalised text)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reservoir sampling")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of stopping")
    p.add_argument("--format", dest="fmt", choices=("auto", "jsonl", "parquet"), default="auto",
                   help="input format (auto: .parquet/.pq is Parquet, anything else JSONL, gzip detected)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress on stderr")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress (default when stderr is not a terminal)")
    p.add_argument("--progress-every", type=int, default=100_000, help="records between counter lines without tqdm")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        cfg = SampleConfig(
            cluster=args.cluster, n=args.n, own_cluster_only=args.own_cluster_only,
            min_words=args.min_words, max_words=args.max_words, min_chars=args.min_chars,
            max_chars=args.max_chars, dedup=args.dedup, seed=args.seed,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            skip_bad=args.skip_bad, fmt=args.fmt, progress=progress, progress_every=args.progress_every,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in args.inputs:
        if not Path(path).is_file():
            print(f"error: input file not found: {path}", file=sys.stderr)
            return 2
    try:
        records, stats = sample_prompts(args.inputs, cfg)
    except MalformedRecord as exc:
        print(f"error: malformed record: {exc}\n(use --skip-bad to count and skip such records)", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path("prompts") / f"cluster{args.cluster}_prompts.jsonl"
    write_jsonl_atomic(records, out)
    print(stats.report())
    print(f"wrote {len(records)} prompts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
