"""LLMJudge against a real HTTP server on 127.0.0.1 speaking the chat-completions protocol."""

from __future__ import annotations

import json
import logging
import math
import pickle
import time

import pytest
import torch
from jsonargparse import ArgumentParser

from rlhf_lit.rewards import JudgeError, LLMJudge, RewardBackend
from rlhf_lit.rewards.judge_prompts import parse_engagement
from rlhf_lit.testing.chat_server import StubChatServer, chat_completion, free_port_url

pytestmark = pytest.mark.usefixtures("forbid_network")


def fast(base_url: str, **kw) -> LLMJudge:
    """A judge with short backoffs so the retry tests stay fast."""
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 5.0)
    return LLMJudge(model="stub-judge", base_url=base_url, **kw)


def answer(content):
    return lambda body, n: (200, chat_completion(content))


# ----------------------------------------------------------------------------- good answers
def test_parse_mode_scores_and_sends_the_protocol():
    fenced = 'Sure! Here is my prediction:\n```json\n{"replies": 3, "likes": 10}\n```\nHope it helps.'
    with StubChatServer(answer(fenced)) as srv:
        judge = fast(srv.base_url, w_replies=2.0, w_likes=0.5, temperature=0.3, response_format="json_object")
        out = judge(["What do you think of the vote?"], ["It was a great day for democracy"])
        headers, body = srv.requests[0]
    expected = 2.0 * math.log1p(3) + 0.5 * math.log1p(10)
    assert out.valid.tolist() == [True]
    assert out.scores.item() == pytest.approx(expected, rel=1e-6)
    assert out.components["judge"].item() == pytest.approx(expected, rel=1e-6)
    assert out.components["judge/replies"].item() == 3 and out.components["judge/likes"].item() == 10
    assert out.metrics["judge/failures"] == 0 and out.metrics["judge/retries"] == 0
    assert out.metrics["judge/latency_s"] > 0 and out.metrics["judge/cache_hits"] == 0
    assert body["model"] == "stub-judge" and body["temperature"] == 0.3 and body["max_tokens"] == 64
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system"
    user = body["messages"][-1]["content"]
    assert "What do you think of the vote?" in user and "It was a great day for democracy" in user
    assert '{"replies": <integer>, "likes": <integer>}' in user  # braces in the template survive
    assert "Authorization" not in headers  # no api_key_env: no key sent


def test_parse_engagement_tolerates_prose_but_not_garbage():
    assert parse_engagement('{"replies": 1, "likes": 2}') == (1, 2)
    assert parse_engagement('blah {"note": "x"} then {"Replies": "1,200", "likes": 4.0} end') == (1200, 4)
    assert parse_engagement('{"prediction": {"replies": 0, "likes": 7}}') == (0, 7)
    for bad in ("no json here", '{"replies": -1, "likes": 2}', '{"replies": true, "likes": 2}', '{"likes": 2}'):
        with pytest.raises(ValueError):
            parse_engagement(bad)


def test_logprobs_mode_is_the_bucket_expectation():
    # p("3") = .5, p(" 4") = .25, a non-digit .15, p("9") (out of 1..5) .1: renormalise over 3 and 4.
    probs = {"3": 0.5, " 4": 0.25, "the": 0.15, "9": 0.1}
    with StubChatServer(lambda b, n: (200, chat_completion("3", probs))) as srv:
        judge = fast(srv.base_url, mode="logprobs", num_buckets=5)
        out = judge(["p"], ["r"])
        _, body = srv.requests[0]
    assert out.scores.item() == pytest.approx((3 * 0.5 + 4 * 0.25) / 0.75, rel=1e-6)
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert "1 to 5" in body["messages"][-1]["content"]


def test_logprobs_missing_is_a_failure():
    with StubChatServer(answer("4")) as srv:  # a server that ignores logprobs
        with pytest.raises(JudgeError, match="has no logprobs"):
            fast(srv.base_url, mode="logprobs")(["p"], ["r"])


