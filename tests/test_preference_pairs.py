"""Tests for scripts/build_preference_pairs.py (loaded from its path: scripts/ is not a package)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_preference_pairs.py"
EXAMPLES = ROOT / "scripts" / "examples"


def _load_script(path: Path):
    name = f"_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


bpp = _load_script(SCRIPT)
SYS = "You are a test persona."


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def ratings_cfg(**kw):
    base = dict(context_col="ctx", text_col="text", rater_col="rater", rating_col="score",
                test_fraction=0.0, system_prompt=SYS)
    base.update(kw)
    return bpp.PairConfig(**base)


def pairs_of(records):
    return {(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records}


@pytest.fixture
def ratings_file(tmp_path):
    # means: x = mean(r1: (5+3)/2 = 4, r2: 5) = 4.5 (per rater first, not 13/3); y = 3.5; z = 2.0
    # w = 11/3 and v = 8/3 differ by exactly 1.0 up to floating point
    rows = [
        ("c1", "x", "r1", "5"), ("c1", "x", "r1", "3"), ("c1", "x", "r2", "5"),
        ("c1", "y", "r1", "3"), ("c1", "y", "r2", "4"),
        ("c1", "z", "r1", "2"),
        ("c2", "w", "r1", "4"), ("c2", "w", "r2", "4"), ("c2", "w", "r3", "3"),
        ("c2", "v", "r1", "3"), ("c2", "v", "r2", "3"), ("c2", "v", "r3", "2"),
        ("c3", "same", "r1", "3"), ("c3", "also same", "r1", "3"),
    ]
    return write_csv(tmp_path / "survey.csv", ["ctx", "text", "rater", "score"], rows)


def test_ratings_margin_and_ties(ratings_file):
    recs, st = bpp.build_pairs(ratings_file, ratings_cfg(margin=1.0))
    assert pairs_of(recs) == {("x", "y"), ("x", "z"), ("y", "z"), ("w", "v")}
    assert st.ties_dropped == 1 and st.candidates == 5 and st.pairs == 4
    xy = next(r for r in recs if r["chosen"][0]["content"] == "x" and r["rejected"][0]["content"] == "y")
    assert xy["meta"]["chosen_score"] == 4.5 and xy["meta"]["rejected_score"] == 3.5
    assert xy["meta"]["n_raters_chosen"] == 2

    recs, st = bpp.build_pairs(ratings_file, ratings_cfg(margin=1.5))
    assert pairs_of(recs) == {("x", "z"), ("y", "z")}  # 1.5 exactly is kept, 1.0 is a tie
    assert st.ties_dropped == 3

    recs, _ = bpp.build_pairs(ratings_file, ratings_cfg(margin=1.0, higher_is_better=False))
    assert pairs_of(recs) == {("y", "x"), ("z", "x"), ("z", "y"), ("v", "w")}

    recs, st = bpp.build_pairs(ratings_file, ratings_cfg(margin=0.0))
    assert st.ties_dropped == 1  # equal means are always ties

    recs, st = bpp.build_pairs(ratings_file, ratings_cfg(margin=1.0, max_pairs_per_context=1))
    assert pairs_of(recs) == {("x", "z"), ("w", "v")} and st.pairs_capped == 2


def test_trl_conversational_format(ratings_file, tmp_path):
    recs, _ = bpp.build_pairs(ratings_file, ratings_cfg())
    r = recs[0]
    assert set(r) == {"prompt", "chosen", "rejected", "meta"}
    assert r["prompt"] == [{"role": "system", "content": SYS}, {"role": "user", "content": "c1"}]
    assert r["chosen"][0]["role"] == "assistant" and r["rejected"][0]["role"] == "assistant"
    recs, _ = bpp.build_pairs(ratings_file, ratings_cfg(system_prompt=""))
    assert recs[0]["prompt"] == [{"role": "user", "content": "c1"}]
    recs, _ = bpp.build_pairs(ratings_file, ratings_cfg(system_prompt=None))
    assert recs[0]["prompt"][0]["content"] == bpp.default_system_prompt()
    spf = tmp_path / "sys.txt"
    spf.write_text("From a file.\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert bpp.main([str(ratings_file), "--out", str(out), "--context-col", "ctx", "--text-col", "text",
                     "--rating-col", "score", "--system-prompt-file", str(spf)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["prompt"][0]["content"] == "From a file."


def test_default_system_prompt_is_rlhf_lit_data():
    # rlhf_lit.chat is standard-library only: no torch import for a CSV conversion
    value = bpp.default_system_prompt()
    assert isinstance(value, str) and value.startswith("You are a user on a social media platform")
    mod = sys.modules.get("rlhf_lit.data")  # loaded when the whole suite runs: compare for real
    if mod is not None:
        assert value == mod.DEFAULT_SYSTEM_PROMPT


def test_rejected_rows_are_reported(tmp_path):
    f = write_csv(tmp_path / "s.csv", ["ctx", "text", "rater", "score"], [
        ("c1", "a", "r1", "5"),
        ("c1", "b", "r1", "n/a"),
        ("c1", " ", "r1", "3"),
        ("c1", "c", "r1", ""),
        ("c1", "d"),              # short row: missing columns
        ("", "e", "r1", "2"),
        ("c1", "f", "r1", "nan"),
        ("c1", "g", "r1", "1"),
    ])
    recs, st = bpp.build_pairs(f, ratings_cfg())
    assert st.rows_read == 8 and st.rows_used == 2
    assert st.rejected == {"non-numeric rating": 3, "empty text": 2, "missing column": 1}
    assert st.first_rejects[0] == "s.csv:3: non-numeric rating 'n/a' in column 'score'"
    assert st.first_rejects[1].startswith("s.csv:4: empty value in column 'text'")
    assert len(st.first_rejects) == bpp.MAX_REPORTED_REJECTS and "... and 1 more" in st.report()
    assert pairs_of(recs) == {("a", "g")}


def test_missing_column_lists_available(ratings_file, tmp_path):
    with pytest.raises(bpp.ColumnError) as ei:
        bpp.build_pairs(ratings_file, ratings_cfg(rating_col="rating"))
    msg = str(ei.value)
    assert "'rating'" in msg and "available columns: 'ctx', 'text', 'rater', 'score'" in msg
    j = write_jsonl(tmp_path / "p.jsonl", [{"ctx": "c", "a": "x", "b": "y", "pick": "A"}])
    with pytest.raises(bpp.ColumnError, match=r"'choice' not found; available columns: 'ctx', 'a', 'b', 'pick'"):
        bpp.build_pairs(j, bpp.PairConfig(pairwise=True, context_col="ctx", a_col="a", b_col="b", system_prompt=SYS))


def test_pairwise_majority(tmp_path):
    def row(ctx, a, b, choice, rater):
        return {"ctx": ctx, "a": a, "b": b, "choice": choice, "rater": rater}

    f = write_jsonl(tmp_path / "pw.jsonl", [
        row("c1", "p", "q", "A", "r1"), row("c1", "q", "p", "B", "r2"), row("c1", "p", "q", "b", "r3"),  # p 2-1
        row("c1", "p", "s", "A", "r1"), row("c1", "p", "s", "B", "r2"),                                   # 1-1 tie
        row("c1", "q", "s", "A", "r1"), row("c1", "q", "s", "tie", "r2"),                                 # 1/2: tie
        row("c2", "m", "n", "A", "r1"), row("c2", "m", "n", "Tie", "r2"), row("c2", "n", "m", "B", "r3"),  # m 2/3
        row("c2", "m", "o", "B", "r1"), row("c2", "m", "o", "A", "r1"),                                   # r1 changed mind: m
        row("c2", "m", "o", "perhaps", "r2"),
        row("c2", "o", "o", "A", "r2"),
        "{not json",
    ])
    c = bpp.PairConfig(pairwise=True, context_col="ctx", a_col="a", b_col="b", rater_col="rater",
                       test_fraction=0.0, system_prompt=SYS)
    recs, st = bpp.build_pairs(f, c)
    assert pairs_of(recs) == {("p", "q"), ("m", "n"), ("m", "o")}
    assert st.ties_dropped == 2 and st.votes_replaced == 1 and st.candidates == 5
    assert st.rejected == {"unrecognised choice": 1, "identical comments": 1, "invalid JSON": 1}
    assert st.first_rejects[2].startswith("pw.jsonl:15: invalid JSON")
    mn = next(r for r in recs if r["chosen"][0]["content"] == "m" and r["rejected"][0]["content"] == "n")
    assert mn["meta"]["votes_chosen"] == 2 and mn["meta"]["votes_tie"] == 1 and mn["meta"]["n_raters"] == 3
    # without a rater column every row is a vote: r1's two votes on (m, o) then cancel out
    recs, _ = bpp.build_pairs(f, bpp.PairConfig(pairwise=True, context_col="ctx", a_col="a", b_col="b",
                                                test_fraction=0.0, system_prompt=SYS))
    assert ("m", "o") not in pairs_of(recs)
    # custom labels
    g = write_jsonl(tmp_path / "pw2.jsonl", [row("c", "x", "y", "2", "r1")])
    recs, _ = bpp.build_pairs(g, bpp.PairConfig(pairwise=True, context_col="ctx", a_col="a", b_col="b",
                                                choice_labels=("1", "2", "0"), test_fraction=0.0, system_prompt=SYS))
    assert pairs_of(recs) == {("y", "x")}


def test_split_by_context_has_no_leakage(tmp_path):
    rows = []
    for c in range(20):
        for t, score in (("good", 5), ("ok", 3), ("bad", 1)):
            rows.append((f"context {c}", f"{t} reply to {c}", "r1", str(score)))
    f = write_csv(tmp_path / "s.csv", ["ctx", "text", "rater", "score"], rows)
    recs, st = bpp.build_pairs(f, ratings_cfg(test_fraction=0.3, seed=1))
    ctx_split = {}
    for r in recs:
        key = r["prompt"][-1]["content"]
        assert ctx_split.setdefault(key, r["meta"]["split"]) == r["meta"]["split"]
    assert st.per_split == {"train": {"contexts": 14, "pairs": 42}, "test": {"contexts": 6, "pairs": 18}}
    again, _ = bpp.build_pairs(f, ratings_cfg(test_fraction=0.3, seed=1))
    other, _ = bpp.build_pairs(f, ratings_cfg(test_fraction=0.3, seed=2))
    assert again == recs and other != recs
    # a tiny survey still gets one test context, and keeps one in train
    assert sorted(bpp.split_contexts(["a", "b"], 0.1, 0).values()) == ["test", "train"]
    assert sorted(bpp.split_contexts(["a", "b"], 0.9, 0).values()) == ["test", "train"]
    # --split-files writes one file per split
    out = tmp_path / "pairs.jsonl"
    assert bpp.main([str(f), "--out", str(out), "--context-col", "ctx", "--text-col", "text", "--rating-col",
                     "score", "--test-fraction", "0.3", "--seed", "1", "--system-prompt", SYS, "--split-files"]) == 0
    tr = [json.loads(l) for l in (tmp_path / "pairs.train.jsonl").read_text().splitlines()]
    te = [json.loads(l) for l in (tmp_path / "pairs.test.jsonl").read_text().splitlines()]
    assert len(tr) == 42 and len(te) == 18 and not out.exists()
    assert not {r["prompt"][-1]["content"] for r in tr} & {r["prompt"][-1]["content"] for r in te}


EXAMPLE_COMMANDS = {
    "pairs_ratings.jsonl": [str(EXAMPLES / "survey_ratings.csv"), "--context-col", "thread", "--text-col",
                            "comment", "--rater-col", "rater", "--rating-col", "rating", "--margin", "1.0",
                            "--test-fraction", "0.25", "--seed", "0"],
    "pairs_pairwise.jsonl": [str(EXAMPLES / "survey_pairwise.jsonl"), "--pairwise", "--context-col", "thread_id",
                             "--prompt-col", "thread", "--a-col", "comment_a", "--b-col", "comment_b",
                             "--choice-col", "choice", "--rater-col", "rater", "--test-fraction", "0.25",
                             "--seed", "0"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_COMMANDS))
def test_shipped_examples_are_current(tmp_path, name, capsys):
    out = tmp_path / name
    assert bpp.main(EXAMPLE_COMMANDS[name] + ["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == (EXAMPLES / name).read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert "rows rejected:        2" in printed and "pairs:" in printed
