#!/usr/bin/env python
"""Write the offline demo's synthetic moderator survey and its preference pairs.

    python scripts/build_demo_pairs.py [--survey-out prompts/demo_survey.csv] [--out prompts/demo_pairs.jsonl]

The survey (``rlhf_lit.demo_survey``: threads, comments, three moderators' 1-5 civility ratings)
goes through ``scripts/build_preference_pairs.py`` exactly as a real survey would::

    python scripts/build_preference_pairs.py prompts/demo_survey.csv --out prompts/demo_pairs.jsonl \\
        --context-col thread --text-col comment --rater-col rater --rating-col rating \\
        --margin 1.0 --test-fraction 0.2 --seed 0

``prompts/demo_pairs.jsonl`` is shipped (the demo DPO and reward-model configs read it); the
survey CSV is written only when asked (``--survey-out``), or to a temporary file.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from rlhf_lit.demo_survey import COLUMNS, demo_survey_rows

ROOT = Path(__file__).resolve().parents[1]
PAIR_ARGS = ["--context-col", "thread", "--text-col", "comment", "--rater-col", "rater", "--rating-col", "rating",
             "--margin", "1.0", "--test-fraction", "0.2", "--seed", "0"]


def write_survey(path: Path) -> Path:
    """The demo survey as CSV (header :data:`rlhf_lit.demo_survey.COLUMNS`)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(demo_survey_rows())
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "prompts" / "demo_pairs.jsonl"), help="the pairs JSONL")
    ap.add_argument("--survey-out", default=None, help="also keep the survey CSV here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_preference_pairs  # scripts/ is not a package

    with tempfile.TemporaryDirectory() as tmp:
        survey = write_survey(Path(args.survey_out) if args.survey_out else Path(tmp) / "demo_survey.csv")
        return build_preference_pairs.main([str(survey), "--out", args.out, *PAIR_ARGS])


if __name__ == "__main__":
    sys.exit(main())
