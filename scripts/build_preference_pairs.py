#!/usr/bin/env python
"""Turn a (Reddit moderator) comment survey into DPO-ready preference pairs.

The survey's layout is not fixed, so every column name is an option. Two layouts:

* **ratings** (default): one row per (context, comment, rater, rating). Ratings are averaged per
  rater first (a rater who rated a comment twice counts once), then across raters, per
  (context, comment). Within a context every two comments whose mean ratings differ by at least
  ``--margin`` make a pair (``--higher-is-better``, the default, or ``--lower-is-better``);
  smaller differences are ties and are dropped. Without ``--rater-col`` every row is one rater.
* **pairwise** (``--pairwise``): one row per (context, comment A, comment B, choice, rater) with
  choice ``A``/``B``/``tie`` (labels configurable with ``--choice-labels``, case-insensitive).
  Votes are pooled per context and unordered comment pair (raters may have seen A and B swapped),
  one vote per rater (a later vote replaces an earlier one); a comment wins when it has more than
  half of the votes (tie votes count in the total), otherwise the pair is a tie and dropped.

Input is CSV (``.csv``; ``.tsv`` is tab-separated; ``--delimiter`` overrides) or JSONL (``.jsonl``,
``.jsonl.gz``). Rows that cannot be used are rejected with a reason (missing column, empty text,
non-numeric rating, unrecognised choice, ...) and the first few are reported as ``file:line``.
A column named on the command line that the file does not have at all is an error that lists the
columns that exist.

Output: JSONL in TRL's conversational preference format, the prompt in the SFT chat layout::

    {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": context}],
     "chosen": [{"role": "assistant", "content": better}],
     "rejected": [{"role": "assistant", "content": worse}],
     "meta": {"context_id": ..., "split": "train"|"test", "mode": ..., ...}}

``SYSTEM`` is ``rlhf_lit.chat.DEFAULT_SYSTEM_PROMPT`` unless ``--system-prompt`` or
``--system-prompt-file`` says otherwise (an empty system prompt leaves the system message out).
The user message is the context column, or ``--prompt-col`` when the context column is only an id.
Contexts (that yield at least one pair) are split into train/test by a seeded hash
(``--test-fraction``, ``--seed``): every pair of a context is in the same split, so nothing leaks.
``--split-files`` writes ``<out>.train.jsonl``/``<out>.test.jsonl`` instead of one file.

Examples (the shipped demo files are made with exactly these commands)::

    python scripts/build_preference_pairs.py scripts/examples/survey_ratings.csv \\
        --out scripts/examples/pairs_ratings.jsonl --context-col thread --text-col comment \\
        --rater-col rater --rating-col rating --margin 1.0 --test-fraction 0.25 --seed 0
    python scripts/build_preference_pairs.py scripts/examples/survey_pairwise.jsonl --pairwise \\
        --out scripts/examples/pairs_pairwise.jsonl --context-col thread_id --prompt-col thread \\
        --a-col comment_a --b-col comment_b --choice-col choice --rater-col rater \\
        --test-fraction 0.25 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rlhf_lit.atomic_files import write_jsonl_atomic

EPS = 1e-9
MAX_REPORTED_REJECTS = 5


class ColumnError(ValueError):
    """A column named on the command line does not exist in the file."""


def default_system_prompt() -> str:
    """``rlhf_lit.chat.DEFAULT_SYSTEM_PROMPT``, the single source of the default system prompt
    (a standard-library module: no torch import for a CSV conversion)."""
    from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT

    return DEFAULT_SYSTEM_PROMPT


# --------------------------------------------------------------------------------------------
# Configuration and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class PairConfig:
    context_col: str = "context"
    text_col: str = "comment"
    rater_col: str | None = None
    rating_col: str = "rating"
    prompt_col: str | None = None
    pairwise: bool = False
    a_col: str = "comment_a"
    b_col: str = "comment_b"
    choice_col: str = "choice"
    choice_labels: tuple[str, str, str] = ("A", "B", "tie")
    margin: float = 1.0
    higher_is_better: bool = True
    max_pairs_per_context: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    system_prompt: str | None = None  # None: rlhf_lit.chat.DEFAULT_SYSTEM_PROMPT; "": no system message
    fmt: str = "auto"
    delimiter: str | None = None

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"--margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.max_pairs_per_context is not None and self.max_pairs_per_context < 1:
            raise ValueError("--max-pairs-per-context must be >= 1")
        if len(self.choice_labels) != 3 or len({c.strip().casefold() for c in self.choice_labels}) != 3:
            raise ValueError(f"--choice-labels needs three different labels (A, B, tie), got {self.choice_labels}")

    def required_columns(self) -> list[str]:
        cols = [self.context_col]
        cols += [self.a_col, self.b_col, self.choice_col] if self.pairwise else [self.text_col, self.rating_col]
        for extra in (self.rater_col, self.prompt_col):
            if extra:
                cols.append(extra)
        return list(dict.fromkeys(cols))


@dataclass
class PairStats:
    rows_read: int = 0
    rows_used: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first_rejects: list[str] = field(default_factory=list)
    contexts: int = 0
    contexts_with_pairs: int = 0
    candidates: int = 0  # comment pairs compared (ratings) or pairs voted on (pairwise)
    pairs: int = 0
    ties_dropped: int = 0
    pairs_capped: int = 0
    votes_replaced: int = 0
    per_split: dict[str, dict[str, int]] = field(
        default_factory=lambda: {s: {"contexts": 0, "pairs": 0} for s in ("train", "test")}
    )

    def reject(self, where: str, category: str, detail: str) -> None:
        self.rejected[category] = self.rejected.get(category, 0) + 1
        if len(self.first_rejects) < MAX_REPORTED_REJECTS:
            self.first_rejects.append(f"{where}: {detail}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def report(self) -> str:
        n_rej = sum(self.rejected.values())
        lines = [
            f"rows read:            {self.rows_read}",
            f"rows used:            {self.rows_used}",
            f"rows rejected:        {n_rej}" + (
                f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.rejected.items()))})" if n_rej else ""),
        ]
        lines += [f"  {msg}" for msg in self.first_rejects]
        if n_rej > len(self.first_rejects):
            lines.append(f"  ... and {n_rej - len(self.first_rejects)} more")
        lines += [
            f"contexts:             {self.contexts} ({self.contexts_with_pairs} with pairs)",
            f"candidate pairs:      {self.candidates}",
            f"ties dropped:         {self.ties_dropped}",
        ]
        if self.pairs_capped:
            lines.append(f"pairs over the cap:   {self.pairs_capped}")
        if self.votes_replaced:
            lines.append(f"repeat votes replaced: {self.votes_replaced}")
        lines.append(f"pairs:                {self.pairs}")
        for s, d in self.per_split.items():
            lines.append(f"  {s + ':':<6} {d['pairs']} pairs from {d['contexts']} contexts")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".csv", ".tsv"):
        return "csv"
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ValueError(f"{path}: cannot tell the format from the name; pass --format csv or --format jsonl")


def read_rows(path: str | os.PathLike, fmt: str = "auto", delimiter: str | None = None
              ) -> tuple[list[str], list[tuple[int, Any]]]:
    """Return ``(columns, [(line, row_or_error_message), ...])``; a row is a dict.

    For CSV the columns are the header; for JSONL the union of keys over all objects (in order of
    first appearance). Unparseable JSONL lines come back as a string describing the problem.
    """
    path = Path(path)
    kind = _detect_format(path, fmt)
    rows: list[tuple[int, Any]] = []
    if kind == "csv":
        if delimiter is None:
            delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
            prev = reader.line_num
            for row in reader:
                rows.append((prev + 1, row))
                prev = reader.line_num
        return columns, rows
    columns_seen: dict[str, None] = {}
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((line_no, f"invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                rows.append((line_no, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            columns_seen.update(dict.fromkeys(obj))
            rows.append((line_no, obj))
    return list(columns_seen), rows


def check_columns(cfg: PairConfig, columns: Sequence[str], path: str | os.PathLike) -> None:
    missing = [c for c in cfg.required_columns() if c not in columns]
    if missing:
        raise ColumnError(
            f"{path}: column(s) {', '.join(repr(c) for c in missing)} not found; "
            f"available columns: {', '.join(repr(c) for c in columns) or '(none)'}"
        )


class _Reject(Exception):
    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category, self.detail = category, detail


def _get_text(row: dict, col: str, what: str) -> str:
    if col not in row or row[col] is None:
        raise _Reject("missing column", f"no value in column {col!r} (expected {what})")
    v = row[col]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _Reject("not text", f"column {col!r} should hold {what}, got {type(v).__name__}")
    v = str(v).strip()
    if not v:
        raise _Reject("empty text", f"empty value in column {col!r} (expected {what})")
    return v


def _get_rating(row: dict, col: str) -> float:
    if col not in row or row[col] is None:
        raise _Reject("missing column", f"no value in column {col!r} (expected a numeric rating)")
    v = row[col]
    if isinstance(v, bool):
        raise _Reject("non-numeric rating", f"non-numeric rating {v!r} in column {col!r}")
    if isinstance(v, str):
        if not v.strip():
            raise _Reject("non-numeric rating", f"empty rating in column {col!r}")
        try:
            x = float(v.strip())
        except ValueError:
            raise _Reject("non-numeric rating", f"non-numeric rating {v!r} in column {col!r}") from None
    elif isinstance(v, (int, float)):
        x = float(v)
    else:
        raise _Reject("non-numeric rating", f"non-numeric rating {v!r} in column {col!r}")
    if not math.isfinite(x):
        raise _Reject("non-numeric rating", f"non-finite rating {v!r} in column {col!r}")
    return x


# --------------------------------------------------------------------------------------------
# Pair building
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    prompt: str
    # ratings: comment -> rater -> ratings;  pairwise: (x, y) -> rater -> "x" | "y" | "tie"
    items: dict = field(default_factory=dict)


def _collect(rows: list[tuple[int, Any]], cfg: PairConfig, source: str, stats: PairStats) -> dict[str, _Context]:
    contexts: dict[str, _Context] = {}
    labels = {lab.strip().casefold(): out for lab, out in zip(cfg.choice_labels, ("A", "B", "tie"))}
    for idx, (line_no, row) in enumerate(rows):
        stats.rows_read += 1
        where = f"{source}:{line_no}"
        if isinstance(row, str):
            stats.reject(where, "invalid JSON", row)
            continue
        try:
            ctx_key = _get_text(row, cfg.context_col, "the context")
            prompt = _get_text(row, cfg.prompt_col, "the context text") if cfg.prompt_col else ctx_key
            rater = _get_text(row, cfg.rater_col, "a rater id") if cfg.rater_col else f"row{idx}"
            if cfg.pairwise:
                a = _get_text(row, cfg.a_col, "comment A")
                b = _get_text(row, cfg.b_col, "comment B")
                if a == b:
                    raise _Reject("identical comments", "comment A and comment B are the same text")
                raw = row.get(cfg.choice_col)
                if raw is None:
                    raise _Reject("missing column", f"no value in column {cfg.choice_col!r} (expected a choice)")
                choice = labels.get(str(raw).strip().casefold())
                if choice is None:
                    raise _Reject("unrecognised choice",
                                  f"unrecognised choice {raw!r} in column {cfg.choice_col!r} "
                                  f"(expected one of {', '.join(cfg.choice_labels)})")
            else:
                text = _get_text(row, cfg.text_col, "the comment text")
                rating = _get_rating(row, cfg.rating_col)
        except _Reject as r:
            stats.reject(where, r.category, r.detail)
            continue
        stats.rows_used += 1
        ctx = contexts.setdefault(ctx_key, _Context(prompt=prompt))
        if cfg.pairwise:
            x, y = sorted((a, b))
            outcome = "tie" if choice == "tie" else ("x" if (a if choice == "A" else b) == x else "y")
            votes = ctx.items.setdefault((x, y), {})
            if rater in votes:
                stats.votes_replaced += 1
                del votes[rater]  # re-insert so that order follows the latest vote
            votes[rater] = outcome
        else:
            ctx.items.setdefault(text, {}).setdefault(rater, []).append(rating)
    return contexts


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _rating_pairs(ctx: _Context, cfg: PairConfig, stats: PairStats) -> list[dict]:
    scored = []
    for text, by_rater in ctx.items.items():
        scored.append((text, _mean([_mean(r) for r in by_rater.values()]), len(by_rater)))
    out = []
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (ti, mi, ni), (tj, mj, nj) = scored[i], scored[j]
            stats.candidates += 1
            diff = mi - mj
            if abs(diff) <= EPS or abs(diff) + EPS < cfg.margin:
                stats.ties_dropped += 1
                continue
            i_better = (diff > 0) == cfg.higher_is_better
            (cb, sb, nb), (cw, sw, nw) = (scored[i], scored[j]) if i_better else (scored[j], scored[i])
            out.append({
                "chosen": cb, "rejected": cw, "abs_diff": abs(diff),
                "meta": {"chosen_score": round(sb, 6), "rejected_score": round(sw, 6),
                         "score_diff": round(abs(diff), 6), "n_raters_chosen": nb, "n_raters_rejected": nw},
            })
    return out


def _pairwise_pairs(ctx: _Context, cfg: PairConfig, stats: PairStats) -> list[dict]:
    out = []
    for (x, y), votes in ctx.items.items():
        stats.candidates += 1
        n = len(votes)
        vx = sum(v == "x" for v in votes.values())
        vy = sum(v == "y" for v in votes.values())
        vt = n - vx - vy
        if 2 * vx > n:
            chosen, rejected, vc, vr = x, y, vx, vy
        elif 2 * vy > n:
            chosen, rejected, vc, vr = y, x, vy, vx
        else:
            stats.ties_dropped += 1
            continue
        out.append({
            "chosen": chosen, "rejected": rejected, "abs_diff": (vc - vr) / n,
            "meta": {"votes_chosen": vc, "votes_rejected": vr, "votes_tie": vt, "n_raters": n},
        })
    return out


def context_id(ctx_key: str) -> str:
    return hashlib.blake2b(ctx_key.encode("utf-8"), digest_size=6).hexdigest()


def split_contexts(keys: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each context to train/test: order by a seeded hash, the first ``round(n * f)`` are test.

    At least one context goes to test when ``test_fraction > 0`` and there are two or more, and
    at least one stays in train.
    """
    order = sorted(keys, key=lambda k: hashlib.blake2b(f"{seed}:{k}".encode("utf-8"), digest_size=8).digest())
    n = len(order)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    test = set(order[:n_test])
    return {k: ("test" if k in test else "train") for k in keys}


