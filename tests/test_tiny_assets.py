"""The tiny tokenizers reload as themselves from the folders they are saved in (CPU, no weights).

A model folder holds ``config.json`` beside the tokenizer files, and ``AutoTokenizer`` reads it:
for ``model_type: qwen2`` transformers 5 builds a ``Qwen2Tokenizer`` (Qwen2's byte-level pipeline
around the saved vocabulary and merges) whatever ``tokenizer_config.json`` names. A word-level
tokenizer saved there reloads encoding every word to nothing; these tests save each tiny tokenizer
beside a tiny Qwen2 and a tiny Llama ``config.json`` (and alone), reload it, and compare.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT
from rlhf_lit.testing.tokenizers import ALPHABET, TINY_WORDS, build_chatml_tokenizer

from helpers import ROOT, build_tokenizer

TEXTS = [
    "w12 w45 w7",  # the policy tests' prompts
    "i love it, great day",
    "What do you think of the vote today? 3 of 5.\n\nthanks",
    "",
]
CHATS = [
    [{"role": "user", "content": "w12 w45 w7"}],
    [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "you are a stupid idiot"}],
]


def tiny_config(model_type: str):
    """A tiny model config of that type (only ``config.json`` is written: the weights play no part)."""
    shape = dict(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[model_type](**shape)


def save_and_reload(tok, folder, model_type):
    tok.save_pretrained(folder)
    if model_type is not None:
        tiny_config(model_type).save_pretrained(folder)
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    return AutoTokenizer.from_pretrained(folder)


def assert_same_tokenizer(tok, loaded):
    assert type(loaded) is type(tok)
    assert len(loaded) == len(tok) and loaded.get_vocab() == tok.get_vocab()
    for name in ("pad", "eos", "bos", "unk"):
        assert getattr(loaded, f"{name}_token") == getattr(tok, f"{name}_token"), name
        assert getattr(loaded, f"{name}_token_id") == getattr(tok, f"{name}_token_id"), name
    assert loaded.padding_side == tok.padding_side and loaded.chat_template == tok.chat_template
    for text in TEXTS:
        for special in (False, True):
            ids = tok(text, add_special_tokens=special)["input_ids"]
            assert loaded(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
            assert loaded.decode(ids) == tok.decode(ids)
            assert bool(ids) == bool(text), text
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        word_ids = [i for i in ids if len(ALPHABET) <= i < tok.pad_token_id]
        assert word_ids, "only characters and specials: the words were lost"


@pytest.mark.parametrize("model_type", ["qwen2", "llama", None])
def test_the_policy_tests_tokenizer_reloads_as_itself(tmp_path, model_type):
    tok = build_tokenizer()
    loaded = save_and_reload(tok, tmp_path, model_type)
    assert_same_tokenizer(tok, loaded)
    assert (loaded.pad_token_id, loaded.convert_tokens_to_ids("<|im_start|>"), loaded.eos_token_id) == (250, 251, 252)


@pytest.mark.parametrize("model_type", ["qwen2", "llama", None])
def test_the_judge_tokenizer_reloads_as_itself(tmp_path, model_type):
    from rlhf_lit.chat import CHATML_TEMPLATE

    tok = build_chatml_tokenizer(TINY_WORDS, bos_token="<|im_start|>", chat_template=CHATML_TEMPLATE,
                                 model_max_length=256)
    assert_same_tokenizer(tok, save_and_reload(tok, tmp_path, model_type))


def test_words_are_one_token_after_a_space_and_digits_one_each():
    tok = build_chatml_tokenizer(TINY_WORDS)
    assert tok.tokenize("i love it, great day") == ["i", "Ġlove", "Ġit", ",", "Ġgreat", "Ġday"]
    assert tok.tokenize("123") == ["1", "2", "3"]  # the judge's bucket answers are single tokens
    assert len(tok) == tok.eos_token_id + 1
    with pytest.raises(ValueError, match="only ASCII letters"):
        build_chatml_tokenizer(["w12"])
    with pytest.raises(ValueError, match="too small"):
        build_chatml_tokenizer(TINY_WORDS, size=len(ALPHABET))


@pytest.fixture
def bench(monkeypatch):
    """``benchmarks/_tiny_7b_assets.py`` (a script folder, not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location("_tiny_7b_assets", ROOT / "benchmarks" / "_tiny_7b_assets.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_assets_reload_their_tokenizer(tmp_path, bench):
    # The benchmark's own build on the CPU with its tiny shapes: same code as the 7B one on a GPU.
    shapes = bench.TINY
    tok = bench.build_tokenizer(shapes.special_start)
    assets = bench.build_assets(tmp_path, shapes, "cpu", n_prompts=4)
    texts = [json.loads(line)["prompt"] for line in open(assets["prompts"], encoding="utf-8")]
    words = list(range(len(ALPHABET), shapes.special_start, 37))
    # The policy's base (PromptDataModule's tokenizer) and the reward model each carry the tokenizer.
    for folder in ("base", "reward"):
        assert json.loads((tmp_path / folder / "config.json").read_text())["model_type"] == "qwen2"
        loaded = AutoTokenizer.from_pretrained(assets[folder])
        assert (loaded.pad_token_id, loaded.eos_token_id) == (shapes.special_start, shapes.special_start + 2)
        assert loaded.convert_tokens_to_ids("<|im_start|>") == shapes.special_start + 1
        assert loaded.padding_side == "left"
        for text in texts:
            assert bench.templated_ids(loaded, text) == bench.templated_ids(tok, text)
            assert len(bench.templated_ids(loaded, text)) == shapes.prompt_tokens
        # A sampled word id decodes to a word that the reward model's tokenizer reads as that id.
        assert loaded(loaded.decode(words), add_special_tokens=False)["input_ids"] == words
