"""Detoxify's real loading and predict code on a tiny checkpoint in Detoxify's own format, offline."""

from __future__ import annotations

import pickle

import pytest
import torch

from rlhf_lit.rewards import Detoxify
from rlhf_lit.testing.models import build_detoxify_checkpoint

TEXTS = [
    "have a nice day",
    "you are a stupid idiot and i hate you",
    "",
    "the vote today was good news for people who love democracy, thanks for the thread " * 4,
    "what?",
]


@pytest.fixture(autouse=True)
def _offline(forbid_network):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, above all on a busy shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, hf = build_detoxify_checkpoint(tmp_path_factory.mktemp("detoxify"))
    return str(ckpt), str(hf)


def make(tiny, **kw) -> Detoxify:
    ckpt, hf = tiny
    return Detoxify(checkpoint=ckpt, huggingface_config_path=hf, **kw)


def test_scores_are_probabilities_and_batching_changes_nothing(tiny):
    batched = make(tiny, batch_size=3)
    batched.setup("cpu")
    out = batched([""] * len(TEXTS), TEXTS)
    assert out.scores.shape == (len(TEXTS),) and out.valid.all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.scores.std() > 0  # the random model still tells texts apart
    assert set(out.components) == {"detoxify", "toxicity"}
    one_by_one = make(tiny, batch_size=1)
    single = torch.cat([one_by_one([""], [t]).scores for t in TEXTS])  # one-item lists: floats inside Detoxify
    torch.testing.assert_close(out.scores, single, atol=1e-5, rtol=0)
    assert batched.class_names == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]


def test_weighted_attributes_prompt_and_postprocessing(tiny):
    weights = {"toxicity": 1.0, "insult": 0.5, "identity_attack": -2.0}
    multi = make(tiny, attributes=weights, scale=-1.0, shift=1.0)
    out = multi(["p"] * 3, TEXTS[:3])
    assert set(out.components) == {"detoxify", "toxicity", "insult", "identity_attack"}
    raw = sum(w * out.components[a] for a, w in weights.items())
    torch.testing.assert_close(out.components["detoxify"], raw)
    torch.testing.assert_close(out.scores, 1.0 - raw)

    with_prompt = make(tiny, include_prompt=True)
    alone = make(tiny)
    a = with_prompt(["i hate this thread"], ["what?"]).scores
    b = alone(["i hate this thread"], ["what?"]).scores
    c = alone([""], ["i hate this thread\nwhat?"]).scores
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, b)


def test_max_length_truncates(tiny):
    long = "good " * 20 + "stupid idiot " * 40  # longer than the tiny model's 64 positions
    short = make(tiny, max_length=16)
    out = short([""], [long])
    ref = short([""], ["good " * 14])  # 16 tokens: [CLS] + 14 words + [SEP]
    torch.testing.assert_close(out.scores, ref.scores)


def test_unknown_attribute_is_a_clear_error(tiny):
    with pytest.raises(ValueError) as err:
        make(tiny, attributes={"toxicity": 1.0, "sexual_explicit": 1.0})([""], ["hi"])
    print("\nunknown attribute:", err.value)
    assert "sexual_explicit" in str(err.value) and "identity_attack" in str(err.value)


def test_offline_errors_name_the_option(tiny, tmp_path):
    ckpt, hf = tiny
    with pytest.raises(FileNotFoundError, match="checkpoint file .*missing.ckpt"):
        Detoxify(checkpoint=str(tmp_path / "missing.ckpt"), huggingface_config_path=hf)([""], ["hi"])
    with pytest.raises(FileNotFoundError, match="huggingface_config_path"):
        Detoxify(checkpoint=ckpt, huggingface_config_path=str(tmp_path))([""], ["hi"])
    torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not in Detoxify's format"):
        Detoxify(checkpoint=str(tmp_path / "bad.ckpt"))([""], ["hi"])
    # Without a local folder Detoxify asks the Hub for bert-base-uncased: offline that must say what to set.
    with pytest.raises(OSError) as err:
        Detoxify(checkpoint=ckpt)([""], ["hi"])
    print("\nno huggingface_config_path offline:", err.value)
    assert "huggingface_config_path" in str(err.value)
    # No checkpoint: the GitHub download is refused offline, and the message says how to work offline.
    with pytest.raises(RuntimeError) as err:
        Detoxify(model_type="original-small")([""], ["hi"])
    print("\nno checkpoint offline:", err.value)
    assert "github.com" in str(err.value) and "'checkpoint'" in str(err.value)


def test_lazy_and_picklable(tiny):
    det = make(tiny)
    assert det._detox is None  # nothing loaded by the constructor
    det([""], ["hi"])
    clone = pickle.loads(pickle.dumps(det))
    assert clone._detox is None
    torch.testing.assert_close(clone([""], ["hi"]).scores, det([""], ["hi"]).scores)