def build_pairs(path: str | os.PathLike, cfg: PairConfig) -> tuple[list[dict], PairStats]:
    """Read the survey at ``path`` and return ``(records, stats)`` (records in TRL's format)."""
    path = Path(path)
    stats = PairStats()
    columns, rows = read_rows(path, cfg.fmt, cfg.delimiter)
    check_columns(cfg, columns, path)
    contexts = _collect(rows, cfg, path.name, stats)
    stats.contexts = len(contexts)
    system = default_system_prompt() if cfg.system_prompt is None else cfg.system_prompt
    maker = _pairwise_pairs if cfg.pairwise else _rating_pairs
    per_context: dict[str, list[dict]] = {}
    for key, ctx in contexts.items():
        pairs = maker(ctx, cfg, stats)
        if cfg.max_pairs_per_context is not None and len(pairs) > cfg.max_pairs_per_context:
            keep = sorted(range(len(pairs)), key=lambda i: -pairs[i]["abs_diff"])[: cfg.max_pairs_per_context]
            stats.pairs_capped += len(pairs) - len(keep)
            pairs = [pairs[i] for i in sorted(keep)]
        if pairs:
            per_context[key] = pairs
    stats.contexts_with_pairs = len(per_context)
    splits = split_contexts(list(per_context), cfg.test_fraction, cfg.seed)
    records = []
    for key, pairs in per_context.items():
        split = splits[key]
        stats.per_split[split]["contexts"] += 1
        stats.per_split[split]["pairs"] += len(pairs)
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": contexts[key].prompt}]
        for p in pairs:
            meta = {"context_id": context_id(key), "split": split,
                    "mode": "pairwise" if cfg.pairwise else "ratings", "source": path.name}
            if cfg.prompt_col:
                meta["context_key"] = key
            meta.update(p["meta"])
            records.append({
                "prompt": [dict(m) for m in prompt],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
                "meta": meta,
            })
    stats.pairs = len(records)
    return records, stats