# ----------------------------------------------------------------------------- failures
def test_malformed_answer_raises_or_is_skipped(caplog):
    with StubChatServer(answer("I think it will do quite well.")) as srv:
        with pytest.raises(JudgeError) as err:
            fast(srv.base_url)(["p"], ["r"])
        msg = str(err.value)
        print("\nmalformed/raise:", msg)
        assert srv.base_url + "/chat/completions" in msg and "last status: 200" in msg
        assert "malformed judge answer" in msg and "I think it will do quite well." in msg
        assert len(srv.requests) == 1  # a malformed answer is not retried

        judge = fast(srv.base_url, on_failure="skip", scale=2.0, shift=1.0)
        with caplog.at_level(logging.WARNING):
            out = judge(["p", "p"], ["r1", "r2"])
    assert out.valid.tolist() == [False, False]
    assert out.scores.tolist() == [0.0, 0.0]  # post-processing is not applied to invalid samples
    assert torch.isnan(out.components["judge"]).all()
    assert out.metrics["judge/failures"] == 2
    assert "2 of 2 samples failed" in caplog.text


def test_skip_keeps_the_good_samples():
    def behaviour(body, n):
        if "bad" in body["messages"][-1]["content"]:
            return 200, chat_completion("no idea")
        return 200, chat_completion('{"replies": 1, "likes": 1}')

    with StubChatServer(behaviour) as srv:
        out = fast(srv.base_url, on_failure="skip")(["p"] * 3, ["good one", "bad one", "good two"])
    assert out.valid.tolist() == [True, False, True]
    assert out.scores[0].item() == pytest.approx(2 * math.log1p(1))
    assert out.metrics["judge/failures"] == 1


def test_500_then_success_is_retried_and_counted():
    def behaviour(body, n):
        if n == 1:
            return 500, {"error": {"message": "CUDA out of memory"}}
        if n == 2:
            return 429, {"error": {"message": "slow down"}}
        return 200, chat_completion('{"replies": 2, "likes": 5}')

    with StubChatServer(behaviour) as srv:
        out = fast(srv.base_url)(["p"], ["r"])
        assert len(srv.requests) == 3
    assert out.valid.item() and out.metrics["judge/retries"] == 2
    assert out.scores.item() == pytest.approx(math.log1p(2) + math.log1p(5))


def test_persistent_5xx_raises_with_url_status_and_last_error():
    with StubChatServer(lambda b, n: (503, {"error": "model is loading"})) as srv:
        with pytest.raises(JudgeError) as err:
            fast(srv.base_url, max_retries=2)(["p"], ["r"])
        assert len(srv.requests) == 3
    msg = str(err.value)
    print("\n5xx:", msg)
    assert "failed after 3 attempt(s)" in msg and "last status: 503" in msg and "model is loading" in msg


def test_4xx_is_not_retried():
    with StubChatServer(lambda b, n: (400, {"error": {"message": "unknown model stub-judge"}})) as srv:
        with pytest.raises(JudgeError) as err:
            fast(srv.base_url, max_retries=3)(["p"], ["r"])
        assert len(srv.requests) == 1
    msg = str(err.value)
    print("\n4xx:", msg)
    assert "last status: 400" in msg and "unknown model stub-judge" in msg


def test_hang_times_out_with_a_clear_error():
    def hang(body, n):
        srv.release.wait(10)
        return 200, chat_completion('{"replies": 1, "likes": 1}')

    srv = StubChatServer(hang)
    with srv:
        url = srv.base_url
        t0 = time.perf_counter()
        with pytest.raises(JudgeError) as err:
            fast(srv.base_url, timeout_s=0.3, max_retries=1)(["p"], ["r"])
        elapsed = time.perf_counter() - t0
        assert len(srv.requests) == 2
    msg = str(err.value)
    print("\nhang:", msg)
    assert "timed out after 0.3 s" in msg and url in msg
    assert elapsed < 3


def test_server_down_names_the_url():
    url = free_port_url()
    with pytest.raises(JudgeError) as err:
        fast(url, max_retries=1)(["p"], ["r"])
    msg = str(err.value)
    print("\ndown:", msg)
    assert url + "/chat/completions" in msg and "Connection refused" in msg and "is the judge server running" in msg
    out = fast(url, max_retries=0, on_failure="skip")(["p"], ["r"])
    assert out.valid.tolist() == [False] and out.metrics["judge/failures"] == 1


