"""Tests for scripts/sample_blueprint_prompts.py (loaded from its path: scripts/ is not a package)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sample_blueprint_prompts.py"
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


sbp = _load_script(SCRIPT)

WORDS = "budget council transit library ballot voters hearing park housing schools zoning measure".split()


def thread(cluster: int, opener: str, own: bool = True, n: int = 3, t0: int = 0) -> dict:
    users = ["op"] + [f"u{i}" for i in range(1, n)]
    users[-1] = "op" if own else "other"
    if n == 1 and not own:
        raise ValueError("a one-message thread is always own-cluster")
    msgs = [{"text": opener if i == 0 else f"reply {i}", "user_id": u, "relative_integer_time": t0 + i,
             "actions": {"like": False, "reply": i < n - 1}} for i, u in enumerate(users)]
    return {"cluster_id": cluster, "thread": msgs}


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def many_threads(k: int = 5, count: int = 200) -> list[dict]:
    """``count`` distinct own-cluster openers of cluster k, interleaved with other clusters."""
    recs = []
    for i in range(count):
        text = f"Opener number {i} about the " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))
        recs.append(thread(k, text, own=True, t0=10 * i))
        recs.append(thread(k + 1, f"Other cluster post {i} with several words", t0=10 * i + 5))
    return recs


def cfg(**kw):
    base = dict(cluster=5, n=1000)
    base.update(kw)
    return sbp.SampleConfig(**base)


def test_own_cluster_filter(tmp_path):
    f = write_jsonl(tmp_path / "bp.jsonl", [
        thread(5, "Written by the cluster user, long enough", own=True),
        thread(5, "Written by somebody else entirely here", own=False),
        thread(5, "Single message threads count as own", own=True, n=1),
        thread(6, "Different cluster altogether, ignored", own=True),
    ])
    recs, stats = sbp.sample_prompts([f], cfg(own_cluster_only=True))
    assert [r["prompt"] for r in recs] == ["Written by the cluster user, long enough", "Single message threads count as own"]
    assert all(r["meta"]["opener_user_is_cluster_user"] for r in recs)
    assert stats.filtered["not_own_cluster"] == 1 and stats.other_cluster == 1 and stats.in_cluster == 3
    recs, _ = sbp.sample_prompts([f], cfg())
    assert [r["meta"]["opener_user_is_cluster_user"] for r in recs] == [True, False, True]
    assert recs[0]["meta"] == {"cluster_id": 5, "source": "bp.jsonl", "line": 1, "thread_len": 3,
                               "opener_user_is_cluster_user": True}
    assert set(recs[0]) == {"id", "prompt", "split", "meta"} and recs[0]["id"].startswith("5-")


def test_length_bounds_and_empty(tmp_path):
    f = write_jsonl(tmp_path / "bp.jsonl", [
        thread(5, "one two"),                      # 2 words
        thread(5, "one two three four"),           # 4 words, 18 chars
        thread(5, "one two three four five six seven"),  # 7 words
        thread(5, "   "),                           # empty
        thread(5, "  padded  text  here  "),       # stripped for output and length
    ])
    recs, st = sbp.sample_prompts([f], cfg(min_words=3, max_words=6))
    assert [r["prompt"] for r in recs] == ["one two three four", "padded  text  here"]
    assert st.filtered["too_few_words"] == 1 and st.filtered["too_many_words"] == 1 and st.filtered["empty"] == 1
    recs, st = sbp.sample_prompts([f], cfg(min_chars=8, max_chars=18))
    assert [r["prompt"] for r in recs] == ["one two three four", "padded  text  here"]
    assert st.filtered["too_few_chars"] == 1 and st.filtered["too_many_chars"] == 1


def test_dedup_on_normalised_text(tmp_path):
    f = write_jsonl(tmp_path / "bp.jsonl", [
        thread(5, "Vote early this year!", t0=1),
        thread(5, "  vote   EARLY this year!", t0=2),
        thread(5, "Vote\u200b early this year!", t0=3),
        thread(5, "Vote early next year!", t0=4),
    ])
    recs, st = sbp.sample_prompts([f], cfg())
    assert [r["prompt"] for r in recs] == ["Vote early this year!", "Vote early next year!"]
    assert st.duplicates == 2
    recs, st = sbp.sample_prompts([f], cfg(dedup=False))
    assert len(recs) == 4 and st.duplicates == 0
    assert len({r["id"] for r in recs}) == 4


def test_seeded_reservoir_is_deterministic(tmp_path):
    f = write_jsonl(tmp_path / "bp.jsonl", many_threads())
    a, sa = sbp.sample_prompts([f], cfg(n=20, seed=1))
    b, _ = sbp.sample_prompts([f], cfg(n=20, seed=1))
    c, _ = sbp.sample_prompts([f], cfg(n=20, seed=2))
    assert a == b
    assert len(a) == 20 and sa.kept["train"] == 20 and sum(sa.eligible.values()) == 200
    assert [r["id"] for r in a] != [r["id"] for r in c]
    assert [r["meta"]["line"] for r in a] == sorted(r["meta"]["line"] for r in a)  # input order
    # n larger than the pool keeps everything
    everything, _ = sbp.sample_prompts([f], cfg(n=500, seed=3))
    assert len(everything) == 200


def test_splits_are_disjoint_and_sized(tmp_path):
    recs = many_threads()
    recs += [thread(5, "Same opener in many threads", t0=5000 + i) for i in range(6)]
    f = write_jsonl(tmp_path / "bp.jsonl", recs)
    for dedup in (True, False):
        out, st = sbp.sample_prompts([f], cfg(n=100, seed=0, val_fraction=0.1, test_fraction=0.2, dedup=dedup))
        assert st.requested == {"train": 70, "val": 10, "test": 20}
        assert st.kept == st.requested
        by_split = {s: [r for r in out if r["split"] == s] for s in sbp.SPLITS}
        for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not {r["id"] for r in by_split[s1]} & {r["id"] for r in by_split[s2]}
            n1 = {sbp.normalise_text(r["prompt"]) for r in by_split[s1]}
            assert not n1 & {sbp.normalise_text(r["prompt"]) for r in by_split[s2]}
    # a thread's split does not depend on the seed or n
    o1, _ = sbp.sample_prompts([f], cfg(n=300, seed=0, val_fraction=0.1, test_fraction=0.2))
    o2, _ = sbp.sample_prompts([f], cfg(n=300, seed=9, val_fraction=0.1, test_fraction=0.2))
    assert {r["id"]: r["split"] for r in o1} == {r["id"]: r["split"] for r in o2}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"cluster_id": 5, "thread": [', "invalid JSON"),
        ('[1, 2]', "expected a JSON object"),
        ('{"thread": []}', "missing 'cluster_id'"),
        ('{"cluster_id": "5", "thread": []}', "'cluster_id' must be an integer"),
        ('{"cluster_id": 5, "thread": []}', "'thread' must be a non-empty list"),
        ('{"cluster_id": 5, "thread": [{"text": 3, "user_id": "a"}]}', "thread[0].text must be a string"),
        ('{"cluster_id": 5, "thread": [{"text": "x"}]}', "thread[0].user_id must be a string"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, bad, expected):
    f = write_jsonl(tmp_path / "broken.jsonl", [thread(5, "fine opener"), "", bad, thread(5, "after")])
    with pytest.raises(sbp.MalformedRecord) as ei:
        sbp.sample_prompts([f], cfg())
    msg = str(ei.value)
    assert f"{f}:3:" in msg and expected in msg


def test_skip_bad_counts(tmp_path):
    f = write_jsonl(tmp_path / "broken.jsonl", [
        thread(5, "good one here"), "not json", '{"cluster_id": 5}', thread(5, "good two here"), "{}"])
    recs, st = sbp.sample_prompts([f], cfg(skip_bad=True))
    assert [r["prompt"] for r in recs] == ["good one here", "good two here"]
    assert st.bad_records == 3 and st.lines_read == 5
    assert st.first_bad[0].startswith(f"{f}:2:")
    assert "malformed (skipped):   3" in st.report()


def test_gz_input_matches_plain(tmp_path):
    recs = many_threads(count=50)
    plain = write_jsonl(tmp_path / "bp.jsonl", recs)
    gz = write_jsonl(tmp_path / "bp.jsonl.gz", recs, gz=True)
    a, _ = sbp.sample_prompts([plain], cfg(n=10, seed=4, test_fraction=0.2))
    b, _ = sbp.sample_prompts([gz], cfg(n=10, seed=4, test_fraction=0.2))
    for r in a:
        r["meta"]["source"] = "bp.jsonl.gz"
    assert a == b


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import pyarrow` fail, installed or not.
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    f = tmp_path / "bp.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match="pip install pyarrow"):
        sbp.sample_prompts([f], cfg())


def test_cli_subprocess(tmp_path):
    f = write_jsonl(tmp_path / "bp.jsonl", many_threads(count=30))
    out = tmp_path / "prompts" / "cluster5_prompts.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(f), "--cluster", "5", "--n", "10", "--seed", "0",
         "--val-fraction", "0.2", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept:                  10 (train 8, val 2, test 0)" in proc.stdout
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10 and all(json.loads(l)["meta"]["cluster_id"] == 5 for l in lines)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_cli_malformed_exit_code(tmp_path, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [thread(5, "ok here"), "nope"])
    out = tmp_path / "o.jsonl"
    assert sbp.main([str(f), "--cluster", "5", "--out", str(out), "--no-progress"]) == 1
    assert f"{f}:2:" in capsys.readouterr().err and not out.exists()


def test_shipped_example_is_current(tmp_path):
    out = tmp_path / "cluster13_prompts.jsonl"
    rc = sbp.main([str(EXAMPLES / "blueprint_sample.jsonl"), "--cluster", "13", "--n", "10",
                   "--own-cluster-only", "--min-words", "4", "--val-fraction", "0.2",
                   "--test-fraction", "0.2", "--seed", "0", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert out.read_text(encoding="utf-8") == (EXAMPLES / "cluster13_prompts.jsonl").read_text(encoding="utf-8")
