"""One PPO rollout through the CLI with each reward backend, chosen in YAML by class_path."""

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from rlhf_lit.testing.chat_server import StubChatServer
from rlhf_lit.testing.models import build_causal_lm, build_detoxify_checkpoint, build_sequence_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("reward-assets")
    ckpt, hf = build_detoxify_checkpoint(d / "detoxify")
    return {"detoxify_ckpt": str(ckpt), "detoxify_hf": str(hf),
            "classifier": str(build_sequence_classifier(d / "classifier")),
            "judge_lm": str(build_causal_lm(d / "judge-lm"))}


def backends(assets, judge_url):
    return {
        "Profanity": {"class_path": "rlhf_lit.rewards.Profanity"},
        "Detoxify": {"class_path": "rlhf_lit.rewards.Detoxify",
                     "init_args": {"checkpoint": assets["detoxify_ckpt"], "huggingface_config_path": assets["detoxify_hf"],
                                   "attributes": {"toxicity": 1.0, "insult": 0.5}}},
        "LLMJudge": {"class_path": "rlhf_lit.rewards.LLMJudge",
                     "init_args": {"base_url": judge_url, "model": "stub", "api_key_env": "RLHF_LIT_TEST_JUDGE_KEY"}},
        "LocalJudge": {"class_path": "rlhf_lit.rewards.LocalJudge", "init_args": {"model_path": assets["judge_lm"]}},
        "RewardModel": {"class_path": "rlhf_lit.rewards.RewardModel",
                        "init_args": {"model_path": assets["classifier"], "label": "positive", "transform": "softmax"}},
        "Composite": {"class_path": "rlhf_lit.rewards.Composite",
                      "init_args": {"backends": [{"class_path": "rlhf_lit.rewards.Profanity"},
                                                 {"class_path": "rlhf_lit.rewards.LengthPenalty"}],
                                    "weights": [1.0, -0.01]}},
    }


@pytest.mark.parametrize("name", ["Profanity", "Detoxify", "LLMJudge", "LocalJudge", "RewardModel", "Composite"])
def test_one_rollout_with_each_backend(name, assets, tmp_path, monkeypatch):
    from rlhf_lit.cli import main

    monkeypatch.setenv("RLHF_LIT_TEST_JUDGE_KEY", "sk-test-secret-123")
    with StubChatServer() as server:
        reward_yaml = tmp_path / "reward.yaml"
        reward_yaml.write_text(yaml.safe_dump({"model": {"reward": backends(assets, server.base_url)[name]}}))
        run_dir = tmp_path / "run"
        args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(reward_yaml),
                f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
                "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
                f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=4",
                "--model.ppo.ppo_epochs=1", "--model.sampling.max_new_tokens=8"]
        with mock.patch.object(sys, "argv", ["python -m rlhf_lit"]):
            main(args)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["objective/scores"] is not None
    assert any(k.startswith("reward/") for k in metrics[0])
    # the judge's key is read from the environment and written nowhere in the run folder
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert b"sk-test-secret-123" not in f.read_bytes(), f
