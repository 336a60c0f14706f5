"""Data-parallel PPO on CPU: 2 processes over gloo, Lightning's DDP strategy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _fit(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """A tiny demo fit (1 rollout of 8 prompts) whose ranks save their trained weights to ``tmp_path/name``."""
    out = tmp_path / name
    out.mkdir()
    cmd = [
        sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.logger.init_args.save_dir={out / 'run'}", "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=ddp_probe.SaveRankWeights", f"--trainer.callbacks.out_dir={out}",
        f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=8",
        "--model.ppo.ppo_epochs=1", "--model.sampling.max_new_tokens=8", *extra,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)


def test_ddp_two_ranks_stay_in_sync_and_rank0_writes_once(tmp_path):
    run_dir = tmp_path / "run"
    env = _env()
    cmd = [
        sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.callbacks+=ddp_probe.SaveRankWeights", f"--trainer.callbacks.out_dir={tmp_path}",
        "--trainer.callbacks+=ddp_probe.CountCollectives", f"--trainer.callbacks.out_dir={tmp_path}",
        f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=8",
        "--model.ppo.ppo_epochs=2", "--model.sampling.max_new_tokens=10",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and w0
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)  # all-reduced gradients: identical steps
    sft = torch.load(tmp_path / "rank0.pt")  # and they moved away from the SFT start
    assert any(float(v.abs().sum()) > 0 for k, v in sft.items() if "value_head" in k)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "objective/kl" in m]  # the rollout lines, not the validation line
    assert [m["rollout"] for m in lines] == [1, 2]  # rank 0 alone writes
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(list(run_dir.glob("config*.yaml"))) == 1
    # each rank sampled its own prompts: the episode counter counts both ranks' samples
    assert lines[-1]["episode"] == 2 * 8 * 2

    # A rollout's scalars are averaged over the ranks in one collective (self.log's sync_dist made
    # two per scalar, a barrier and an all-reduce: 76), and metrics.jsonl holds the same means as
    # TensorBoard (it held rank 0's own values). The update makes one all-reduce per epoch (every
    # minibatch's denominator) and one per optimizer step (the gradients), and no barrier (under
    # NCCL each one blocked the host until the GPU was idle: 2 per optimizer step).
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"collectives{rank}.json").read_text())
        assert counts["_log_rollout"] == [{"all_gather_object": 1}] * 2
        epochs, minibatches = 2, 2
        assert counts["ppo_update"] == [{"all_reduce": epochs * (1 + minibatches)}] * 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg", "response/length_mean"):
        tb = [e.value for e in acc.Scalars(key)]
        assert tb == pytest.approx([m[key] for m in lines], rel=1e-6), key


def test_ddp_on_one_device_trains_exactly_like_one_device_without_ddp(tmp_path):
    # DDP wraps the module even for one rank. Its reducer waited for gradients of weights that a
    # backward pass does not reach (a critic adapter in the policy's pass) or reaches only through
    # the bf16 LoRA compute copies (the fp32 masters DDP registered), and failed the next backward
    # with "parameters that were not used in producing the loss". bf16 weights on the CPU and the
    # critic adapter reproduce both on the CPU. (Unshuffled prompts: under DDP the order comes from a
    # DistributedSampler, without it from the loader's own sampler.)
    same = ["--model.policy.dtype=bfloat16", "--model.policy.critic=adapter", "--data.shuffle=false"]
    ddp = _fit(tmp_path, "ddp", "--trainer.strategy=ddp", "--trainer.devices=1", *same)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    plain = _fit(tmp_path, "plain", *same)
    assert plain.returncode == 0, plain.stderr[-3000:]
    w_ddp, w_plain = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "plain" / "rank0.pt")
    assert w_ddp.keys() == w_plain.keys() and any(".critic." in k for k in w_ddp)
    for k in w_ddp:
        torch.testing.assert_close(w_ddp[k], w_plain[k], rtol=0, atol=0)
