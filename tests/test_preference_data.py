"""PreferenceDataModule: the pair files build_preference_pairs.py writes, splits, templates, the length
policy, the errors (file, line, field), and that the shipped demo pairs are what the script makes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from rlhf_lit.data import PromptDataModule
from rlhf_lit.preference_data import PairFileError, PreferenceDataModule, read_pair_file, stack_pairs

ROOT = Path(__file__).resolve().parents[1]
DEMO_PAIRS = ROOT / "prompts" / "demo_pairs.jsonl"
EXAMPLES = ROOT / "scripts" / "examples"


def pair(prompt="thread text", chosen="good reply", rejected="bad reply", **extra):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def module(path, tokenizer, **kw) -> PreferenceDataModule:
    kw = {"batch_size": 2, **kw}
    return PreferenceDataModule(pair_file=str(path), tokenizer=tokenizer, **kw)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from helpers import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(d)
    return str(d)


# ---------------------------------------------------------------------------------------------
# The files the converter writes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pairs_ratings.jsonl", "pairs_pairwise.jsonl"])
def test_reads_the_converter_examples(name):
    pairs = read_pair_file(EXAMPLES / name)
    rows = [json.loads(x) for x in (EXAMPLES / name).read_text().splitlines() if x.strip()]
    assert len(pairs) == len(rows)
    for p, r in zip(pairs, rows):
        assert p.messages == r["prompt"] and p.prompt == r["prompt"][-1]["content"]
        assert p.chosen == r["chosen"][0]["content"] and p.rejected == r["rejected"][0]["content"]
        assert p.split == r["meta"]["split"] and p.group == r["meta"]["context_id"]
        assert p.margin == r["meta"].get("score_diff")  # ratings carry one; pairwise votes do not


def test_splits_keep_threads_together_and_val_comes_from_train():
    dm = PreferenceDataModule(pair_file=str(DEMO_PAIRS), val_fraction=0.2, seed=3)
    by_split = dm.split_records()
    groups = {s: {p.group for p in ps} for s, ps in by_split.items()}
    assert all(groups[a].isdisjoint(groups[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    file_test = {p.group for p in read_pair_file(DEMO_PAIRS) if p.split == "test"}
    assert groups["test"] == file_test  # the file's own test split is kept
    assert 0.1 < len(groups["val"]) / (len(groups["val"]) + len(groups["train"])) < 0.3


def test_a_file_without_splits_is_split_by_thread(tmp_path):
    records = [pair(prompt=f"thread {i // 3}", chosen=f"good {i}", rejected=f"bad {i}") for i in range(300)]
    dm = PreferenceDataModule(pair_file=str(write(tmp_path / "p.jsonl", records)), val_fraction=0.2, test_fraction=0.2)
    by_split = dm.split_records()
    groups = {s: {p.prompt for p in ps} for s, ps in by_split.items()}
    assert all(len(ps) for ps in by_split.values())
    assert groups["train"].isdisjoint(groups["val"]) and groups["train"].isdisjoint(groups["test"])
    assert sum(len(ps) for ps in by_split.values()) == 300


def test_templates_prompts_like_the_prompt_module_and_responses_end_with_eos(tmp_path, tok_dir):
    records = [pair(prompt="why vote today", chosen="thanks for the news", rejected="you idiot", split="train"),
               pair(prompt="hello world", chosen="nice post", rejected="bad take", split="train",
                    meta={"score_diff": 1.5}),
               pair(prompt="what news", chosen="great", rejected="hate this", split="test")]
    dm = module(write(tmp_path / "p.jsonl", records), tok_dir, val_fraction=0.0)
    dm.setup("fit")
    prompts = PromptDataModule(prompt_file=str(write(tmp_path / "q.jsonl", [{"prompt": "why vote today"}])),
                               tokenizer=tok_dir, val_fraction=0.0, test_fraction=0.0, batch_size=1)
    prompts.setup("fit")
    item = dm.splits["train"][0]
    assert item["input_ids"] == prompts.splits["train"][0]["input_ids"]  # same system prompt and template
    tok = dm.tokenizer
    assert item["chosen_ids"] == tok("thanks for the news", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape  # one common width: they stack
    for k in ("chosen", "rejected"):
        n = batch[f"{k}_mask"].sum(-1)
        assert all(batch[f"{k}_ids"][i, n[i] - 1] == tok.eos_token_id for i in range(2))
        assert all(batch[f"{k}_ids"][i, n[i]:].eq(tok.pad_token_id).all() for i in range(2))
    assert batch["attention_mask"][:, -1].all()  # prompts left-padded
    margins = dict(zip(batch["prompt"], batch["margin"].tolist()))
    assert margins["hello world"] == 1.5 and torch.isnan(torch.tensor(margins["why vote today"]))
    stacked = stack_pairs(batch, torch.tensor([1]))
    assert torch.equal(stacked.response_ids[0], batch["chosen_ids"][1])
    assert torch.equal(stacked.response_ids[1], batch["rejected_ids"][1])
    assert torch.equal(stacked.query_ids[0], stacked.query_ids[1])


def test_test_loaders_serve_pairs_and_distinct_prompts(tmp_path, tok_dir):
    records = [pair(prompt=f"thread {i // 2}", chosen=f"good {i}", rejected=f"bad {i}", split="test") for i in range(6)]
    dm = module(write(tmp_path / "p.jsonl", records), tok_dir, eval_batch_size=8)
    dm.setup("test")
    pairs, prompts = dm.test_dataloader()
    assert len(next(iter(pairs))["key"]) == 6
    assert sorted(next(iter(prompts))["prompt"]) == ["thread 0", "thread 1", "thread 2"]
    only_pairs = module(write(tmp_path / "p.jsonl", records), tok_dir, test_prompts=False)
    only_pairs.setup("test")
    assert not isinstance(only_pairs.test_dataloader(), list)


def test_length_policy_drops_with_a_count_or_names_the_line(tmp_path, tok_dir, caplog):
    records = [pair(chosen="ok", rejected="no", split="train"), pair(chosen="ok " * 40, rejected="no", split="train"),
               pair(prompt="long " * 80, split="train"), pair(chosen="fine", rejected="bad", split="train")]
    path = write(tmp_path / "p.jsonl", records)
    dm = module(path, tok_dir, max_prompt_tokens=120, max_response_tokens=20, val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.dropped["train"] == {"prompt": 1, "response": 1} and len(dm.splits["train"]) == 2
    assert "dropped 2 train pairs" in caplog.text
    with pytest.raises(PairFileError, match=rf"{path}:2: the response .* over data.max_response_tokens=20"):
        module(path, tok_dir, max_prompt_tokens=120, max_response_tokens=20, long_pairs="error").setup("fit")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "chosen": "a", "rejected": oops}', "not valid JSON"),
    (json.dumps({"prompt": "x", "chosen": "a"}), "missing field 'rejected'"),
    (json.dumps(pair(chosen="same", rejected="same")), "'chosen' and 'rejected' are the same text"),
    (json.dumps(pair(split="dev")), "'split' must be one of"),
    (json.dumps(pair(meta={"score_diff": "big"})), "'meta.score_diff' must be a finite number"),
    (json.dumps({**pair(), "chosen": [{"role": "user", "content": "hi"}]}), "'chosen' must be one assistant message"),
    (json.dumps({**pair(), "prompt": [{"role": "user"}]}), "'prompt' must be text or a non-empty list"),
    (json.dumps({**pair(), "prompt": [{"role": "system", "content": "s"}]}), "'prompt' has no user message"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_lines_are_named_by_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "p.jsonl", [pair(), line])
    with pytest.raises(PairFileError, match=message) as e:
        read_pair_file(path)
    assert f"{path}:2" in str(e.value)


def test_missing_empty_and_duplicate(tmp_path):
    with pytest.raises(PairFileError, match="does not exist"):
        read_pair_file(tmp_path / "nope.jsonl")
    with pytest.raises(PairFileError, match="holds no pairs"):
        read_pair_file(write(tmp_path / "e.jsonl", []))
    with pytest.raises(PairFileError, match="duplicate id 'a'"):
        read_pair_file(write(tmp_path / "d.jsonl", [pair(id="a"), pair(id="a", chosen="other")]))


def test_encoding_latin1_named_by_line_and_bom_accepted(tmp_path):
    good = json.dumps(pair(id="a")).encode()
    latin1 = json.dumps(pair(id="b", chosen="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + latin1 + b"\n")
    with pytest.raises(PairFileError, match="UTF-8") as e:
        read_pair_file(path)
    assert f"{path}:2" in str(e.value)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert [p.id for p in read_pair_file(bom)] == ["a"]


def test_shipped_demo_pairs_are_what_the_script_builds(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_demo_pairs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "pairs.jsonl"
    assert build_demo_pairs.main(["--out", str(out), "--survey-out", str(tmp_path / "demo_survey.csv")]) == 0
    assert out.read_bytes() == DEMO_PAIRS.read_bytes(), "prompts/demo_pairs.jsonl is stale: run scripts/build_demo_pairs.py"
    header = (tmp_path / "demo_survey.csv").read_text().splitlines()[0]
    assert header == "thread,comment,rater,rating"
