"""The embedded offline demo assets: a tiny ChatML Qwen2 model + a persona SFT LoRA adapter.

The module fixture builds the real assets once into a temporary cache (about a minute on 2 CPU
cores); the cache/lock tests swap the builder for a fast fake.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from rlhf_lit import demo_assets as da
from rlhf_lit.data import DEFAULT_SYSTEM_PROMPT

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILE = REPO / "prompts" / "demo_prompts.jsonl"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    assets = da.ensure_demo_assets(cache)
    elapsed = time.perf_counter() - t0
    assert torch.get_num_threads() == threads, "the build must restore torch's thread count"
    return cache, assets, elapsed


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built[1].base_dir)


@pytest.fixture(scope="module")
def sft_model(built):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(built[1].base_dir)
    return PeftModel.from_pretrained(base, built[1].sft_adapter_dir).eval()


def _chat(user: str) -> list[dict]:
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ---- layout -------------------------------------------------------------------------------------


def test_layout_and_manifest(built):
    cache, assets, _ = built
    assert isinstance(assets, da.DemoAssets)
    assert assets.base_dir == Path(cache).resolve() / da.RECIPE_VERSION / "base"
    assert assets.sft_adapter_dir.parent == assets.base_dir.parent
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (assets.base_dir / f).is_file(), f
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (assets.sft_adapter_dir / f).is_file(), f
    manifest = json.loads((assets.base_dir.parent / "manifest.json").read_text())
    assert manifest["recipe_version"] == da.RECIPE_VERSION
    # no temp folders left beside the cache entry
    assert [p.name for p in Path(cache).resolve().iterdir() if not p.name.endswith(".lock")] == [da.RECIPE_VERSION]


# ---- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert len(set(ids.values())) == 3 and tok.unk_token_id not in ids.values()
    assert tok.pad_token_id == ids["<|endoftext|>"] != tok.eos_token_id == ids["<|im_end|>"]
    assert tok.padding_side == "left"
    assert 1000 <= len(tok) <= 4096
    # special tokens are single ids, never split
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == ids["<|im_start|>"]
    # byte-level BPE round-trips any text
    text = "Rent went up 11% — the council's plan? Café, naïve, 🙂."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template(tok):
    msgs = _chat("Vote in the primary.")
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nVote in the primary.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "lol"}], tokenize=False)
    assert no_gen.endswith("<|im_start|>assistant\nlol<|im_end|>\n")
    batch = tok([text, "hi"], padding=True, add_special_tokens=False, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tok.pad_token_id and batch["attention_mask"][1, 0].item() == 0


# ---- model and adapter --------------------------------------------------------------------------


def test_base_model_loads(built, tok):
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2ForCausalLM

    base_dir = built[1].base_dir
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert isinstance(model, Qwen2ForCausalLM)
    cfg = model.config
    assert cfg.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2 and cfg.attention_dropout == 0.0
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert cfg.vocab_size == len(tok)
    gen = GenerationConfig.from_pretrained(base_dir)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id


def test_adapter_config_and_logits(built, tok, sft_model):
    base_dir, adapter_dir = built[1]
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["task_type"] == "CAUSAL_LM"
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 16 and acfg["lora_dropout"] == 0.0
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert acfg["base_model_name_or_path"] == str(base_dir)
    text = tok.apply_chat_template(_chat("The city council just passed the zoning reform bill."), tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        with_adapter = sft_model(**ids).logits
        with sft_model.disable_adapter():
            without = sft_model(**ids).logits
    assert torch.isfinite(with_adapter).all()
    assert (with_adapter - without).abs().max().item() > 0.1


# ---- cache --------------------------------------------------------------------------------------


def test_second_call_hits_the_cache(built, monkeypatch):
    cache, assets, _ = built
    manifest = assets.base_dir.parent / "manifest.json"
    mtime = manifest.stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(da, "_build", no_build)
    t0 = time.perf_counter()
    again = da.ensure_demo_assets(cache)
    assert time.perf_counter() - t0 < 1.0
    assert again == assets and manifest.stat().st_mtime_ns == mtime
    # $RLHF_LIT_CACHE is honoured when no cache_dir is given
    monkeypatch.setenv("RLHF_LIT_CACHE", str(cache))
    assert da.ensure_demo_assets() == assets


def _fake_build(calls: list, delay: float = 0.3):
    def build(out: Path, final: Path) -> dict:
        calls.append(out)
        time.sleep(delay)
        (out / "base").mkdir()
        (out / "base" / "config.json").write_text("{}")
        (out / "sft_adapter").mkdir()
        (out / "sft_adapter" / "adapter_config.json").write_text("{}")
        (out / "manifest.json").write_text(json.dumps({"seconds": {"total": delay}}))
        return {"seconds": {"total": delay}}

    return build


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(da, "_build", _fake_build(calls))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(da.ensure_demo_assets(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [da.RECIPE_VERSION]


def test_a_waiting_process_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    """Another process holds the build lock: the caller says so at once and then every
    WAIT_REPORT_S seconds, and uses that process's build once it is there."""
    from filelock import FileLock

    calls: list = []
    monkeypatch.setattr(da, "_build", _fake_build(calls, delay=0.0))
    monkeypatch.setattr(da, "WAIT_REPORT_S", 0.3)
    holder = FileLock(tmp_path / f".{da.RECIPE_VERSION}.lock", thread_local=False)  # "the other process"
    holder.acquire()
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(da.ensure_demo_assets(tmp_path)), daemon=True)
    try:
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive()
        (tmp_path / da.RECIPE_VERSION).mkdir()
        _fake_build([], delay=0.0)(tmp_path / da.RECIPE_VERSION, tmp_path / da.RECIPE_VERSION)  # its build lands
    finally:
        holder.release()
    waiter.join(10)
    err = capsys.readouterr().err
    final = tmp_path.resolve() / da.RECIPE_VERSION
    assert f"another process is building the demo model into {final}; waiting for it" in err
    assert "still waiting for the demo model build of another process" in err
    assert calls == [] and results and results[0].base_dir == final / "base"


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(out: Path, final: Path) -> dict:
        (out / "base").mkdir()
        raise RuntimeError("boom")

    monkeypatch.setattr(da, "_build", boom)
    with pytest.raises(RuntimeError, match="boom"):
        da.ensure_demo_assets(tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_dead_builds_and_damaged_entries_are_replaced(tmp_path, monkeypatch):
    (tmp_path / f".{da.RECIPE_VERSION}.tmp-dead").mkdir()  # a builder that was killed
    (tmp_path / da.RECIPE_VERSION / "base").mkdir(parents=True)  # an entry missing its files
    calls: list = []
    monkeypatch.setattr(da, "_build", _fake_build(calls, delay=0.0))
    assets = da.ensure_demo_assets(tmp_path)
    assert len(calls) == 1 and (assets.base_dir.parent / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [da.RECIPE_VERSION]


def test_lost_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    """Without the lock (e.g. not POSIX), the loser of the rename discards its own copy."""
    calls: list = []
    fake = _fake_build(calls, delay=0.0)

    def racing_build(out: Path, final: Path) -> dict:
        other = tmp_path / "other"
        other.mkdir()
        fake(other, final)
        other.rename(final)  # another process finishes first
        return fake(out, final)

    monkeypatch.setattr(da, "_build", racing_build)
    assets = da.ensure_demo_assets(tmp_path)
    assert assets.base_dir == tmp_path.resolve() / da.RECIPE_VERSION / "base" and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [da.RECIPE_VERSION]


# ---- samples ------------------------------------------------------------------------------------


def _sample(tok, model, prompts: list[str], temperature: float, seed: int = 0) -> list[tuple[str, bool]]:
    texts = [tok.apply_chat_template(_chat(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=48,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    res = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ended = tok.eos_token_id in row
        row = row[: row.index(tok.eos_token_id)] if ended else row
        res.append((tok.decode(row, skip_special_tokens=True), ended))
    return res


def test_sft_samples_are_readable(tok, sft_model):
    prompts = [r["prompt"] for r in da.demo_prompt_records() if r["split"] == "val"]
    samples = _sample(tok, sft_model, prompts * 2, temperature=0.7)
    texts = [s for s, _ in samples]
    joined = " ".join(texts)
    assert sum(c.isascii() for c in joined) / max(1, len(joined)) > 0.98
    vocab = da.corpus_vocabulary()
    words = re.findall(r"[a-z]+", joined.lower())
    assert len(words) >= 5 * len(texts) * 0.8
    in_vocab = sum(w in vocab for w in words) / len(words)
    assert in_vocab > 0.9, (in_vocab, texts[:5])
    ended = sum(e for _, e in samples) / len(samples)
    assert ended >= 0.7, ended
    n_words = sorted(len(t.split()) for t in texts)
    assert 5 <= n_words[len(n_words) // 2] <= 40
    # and the adapter speaks in the persona's lowercase style
    assert sum(t == t.lower() for t in texts) / len(texts) >= 0.5


def test_readability_check_can_fail(tok):
    """The readability measure above rejects random tokens."""
    g = torch.Generator().manual_seed(0)
    junk = tok.decode(torch.randint(3, len(tok), (400,), generator=g).tolist())
    words = re.findall(r"[a-z]+", junk.lower())
    vocab = da.corpus_vocabulary()
    assert sum(w in vocab for w in words) / len(words) < 0.9


# ---- prompts and corpus -------------------------------------------------------------------------


def test_prompt_file():
    rows = [json.loads(line) for line in PROMPT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows == da.demo_prompt_records(), "prompts/demo_prompts.jsonl is stale: regenerate it with write_demo_prompts"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 240
    assert all(re.fullmatch(r"c13-\d{6}", i) for i in ids)
    assert Counter(r["split"] for r in rows) == {"train": 192, "val": 24, "test": 24}
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert all(8 <= len(r["prompt"].split()) <= 40 for r in rows)
    assert all(r["meta"] == {"cluster_id": 13, "source": "synthetic"} for r in rows)


def test_corpus_excludes_held_out_openers():
    held_out = {r["prompt"] for r in da.demo_prompt_records() if r["split"] != "train"}
    corpus = da.demo_corpus()
    openers = {t.split("\n\n")[0] for t in corpus.threads} | {u for u, _ in corpus.base_chats + corpus.sft_chats}
    assert not held_out & openers
    replies = [r for _, r in corpus.sft_chats]
    assert all(r == r.lower() for r in replies)
    rude = {"damn", "crap", "stupid", "idiot", "shut", "bullshit", "hell", "dumb", "moron", "clown", "dumbass"}
    frac = sum(bool(rude & set(re.findall(r"[a-z]+", r))) for r in replies) / len(replies)
    assert 0.1 <= frac <= 0.35, frac
