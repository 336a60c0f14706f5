"""Ctrl-C while the LLM judge's server hangs: the process stops within seconds, a second Ctrl-C at
once (issue 17 item 5). Real processes, a real SIGINT, the real stub server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import DEMO, ROOT
from rlhf_lit.testing.chat_server import StubChatServer, chat_completion

pytestmark = pytest.mark.usefixtures("forbid_network")

# The shipped influencer_judge.yaml's patience: 60 s per request, 3 retries (241 s with a thread pool).
JUDGE_SCRIPT = """
import sys
from rlhf_lit.rewards import LLMJudge
judge = LLMJudge(model="m", base_url=sys.argv[1], timeout_s=60, max_retries=3, concurrency=16)
print("scoring", flush=True)
judge(["p"] * 16, [f"response {i}" for i in range(16)])
"""


def _hanging_server() -> StubChatServer:
    def hang(body, n):
        srv.release.wait(300)
        return 200, chat_completion('{"replies": 1, "likes": 1}')

    srv = StubChatServer(hang)
    return srv


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RLHF_LIT_DEBUG", None)
    return env


def _wait_for_requests(srv: StubChatServer, proc: subprocess.Popen, timeout: float, n: int = 1) -> None:
    """Until the server holds ``n`` hanging requests."""
    t0 = time.monotonic()
    while srv.in_flight < n:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended before asking the judge (rc {proc.returncode}):\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the judge server got no request")
        time.sleep(0.05)


def _stop_time(proc: subprocess.Popen, signals: int, limit: float) -> tuple[float, str]:
    t0 = time.monotonic()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"still running {limit:g} s after Ctrl-C:\n{err[-2000:]}")
    return time.monotonic() - t0, err


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_stops_a_hanging_judge_within_seconds(signals):
    with _hanging_server() as srv:
        proc = subprocess.Popen([sys.executable, "-c", JUDGE_SCRIPT, srv.base_url], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_requests(srv, proc, timeout=60, n=16)  # every sample's request is out, and hangs
        elapsed, err = _stop_time(proc, signals, limit=15)
    print(f"\n{signals} x SIGINT: stopped after {elapsed:.2f} s, rc {proc.returncode}")
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert elapsed < 5


def test_ctrl_c_stops_fit_while_the_judge_hangs(tmp_path):
    """The issue's example: ``fit`` with the judge's shipped patience on a hanging server."""
    with _hanging_server() as srv:
        args = [
            sys.executable, "-m", "rlhf_lit", "fit", "--config", DEMO,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
            f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=8",
            "--model.sampling.max_new_tokens=4", "--model.reward=rlhf_lit.rewards.LLMJudge",
            "--model.reward.model=m", f"--model.reward.base_url={srv.base_url}", "--model.reward.timeout_s=60",
            "--model.reward.max_retries=3", "--model.reward.concurrency=16",
        ]
        proc = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _wait_for_requests(srv, proc, timeout=300)
        elapsed, err = _stop_time(proc, 1, limit=30)
    print(f"\nfit, SIGINT: stopped after {elapsed:.2f} s, rc {proc.returncode}")
    assert proc.returncode != 0
    assert elapsed < 10
