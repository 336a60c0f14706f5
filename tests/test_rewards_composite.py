"""Composite, LengthPenalty, Profanity and the shared post-processing, with real backends."""

from __future__ import annotations

import pickle

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser

from rlhf_lit.rewards import Composite, Detoxify, LengthPenalty, LLMJudge, Profanity, RewardBackend
from rlhf_lit.testing.chat_server import StubChatServer, chat_completion

CLEAN = "Thank you for sharing, I hope you have a lovely weekend with your family."
OFFENSIVE = "Shut up you fucking idiot, you are a worthless piece of shit."


@pytest.fixture(autouse=True)
def _offline(forbid_network):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, above all on a busy shared CPU
    yield
    torch.set_num_threads(threads)


def test_profanity_ranks_offensive_above_clean():
    prof = Profanity()
    prof.setup("cpu")
    out = prof(["", ""], [CLEAN, OFFENSIVE])
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.scores[0] < 0.2 < 0.8 < out.scores[1]
    assert list(out.components) == ["profanity"]
    # include_prompt puts the prompt in the scored text
    with_prompt = Profanity(include_prompt=True)([OFFENSIVE], [CLEAN])
    assert with_prompt.scores.item() > out.scores[0].item()
    assert pickle.loads(pickle.dumps(prof))([""], [CLEAN]).scores.item() == pytest.approx(out.scores[0].item())


def test_postprocessing_scale_shift_clip():
    prof = Profanity(scale=-2.0, shift=1.0, clip_min=-0.5)
    out = prof(["", ""], [CLEAN, OFFENSIVE])
    raw = out.components["profanity"]
    torch.testing.assert_close(out.scores, (1.0 - 2.0 * raw).clamp(min=-0.5))
    assert out.scores[1].item() == -0.5
    with pytest.raises(ValueError, match="clip_min"):
        Profanity(clip_min=1.0, clip_max=0.0)


def test_length_penalty():
    texts = ["one two  three", "", "a\nb"]
    assert LengthPenalty()([""] * 3, texts).scores.tolist() == [3.0, 0.0, 2.0]
    assert LengthPenalty(unit="chars")([""] * 3, texts).scores.tolist() == [14.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="tokenizer"):
        LengthPenalty(unit="tokens")


def test_length_in_tokens(tmp_path):
    from rlhf_lit.testing.tokenizers import build_bert_tokenizer

    build_bert_tokenizer(tmp_path)
    out = LengthPenalty(unit="tokens", tokenizer=str(tmp_path))([""], ["hello world, thanks"])
    assert out.scores.tolist() == [4.0]  # hello, world, ",", thanks (no special tokens)


def test_composite_weighted_sum_components_and_metrics():
    def behaviour(body, n):
        if "worthless" in body["messages"][-1]["content"]:
            return 200, chat_completion("cannot say")
        return 200, chat_completion('{"replies": 4, "likes": 9}')

    with StubChatServer(behaviour) as srv:
        prof = Profanity(scale=-1.0)
        length = LengthPenalty()
        judge = LLMJudge(model="m", base_url=srv.base_url, on_failure="skip", w_likes=0.0)
        comp = Composite([prof, length, judge], weights=[1.0, -0.01, 0.5], shift=3.0)
        comp.setup("cpu")
        out = comp(["", ""], [CLEAN, OFFENSIVE])
    p, n = prof([""] * 2, [CLEAN, OFFENSIVE]).components["profanity"], torch.tensor([14.0, 12.0])
    j = torch.log1p(torch.tensor(4.0))
    assert out.valid.tolist() == [True, False]  # the judge failed on the second sample
    expected0 = 3.0 + (-p[0]) - 0.01 * n[0] + 0.5 * j
    assert out.scores[0].item() == pytest.approx(expected0.item(), rel=1e-5)
    assert out.scores[1].item() == 0.0
    # Each backend's raw score under its name, plus the judge's parts and the raw sum.
    assert set(out.components) == {"profanity", "length", "judge", "judge/replies", "judge/likes", "total"}
    torch.testing.assert_close(out.components["profanity"], p)
    torch.testing.assert_close(out.components["length"], n)
    assert out.metrics["judge/failures"] == 1 and out.metrics["judge/retries"] == 0


def test_composite_rejects_duplicate_names_and_bad_weights():
    with pytest.raises(ValueError, match="unique"):
        Composite([Profanity(), Profanity()])
    Composite([Profanity(), Profanity(include_prompt=True, name="profanity_ctx")])
    with pytest.raises(ValueError, match="2 weights for 1 backends"):
        Composite([Profanity()], weights=[1.0, 2.0])


def test_composite_from_yaml_with_nested_class_paths(tmp_path):
    from rlhf_lit.testing.models import build_detoxify_checkpoint

    ckpt, hf = build_detoxify_checkpoint(tmp_path)
    yaml_text = f"""
reward:
  class_path: rlhf_lit.rewards.Composite
  init_args:
    backends:
      - class_path: rlhf_lit.rewards.Detoxify
        init_args:
          checkpoint: {ckpt}
          huggingface_config_path: {hf}
          attributes: {{toxicity: 1.0, insult: 0.5}}
          device: cpu
      - class_path: LengthPenalty
        init_args: {{unit: chars}}
      - class_path: rlhf_lit.rewards.Profanity
    weights: [-1.0, -0.01, -1.0]
"""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardBackend)
    cfg = parser.parse_string(yaml_text)
    dumped = parser.dump(cfg)
    assert "rlhf_lit.rewards.LengthPenalty" in dumped and "insult: 0.5" in dumped
    reward = parser.instantiate(cfg).reward
    assert isinstance(reward, Composite) and isinstance(reward.backends[0], Detoxify)
    assert reward.backends[0]._detox is None  # building from YAML loads nothing
    out = reward(["", ""], [CLEAN, OFFENSIVE])
    assert out.valid.all()
    assert {"detoxify", "toxicity", "insult", "length", "profanity", "total"} == set(out.components)
    expected = -out.components["detoxify"] - 0.01 * out.components["length"] - out.components["profanity"]
    torch.testing.assert_close(out.scores, expected)
    with pytest.raises(ArgumentError, match="weigths"):  # a typo in YAML is caught by the parser
        parser.parse_string(yaml_text.replace("weights:", "weigths:"))
