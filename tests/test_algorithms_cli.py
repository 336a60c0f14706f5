"""The algorithm configs through the CLI: each composes with the demo, trains, resumes exactly,
and ``test`` names the algorithm in its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import ROOT, fast_args, run_cli

ALGORITHMS = ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp"]


def config(name: str) -> str:
    return str(ROOT / "configs" / "algorithms" / f"{name}.yaml")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_is_exact_for_every_estimator(tmp_path, algorithm):
    """4 rollouts straight vs 2 + resume + 2: the same trained weights and metrics."""
    from rlhf_lit.model import PolicyModel

    # 2 prompts x samples_per_prompt responses per rollout (reinforce_pp: 8 prompts x 1); 1 epoch x 2 minibatches
    batch = "--data.batch_size=8" if algorithm == "reinforce_pp" else "--data.batch_size=2"
    common = ["--config", config(algorithm), batch, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
              "--trainer.limit_val_batches=0", "--trainer.callbacks.init_args.every_n_rollouts=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_cli("fit", *fast_args(straight, *common))
    steps_per_rollout = a.model.ppo.ppo_epochs * a.model.ppo.num_minibatches
    run_cli("fit", *fast_args(resumed, *common, f"--trainer.max_steps={2 * steps_per_rollout}"))
    assert len(read_metrics(resumed)) == 2
    b = run_cli("fit", *fast_args(resumed, *common), "--ckpt_path=last")

    assert a.model.policy_config.critic == "none" and a.model.model.value_head is None
    wa = {k: v for k, v in a.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    wb = {k: v for k, v in b.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    assert wa.keys() == wb.keys() and any(".policy." in k for k in wa) and not any("value_head" in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["rollout"] for m in mb] == [1, 2, 3, 4]
    n = a.model.ppo.samples_per_prompt
    assert ma[-1]["episode"] == 4 * (2 if n > 1 else 8) * n
    for x, y in zip(ma, mb):
        assert "loss/value_avg" not in x and "val/explained_variance" not in x  # no critic, no value loss
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "objective/frac_reward_zero_std"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


def test_test_names_the_algorithm(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", config("grpo"), "--data.batch_size=2"]
    run_cli("fit", *fast_args(run_dir, *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))
    run_cli("test", *fast_args(run_dir, *common), "--ckpt_path=last")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run"]["algorithm"].startswith("GRPO (adv_estimator=grpo, samples_per_prompt=4")
    assert "GRPO (adv_estimator=grpo" in (run_dir / "report.md").read_text()


def test_test_names_the_checkpoints_algorithm_under_another_config(tmp_path, caplog):
    """A GRPO checkpoint tested with the RLOO config: the report names GRPO, and a warning says why."""
    import logging

    run_dir = tmp_path / "run"
    run_cli("fit", *fast_args(run_dir, "--config", config("grpo"), "--data.batch_size=2", "--trainer.max_epochs=1",
                              "--trainer.limit_train_batches=1"))
    with caplog.at_level(logging.WARNING, logger="rlhf_lit"):
        run_cli("test", *fast_args(run_dir, "--config", config("rloo"), "--data.batch_size=2"), "--ckpt_path=last")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run"]["algorithm"].startswith("GRPO (adv_estimator=grpo")
    assert any("trained with GRPO" in r.getMessage() and "RLOO" in r.getMessage() for r in caplog.records)


def test_an_estimator_that_needs_a_critic_refuses_critic_none(tmp_path):
    with pytest.raises(ValueError, match="adv_estimator='gae' needs a critic"):
        run_cli("fit", *fast_args(tmp_path / "run", "--model.policy.critic=none"))


def test_groups_stay_whole_in_minibatches(tmp_path):
    with pytest.raises(ValueError, match="data.batch_size=3 is not divisible by model.ppo.num_minibatches=2 "
                                         r"\(minibatches hold whole groups"):
        run_cli("fit", *fast_args(tmp_path / "run", "--config", config("grpo"), "--data.batch_size=3"))
