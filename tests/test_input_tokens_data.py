"""Issue 18, items 4-8: data that can do no work, text encodings, reward return values, stop
tokens, and sampling that is exactly what the config says."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import build_tokenizer, fast_args, run_cli, tiny_qwen2
from rlhf_lit.data import PromptDataModule, PromptFileError, read_prompt_file
from rlhf_lit.errors import ConfigError, InputFileError
from rlhf_lit.rewards.base import RewardBackend, RewardOutput, RewardValueError
from rlhf_lit.tokenizer import resolve_stop_tokens

pytestmark = pytest.mark.usefixtures("forbid_network")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- item 4
def _ten_prompts_seven_long(tmp_path):
    short = [{"prompt": f"short one {i}", "split": "train"} for i in range(3)]
    long = [{"prompt": "many words " * 60 + str(i), "split": "train"} for i in range(7)]
    return _write(tmp_path / "p.jsonl", short + long)


def test_training_prompts_are_counted_after_filtering(tmp_path, monkeypatch):
    import rlhf_lit.stages.base as stage_base

    monkeypatch.setattr(stage_base, "PolicyModel", lambda *a, **k: pytest.fail("the model was loaded"))
    prompts = _ten_prompts_seven_long(tmp_path)
    with pytest.raises(PromptFileError) as e:
        run_cli("fit", *fast_args(tmp_path / "run", f"--data.prompt_file={prompts}", "--data.batch_size=4",
                                  "--model.ppo.num_minibatches=2", "--data.max_prompt_tokens=64"))
    msg = str(e.value)
    print("\n", msg)
    assert "10 training prompts, 7 of them over data.max_prompt_tokens=64 and dropped, 3 left" in msg
    assert "fewer than data.batch_size=4" in msg and str(prompts) in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_training_prompts_are_counted_per_data_parallel_rank(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": f"short one {i}", "split": "train"} for i in range(6)])
    dm = PromptDataModule(str(prompts), tokenizer="builtin:demo", batch_size=4)
    dm.tokenizer = build_tokenizer()
    dm.setup("fit")  # one rank: 6 >= 4
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(PromptFileError, match=r"6 training prompts \(3 for each of 2 data-parallel ranks\), fewer"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------- item 5
def test_latin1_prompt_file_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9 au lait"}\n')
    with pytest.raises(PromptFileError) as e:
        read_prompt_file(bad)
    msg = str(e.value)
    assert f"{bad}:2: not UTF-8 text" in msg and "byte e9" in msg and "café" in msg


def test_utf8_bom_is_accepted(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "first", "id": "a"}\n{"prompt": "second"}\n')
    records = read_prompt_file(bom)
    assert [r.text for r in records] == ["first", "second"] and records[0].id == "a"


def test_chat_template_file_in_another_encoding_is_named(tmp_path):
    from rlhf_lit.tokenizer import load_tokenizer

    folder = tmp_path / "tok"
    build_tokenizer().save_pretrained(folder)
    template = tmp_path / "template.jinja"
    template.write_bytes(b"{% for m in messages %}\xa7{{ m['content'] }}{% endfor %}")
    with pytest.raises(InputFileError, match=rf"data.chat_template: {template}:1: not UTF-8"):
        load_tokenizer(str(folder), chat_template=str(template))


# --------------------------------------------------------------------------------------- item 6
class Returns(RewardBackend):
    def __init__(self, value, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def score(self, prompts, responses):
        return self.value(responses) if callable(self.value) else self.value


@pytest.mark.parametrize("value, expected", [
    (lambda rs: ["0.5" for _ in rs], r"returned str '0.5' as scores\[0\] for sample 0 \(response 'hello there'\)"),
    (lambda rs: [1.0, None], r"returned NoneType 'None' as scores\[1\] for sample 1 \(response 'second one'\)"),
    ("great", r"returned str 'great' as scores;"),
    (None, r"returned NoneType 'None' as scores;"),
    (lambda rs: [[1.0, 2.0]] * len(rs), r"returned list '\[1.0, 2.0\]' as scores\[0\]"),
    (lambda rs: [1.0], r"returned 1 scores for 2 samples"),
    (lambda rs: RewardOutput(torch.ones(2), ["yes", "no"], {}, {}), r"returned str 'yes' as valid\[0\]"),
])
def test_bad_reward_values_name_backend_sample_and_expectation(value, expected):
    with pytest.raises(RewardValueError, match=expected) as e:
        Returns(value, name="mine")(["p", "q"], ["hello there", "second one"])
    assert "reward backend 'mine' (Returns.score)" in str(e.value) and "expected one real number per sample" in str(e.value)


def test_good_reward_values_still_work():
    import numpy as np

    for value in ([1, 2.5], np.array([1.0, 2.5]), torch.tensor([1.0, 2.5]), [np.float32(1.0), torch.tensor(2.5)]):
        assert Returns(value)(["p", "q"], ["a", "b"]).scores.tolist() == [1.0, 2.5]


# --------------------------------------------------------------------------------------- item 7
def test_stop_tokens_resolved_and_checked():
    tok = build_tokenizer()  # ChatML: PAD <|endoftext|> 250, EOS <|im_end|> 252
    assert resolve_stop_tokens(tok, ["<|im_start|>"]) == [251, 252]
    with pytest.raises(ConfigError, match=r"model.extra_stop_tokens: '<\|eot_id\|>' is not a token of this tokenizer"):
        resolve_stop_tokens(tok, ["<|eot_id|>"])
    with pytest.raises(ConfigError, match=r"'<\|endoftext\|>' \(id 250\) is this tokenizer's PAD token.*Leave it out"):
        resolve_stop_tokens(tok, ["<|endoftext|>"])
    with pytest.raises(ConfigError, match=r"'\\n\\n' is not a token .* it is 2 tokens"):
        resolve_stop_tokens(tok, ["\n\n"])


def test_stop_token_text_of_one_token_is_that_token():
    tok = build_tokenizer()
    word = tok.convert_ids_to_tokens(40)  # "Ġxyz": the text " xyz" is one token
    assert resolve_stop_tokens(tok, [tok.convert_tokens_to_string([word])]) == [40, 252]


def test_missing_stop_token_never_becomes_the_unknown_token(tmp_path):
    from rlhf_lit.testing.tokenizers import build_bert_tokenizer

    tok = build_bert_tokenizer(tmp_path)
    assert tok.unk_token is not None and tok.convert_tokens_to_ids("<|eot_id|>") == tok.unk_token_id
    with pytest.raises(ConfigError, match="is not a token of this tokenizer"):
        resolve_stop_tokens(tok, ["<|eot_id|>"])


@pytest.mark.parametrize("tokens", ['["<|eot_id|>"]', '["<|endoftext|>"]'])
def test_stop_tokens_fail_at_startup_before_the_model_loads(tmp_path, monkeypatch, tokens):
    import rlhf_lit.stages.base as stage_base

    monkeypatch.setattr(stage_base, "PolicyModel", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="model.extra_stop_tokens"):
        run_cli("fit", *fast_args(tmp_path / "run", f"--model.extra_stop_tokens={tokens}"))


# --------------------------------------------------------------------------------------- item 8
def test_hf_generate_ignores_the_models_generation_config():
    """A model that ships min_p, typical_p, no_repeat_ngram_size, suppress_tokens... samples exactly
    as one that ships nothing: only the configured processors act."""
    from transformers import GenerationConfig

    from rlhf_lit.rollout import SamplingConfig
    from rlhf_lit.rollout.hf_generate import HFGenerate

    torch.manual_seed(0)
    plain = tiny_qwen2().eval()
    shipped = tiny_qwen2().eval()
    shipped.load_state_dict(plain.state_dict())
    shipped.generation_config = GenerationConfig(
        min_p=0.2, typical_p=0.5, no_repeat_ngram_size=1, top_k=3, top_p=0.5, repetition_penalty=1.5,
        suppress_tokens=list(range(10, 200)), epsilon_cutoff=3e-4, temperature=0.3, do_sample=True,
    )
    seen = []
    real = shipped._get_logits_processor
    shipped._get_logits_processor = lambda *a, **k: (lambda procs: (seen.append(procs), procs)[1])(real(*a, **k))
    ids = torch.randint(4, 250, (4, 6))
    mask = torch.ones_like(ids)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9)
    outs = []
    for model in (plain, shipped):
        torch.manual_seed(1)
        outs.append(HFGenerate().generate(model, ids, mask, sampling, [252], 250))
    assert torch.equal(outs[0], outs[1])
    # the configured ones: temperature, min_new_tokens (0 here: a minimum of the prompt's length) and
    # the engine's recorder of sampler log-probs (it changes no score)
    assert {type(p).__name__ for p in seen[0]} <= {"TemperatureLogitsWarper", "MinLengthLogitsProcessor",
                                                   "_SamplerLogprobs"}, seen[0]
    assert shipped.generation_config.min_p == 0.2  # the model's own config is back afterwards
