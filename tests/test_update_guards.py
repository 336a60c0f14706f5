"""The optimizer step only when there is something to learn, and on unscaled gradients (issue 17):
a rollout or minibatch without a scored sample makes no step, logs no fake 0.0 score and, repeated,
stops the run; under fp16 mixed precision the gradients are clipped after the scaler unscales them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import run_probes
from helpers import fast_args, run_cli

COMMON = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.callbacks.init_args.every_n_rollouts=1"]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_unscored_rollouts_make_no_update_and_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = fast_args(run_dir, *COMMON, "--trainer.limit_train_batches=5",
                     "--model.reward=run_probes.ScoredRollouts", "--model.reward.scored_calls=1",
                     "--model.ppo.max_unscored_rollouts=3",
                     "--trainer.callbacks+=run_probes.RecordWeights")
    with pytest.warns(UserWarning, match=r"rollout 2: no sample was scored .*'outage'.* no update was made"), \
            pytest.raises(RuntimeError, match=r"rollouts 2-4: 3 rollouts in a row without a single scored sample .*"
                                              r"model\.ppo\.max_unscored_rollouts=3"):
        run_cli("fit", *args)
    rows = history(run_dir)
    assert [m["rollout"] for m in rows] == [1, 2, 3, 4]
    assert rows[0]["objective/scores"] is not None and rows[0]["policy/updates"] == 4.0
    for m in rows[1:]:
        assert m["objective/scores"] is None and m["objective/rlhf_reward"] is None  # NaN, not 0.0
        assert m["objective/valid_fraction"] == 0.0 and "loss/policy_avg" not in m
        assert m["step"] == rows[0]["step"]  # no optimizer step
    snaps = run_probes.SNAPSHOTS
    assert len(snaps) == 3  # rollouts 1-3 ended normally; rollout 4 raised before its callbacks
    for later in snaps[1:]:  # AdamW's momentum alone would have moved them
        assert all(torch.equal(later[k], snaps[0][k]) for k in snaps[0])


def test_a_minibatch_without_a_scored_sample_makes_no_step(tmp_path):
    """One scored sample of 8: of the 2 minibatches of each epoch, only the one holding it steps."""
    run_dir = tmp_path / "run"
    run_cli("fit", *fast_args(run_dir, *COMMON, "--trainer.limit_train_batches=1",
                              "--model.reward=run_probes.FirstSampleOnly"))
    (m,) = history(run_dir)
    assert m["objective/valid_fraction"] == 1 / 8 and m["objective/scores"] is not None
    assert m["policy/updates"] == 2.0 and m["step"] == 2  # ppo_epochs x 1, not ppo_epochs x num_minibatches


def _one_rollout(run_dir: Path, *extra: str) -> tuple[dict, float]:
    """One rollout, one optimizer step (clipped: max_grad_norm 0.1); returns its metrics and how far
    the policy adapter moved from the SFT adapter it started from (the frozen reference)."""
    cli = run_cli("fit", *fast_args(run_dir, *COMMON, "--trainer.limit_train_batches=1", "--model.ppo.ppo_epochs=1",
                                    "--model.ppo.num_minibatches=1", "--model.ppo.max_grad_norm=0.1", *extra))
    state = cli.model.model.state_dict()
    moved = [float((state[k].float() - state[k.replace(".policy.", ".reference.")].float()).norm())
             for k in state if ".lora_" in k and ".policy." in k]
    assert moved
    return history(run_dir)[0], sum(moved)


def test_fp16_mixed_precision_clips_unscaled_gradients(tmp_path):
    """Lightning's 16-mixed plugin with its GradScaler: the logged norm and the clipped step match
    fp32 (clipping before unscaling read a norm ~65536x too large and barely moved the weights)."""
    m32, moved32 = _one_rollout(tmp_path / "fp32")
    m16, moved16 = _one_rollout(tmp_path / "fp16", "--trainer.precision=null",
                                "--trainer.plugins=lightning.pytorch.plugins.precision.MixedPrecision",
                                "--trainer.plugins.precision=16-mixed", "--trainer.plugins.device=cpu")
    assert m32["policy/grad_norm"] > 0.1  # the clip is active
    assert m16["policy/grad_norm"] == pytest.approx(m32["policy/grad_norm"], rel=0.05)
    assert moved16 == pytest.approx(moved32, rel=0.1)