# ----------------------------------------------------------------------------- cache, concurrency
def test_cache_in_memory_and_jsonl(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    with StubChatServer() as srv:
        judge = fast(srv.base_url, cache_path=str(cache))
        first = judge(["p", "p", "q"], ["same", "same", "other"])  # the duplicate is asked once
        assert len(srv.requests) == 2 and first.metrics["judge/cache_hits"] == 1
        second = judge(["p", "q"], ["same", "other"])
        assert len(srv.requests) == 2 and second.metrics["judge/cache_hits"] == 2
        assert "judge/latency_s" not in second.metrics  # no request was made
        assert second.scores.tolist() == [first.scores[0].item(), first.scores[2].item()]
        assert len(cache.read_text().splitlines()) == 2

        fresh = fast(srv.base_url, cache_path=str(cache))  # a new run reads the file
        third = fresh(["q"], ["other"])
        assert len(srv.requests) == 2 and third.metrics["judge/cache_hits"] == 1

        other_model = LLMJudge(model="another", base_url=srv.base_url, cache_path=str(cache))
        other_model(["q"], ["other"])  # a different judge setting is not served from the cache
        assert len(srv.requests) == 3

        nocache = fast(srv.base_url, cache=False)
        nocache(["p"], ["same"]), nocache(["p"], ["same"])
        assert len(srv.requests) == 5


def test_concurrency_limit():
    def slow(body, n):
        time.sleep(0.2)
        return 200, chat_completion('{"replies": 1, "likes": 2}')

    with StubChatServer(slow) as srv:
        t0 = time.perf_counter()
        out = fast(srv.base_url, concurrency=4)(["p"] * 8, [f"text {i}" for i in range(8)])
        elapsed = time.perf_counter() - t0
        assert srv.max_in_flight == 4
    assert out.valid.all() and elapsed < 8 * 0.2 * 0.75


# ----------------------------------------------------------------------------- the API key
def test_api_key_is_sent_but_never_stored(monkeypatch, caplog):
    secret = "sk-test-7f3c2a9e-do-not-leak"
    monkeypatch.setenv("JUDGE_API_KEY", secret)
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardBackend)
    with StubChatServer(lambda b, n: (500, {"error": "boom"}) if n == 1 else (200, chat_completion("nonsense"))) as srv:
        cfg = parser.parse_args(
            ["--reward", json.dumps({
                "class_path": "rlhf_lit.rewards.LLMJudge",
                "init_args": {"model": "m", "base_url": srv.base_url, "api_key_env": "JUDGE_API_KEY",
                              "backoff_s": 0.01, "on_failure": "skip"},
            })]
        )
        judge = parser.instantiate(cfg).reward
        with caplog.at_level(logging.DEBUG):
            out = judge(["p"], ["r"])
        assert out.metrics["judge/failures"] == 1
        assert [h.get("Authorization") for h, _ in srv.requests] == [f"Bearer {secret}"] * 2
    for dumped in (repr(vars(judge)), repr(judge), str(pickle.dumps(judge)), parser.dump(cfg), caplog.text):
        assert secret not in dumped
    assert "JUDGE_API_KEY" in parser.dump(cfg)
    clone = pickle.loads(pickle.dumps(judge))  # picklable, and works after unpickling
    assert clone.api_key_env == "JUDGE_API_KEY"

    monkeypatch.delenv("JUDGE_API_KEY")
    with pytest.raises(JudgeError, match="JUDGE_API_KEY.*not set"):
        judge(["p"], ["other"])
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        LLMJudge(model="m", api_key_env="sk-abc-123")


def test_bad_options_are_rejected_at_construction():
    with pytest.raises(ValueError, match="num_buckets"):
        LLMJudge(model="m", mode="logprobs", num_buckets=12)
    with pytest.raises(ValueError, match="placeholder"):
        LLMJudge(model="m", prompt_template="Rate this post")
    with pytest.raises(ValueError, match="base_url"):
        LLMJudge(model="m", base_url="127.0.0.1:8000/v1")
