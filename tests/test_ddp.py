"""Data-parallel PPO on CPU: 2 processes over gloo, Lightning's DDP strategy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_ranks_stay_in_sync_and_rank0_writes_once(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.callbacks+=ddp_probe.SaveRankWeights", f"--trainer.callbacks.out_dir={tmp_path}",
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
