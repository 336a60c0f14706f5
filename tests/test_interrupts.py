"""Ctrl-C on the command line (issue 17): the first stops the run through Lightning's graceful path and
the process ends within a few seconds even when a reward's worker thread hangs; a second one ends it
at once. Real processes, real SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lit.interrupts import GRACE_S

ROOT = Path(__file__).resolve().parents[1]


def _start_hanging_fit(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``python -m rlhf_lit fit`` whose reward waits on a thread that never finishes; returns once the
    run is inside the reward."""
    marker = tmp_path / "scoring"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
           f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
           "--trainer.limit_val_batches=0", f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}",
           "--data.batch_size=8", "--model.sampling.max_new_tokens=4",
           "--model.reward=run_probes.HangingReward", f"--model.reward.marker={marker}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach the reward: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    time.sleep(0.5)  # inside future.result()
    return proc, marker


def _wait(proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {timeout:.0f} s after Ctrl-C")
    return time.monotonic() - t0


def test_first_ctrl_c_stops_a_run_whose_reward_hangs(tmp_path):
    proc, _ = _start_hanging_fit(tmp_path)
    proc.send_signal(signal.SIGINT)
    took = _wait(proc, GRACE_S + 20)
    err = proc.stderr.read()
    assert took < GRACE_S + 5, took
    assert "rlhf_lit: interrupted: stopping the run (Ctrl-C again to stop at once)" in err
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in err + proc.stdout.read()
    assert proc.returncode != 0


def test_second_ctrl_c_stops_at_once(tmp_path):
    proc, _ = _start_hanging_fit(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(2.0)  # Lightning's graceful shutdown is done; the interpreter waits on the hung thread
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    took = _wait(proc, 10)
    assert took < 3, took
    assert proc.returncode == 130
    assert "rlhf_lit: second Ctrl-C: stopping now" in proc.stderr.read()
