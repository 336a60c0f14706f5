"""Data-parallel PPO on CUDA GPUs through the command line: DDP on one GPU (the issue's crash, with
bf16 LoRA compute copies), and two GPUs over NCCL. A small random Qwen2 (the ``assets`` fixture),
bf16-mixed, a Python reward. Skipped without two CUDA GPUs; run them on the two-GPU machine with
``pytest -m gpu tests/test_ddp_gpu.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def fit_cmd(assets: dict, run_dir: Path, out: Path, *extra: str) -> list[str]:
    """``python -m rlhf_lit fit`` of 2 rollouts of 4 prompts per rank on the tiny random model in
    bf16-mixed; each rank saves its weights and collective counts into ``out``."""
    return [
        sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--model.policy.dtype=bfloat16",
        f"--model.policy.base_model={assets['base']}", f"--model.policy.sft_adapter={assets['sft']}",
        "--model.reward=helpers.ConstantishReward", f"--data.prompt_file={assets['prompts']}",
        "--data.system_prompt=null", "--data.val_fraction=0", "--data.test_fraction=0", "--data.batch_size=4",
        f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
        "--model.ppo.ppo_epochs=2", "--model.sampling.max_new_tokens=12",
        "--trainer.callbacks+=ddp_probe.SaveRankWeights", f"--trainer.callbacks.out_dir={out}",
        "--trainer.callbacks+=ddp_probe.CountCollectives", f"--trainer.callbacks.out_dir={out}", *extra,
    ]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_gpu_ddp_on_one_gpu_trains(assets, tmp_path):
    # The issue: --trainer.strategy ddp --trainer.devices 1 crashed in the first update ("parameters
    # that were not used in producing the loss"): bf16 LoRA compute copies leave DDP's fp32 masters
    # without autograd gradients.
    run(fit_cmd(assets, tmp_path / "run", tmp_path, "--trainer.strategy=ddp", "--trainer.devices=1"), tmp_path)
    w = torch.load(tmp_path / "rank0.pt")
    assert w and all(torch.isfinite(v).all() for v in w.values())
    assert any(float(v.abs().sum()) > 0 for k, v in w.items() if "value_head" in k)  # it trained


def test_gpu_ddp_two_gpus_identical_weights_one_writer(assets, tmp_path):
    run_dir = tmp_path / "run"
    run(fit_cmd(assets, run_dir, tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2"), tmp_path)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and w0
    for k in w0:  # all-reduced gradients over NCCL: the same steps on both GPUs
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "objective/kl" in m]
    assert [m["rollout"] for m in lines] == [1, 2] and lines[-1]["episode"] == 2 * 4 * 2
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    for rank in (0, 1):  # one collective for the logged scalars; no barrier in the update
        counts = json.loads((tmp_path / f"collectives{rank}.json").read_text())
        assert counts["_log_rollout"] == [{"all_gather_object": 1}] * 2
        assert counts["ppo_update"] == [{"all_reduce": 2 * (1 + 2)}] * 2
    assert all(m["perf/peak_mem_gb"] > 0 for m in lines)