def split_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {s: out.with_name(f"{stem}.{s}.jsonl") for s in ("train", "test")}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a comment survey (ratings or pairwise choices) into DPO preference pairs (TRL format).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="survey file: .csv/.tsv or .jsonl (optionally gzipped)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--format", dest="fmt", choices=("auto", "csv", "jsonl"), default="auto")
    p.add_argument("--delimiter", default=None, help="CSV delimiter (default ',' or tab for .tsv)")
    p.add_argument("--context-col", default="context", help="column identifying the context/thread (pairs never cross contexts)")
    p.add_argument("--prompt-col", default=None, help="column with the context text for the user message (default: --context-col)")
    p.add_argument("--rater-col", default=None, help="rater id column (default: every row is a different rater)")
    p.add_argument("--text-col", default="comment", help="comment text column (ratings layout)")
    p.add_argument("--rating-col", default="rating", help="numeric rating column (ratings layout)")
    p.add_argument("--margin", type=float, default=1.0, help="minimum |mean rating difference| for a pair; smaller is a tie")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--higher-is-better", dest="higher_is_better", action="store_true", default=True)
    g.add_argument("--lower-is-better", dest="higher_is_better", action="store_false")
    p.add_argument("--max-pairs-per-context", type=int, default=None, help="keep only the most separated pairs of a context")
    p.add_argument("--pairwise", action="store_true", help="pairwise layout: comment A, comment B and a choice column")
    p.add_argument("--a-col", default="comment_a")
    p.add_argument("--b-col", default="comment_b")
    p.add_argument("--choice-col", default="choice")
    p.add_argument("--choice-labels", default="A,B,tie", help="labels meaning A wins, B wins, tie (comma-separated, case-insensitive)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of contexts in the test split")
    p.add_argument("--seed", type=int, default=0)
    s = p.add_mutually_exclusive_group()
    s.add_argument("--system-prompt", default=None, help="system prompt ('' for none; default rlhf_lit.chat.DEFAULT_SYSTEM_PROMPT)")
    s.add_argument("--system-prompt-file", default=None, help="read the system prompt from this file")
    p.add_argument("--split-files", action="store_true", help="write <out>.train.jsonl and <out>.test.jsonl instead of one file")
    return p


