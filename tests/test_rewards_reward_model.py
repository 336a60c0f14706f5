"""RewardModel on a tiny sequence classifier folder built with save_pretrained; LocalJudge on a tiny causal LM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_lit.rewards import LocalJudge, RewardModel
from rlhf_lit.testing.models import build_causal_lm, build_sequence_classifier

PROMPTS = ["what do you think of the vote?", "hello", "news today"]
RESPONSES = ["i love it, great day", "you are a stupid idiot", "no"]


@pytest.fixture(autouse=True)
def _offline(forbid_network):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, above all on a busy shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return str(build_sequence_classifier(tmp_path_factory.mktemp("rm"), labels=("negative", "neutral", "positive")))


def reference_logits(folder, first, second=None):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(first, second, return_tensors="pt", padding=True) if second else tok(first, return_tensors="pt", padding=True)
        return model(**enc).logits


def test_label_by_name_and_index_and_transforms(clf):
    logits = reference_logits(clf, RESPONSES)
    by_name = RewardModel(clf, label="positive", batch_size=2)
    by_name.setup("cpu")
    torch.testing.assert_close(by_name(PROMPTS, RESPONSES).scores, logits[:, 2], atol=1e-5, rtol=1e-5)
    assert by_name.label_index == 2
    torch.testing.assert_close(RewardModel(clf, label=2)(PROMPTS, RESPONSES).scores, logits[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(RewardModel(clf, label="-1")(PROMPTS, RESPONSES).scores, logits[:, 2], atol=1e-5, rtol=1e-5)
    sig = RewardModel(clf, label="negative", transform="sigmoid")(PROMPTS, RESPONSES)
    torch.testing.assert_close(sig.scores, logits[:, 0].sigmoid(), atol=1e-5, rtol=1e-5)
    soft = RewardModel(clf, label="neutral", transform="softmax", scale=10.0)(PROMPTS, RESPONSES)
    torch.testing.assert_close(soft.scores, 10 * logits.softmax(-1)[:, 1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(soft.components["reward_model"], logits.softmax(-1)[:, 1], atol=1e-5, rtol=1e-5)


def test_inputs_pair_and_concat(clf):
    pair_ref = reference_logits(clf, PROMPTS, RESPONSES)[:, 1]
    pair = RewardModel(clf, label=1, input="pair")(PROMPTS, RESPONSES).scores
    torch.testing.assert_close(pair, pair_ref, atol=1e-5, rtol=1e-5)
    concat_ref = reference_logits(clf, [p + " || " + r for p, r in zip(PROMPTS, RESPONSES)])[:, 1]
    concat = RewardModel(clf, label=1, input="concat", separator=" || ")(PROMPTS, RESPONSES).scores
    torch.testing.assert_close(concat, concat_ref, atol=1e-5, rtol=1e-5)


def test_label_and_folder_errors(clf, tmp_path):
    with pytest.raises(ValueError) as err:
        RewardModel(clf, label="toxic")(["p"], ["r"])
    print("\nunknown label:", err.value)
    assert "'toxic'" in str(err.value) and "positive" in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        RewardModel(clf, label=3)(["p"], ["r"])
    with pytest.raises(FileNotFoundError, match="model_path"):
        RewardModel(str(tmp_path))(["p"], ["r"])
    with pytest.raises(ValueError, match="chat template"):
        RewardModel(clf, input="chat")(["p"], ["r"])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return str(build_causal_lm(tmp_path_factory.mktemp("lm")))


def test_local_judge_bucket_expectation(lm):
    judge = LocalJudge(lm, num_buckets=5, batch_size=2)
    judge.setup("cpu")
    out = judge(PROMPTS, RESPONSES)
    assert out.valid.all() and ((out.scores >= 1) & (out.scores <= 5)).all()
    assert 0 < out.metrics["judge/digit_mass"] < 1
    assert judge.build_input("p", "r").endswith("<|im_start|>assistant\n")
    one = torch.cat([judge([p], [r]).scores for p, r in zip(PROMPTS, RESPONSES)])  # left padding is exact
    torch.testing.assert_close(out.scores, one, atol=1e-4, rtol=0)
    # The expectation by hand from the model's next-token distribution.
    tok = AutoTokenizer.from_pretrained(lm)
    model = judge._model
    ids = tok(judge.build_input(PROMPTS[0], RESPONSES[0]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        p = model(**ids).logits[0, -1].softmax(-1)
    digits = torch.tensor([tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)])
    q = p[digits] / p[digits].sum()
    assert out.scores[0].item() == pytest.approx((q * torch.arange(1, 6)).sum().item(), abs=1e-4)


def test_chat_input(clf, tmp_path):
    from rlhf_lit.chat import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(clf)
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(clf).save_pretrained(tmp_path)
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    assert "<|im_start|>assistant\ni love it" in chats[0]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = model(**tok(chats, add_special_tokens=False, return_tensors="pt", padding=True)).logits[:, 0]
    out = RewardModel(str(tmp_path), input="chat")(PROMPTS, RESPONSES).scores
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_offload_is_a_no_op_on_the_cpu_and_pickles(clf):
    import pickle

    plain, offloaded = RewardModel(clf, label=1), RewardModel(clf, label=1, offload=True)
    for rm in (plain, offloaded):
        rm.setup("cpu")
    torch.testing.assert_close(offloaded(PROMPTS, RESPONSES).scores, plain(PROMPTS, RESPONSES).scores)
    clone = pickle.loads(pickle.dumps(offloaded))
    torch.testing.assert_close(clone(PROMPTS, RESPONSES).scores, plain(PROMPTS, RESPONSES).scores)