def config_from_args(args: argparse.Namespace) -> PairConfig:
    system = args.system_prompt
    if args.system_prompt_file:
        system = Path(args.system_prompt_file).read_text(encoding="utf-8").rstrip("\r\n")
    return PairConfig(
        context_col=args.context_col, text_col=args.text_col, rater_col=args.rater_col or None,
        rating_col=args.rating_col, prompt_col=args.prompt_col or None, pairwise=args.pairwise,
        a_col=args.a_col, b_col=args.b_col, choice_col=args.choice_col,
        choice_labels=tuple(c.strip() for c in args.choice_labels.split(",")),
        margin=args.margin, higher_is_better=args.higher_is_better,
        max_pairs_per_context=args.max_pairs_per_context, test_fraction=args.test_fraction,
        seed=args.seed, system_prompt=system, fmt=args.fmt, delimiter=args.delimiter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not Path(args.input).is_file():
            raise ValueError(f"input file not found: {args.input}")
        records, stats = build_pairs(args.input, cfg)
    except (ValueError, OSError) as exc:  # ColumnError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.split_files:
        for split, path in split_paths(args.out).items():
            write_jsonl_atomic([r for r in records if r["meta"]["split"] == split], path)
        where = ", ".join(str(p) for p in split_paths(args.out).values())
    else:
        write_jsonl_atomic(records, args.out)
        where = args.out
    print(stats.report())
    print(f"wrote {len(records)} pairs to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
