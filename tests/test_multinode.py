"""Several nodes on the CPU: two torchrun "nodes" of one process each on 127.0.0.1 (gloo), running
``python -m rlhf_lit fit`` as a user would on two machines; a resume with the same number of
ranks, and one with another number (refused before any model loads)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROLLOUTS = 2


def _env() -> dict:
    # One thread per process: two "nodes" share the machine's cores with whatever else runs.
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_args(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.num_nodes=2", "--trainer.devices=1",
        f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1", f"--trainer.limit_train_batches={ROLLOUTS}", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=ddp_probe.SaveRankWeights", f"--trainer.callbacks.out_dir={out}",
        f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}", "--data.batch_size=4",
        "--model.ppo.ppo_epochs=1", "--model.sampling.max_new_tokens=6", *extra,
    ]


def torchrun_fit(tmp: Path, name: str, run_dir: Path, *extra: str) -> Path:
    """``torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1`` (static rendezvous on 127.0.0.1),
    each "node" in its own working folder ``tmp/name/node<k>``; returns ``tmp/name`` (the ranks'
    weights, each node's output)."""
    out = tmp / name
    port = _free_port()
    procs = []
    for node in (0, 1):
        cwd = out / f"node{node}"
        cwd.mkdir(parents=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "rlhf_lit", *_fit_args(run_dir, out, *extra)]
        log = (out / f"node{node}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=900)
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # a rank that waits on a dead peer: end this test's process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    for node, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (out / f"node{node}.log").read_text()[-4000:]
    return out


def rollout_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "objective/kl" in m]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A fresh fit of 2 rollouts on 2 nodes x 1 process."""
    tmp = tmp_path_factory.mktemp("nodes")
    run_dir = tmp / "run"
    out = torchrun_fit(tmp, "fresh", run_dir)
    return tmp, run_dir, out


def test_two_nodes_train_identical_weights_and_rank0_alone_writes(two_nodes):
    tmp, run_dir, out = two_nodes
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_weights(w0, w1)  # gradients summed over the nodes: both ranks took the same steps
    sft = torch.load(out / "rank0.pt")
    assert any(float(v.abs().sum()) > 0 for k, v in sft.items() if "value_head" in k)

    lines = rollout_lines(run_dir)
    assert [m["rollout"] for m in lines] == [1, 2]  # one writer of metrics.jsonl
    assert lines[-1]["episode"] == ROLLOUTS * 4 * 2  # each rank sampled its own 4 prompts
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["rollout"] for s in samples] == [1] * 4 + [2] * 4  # log_samples: 4 per rollout, once
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in run_dir.glob("config*.yaml")] == ["config.yaml"]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and all(n.endswith(".ckpt") for n in ckpts), ckpts  # no temporary files left
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    # Nothing lands in either node's working folder (relative defaults such as lightning_logs/).
    assert list((out / "node0").iterdir()) == [] and list((out / "node1").iterdir()) == []
    log0, log1 = (out / "node0.log").read_text(), (out / "node1.log").read_text()
    assert "rlhf_lit: fit done: 2 rollouts" in log0 and "fit done" not in log1  # rank 0 alone summarises

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    meta = ckpt["rlhf_lit"]
    assert meta["settings"]["trainer.world_size"] == 2
    # every rank's own random state (rank 0's alone put rank 1 on rank 0's stream after a resume)
    states = meta["rng_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_resume_on_two_nodes_continues_each_rank_exactly(two_nodes, tmp_path):
    tmp, fresh_dir, fresh = two_nodes
    run_dir = tmp_path / "run"
    torchrun_fit(tmp_path, "first", run_dir, "--max_rollouts=1")  # stops after rollout 1 with a checkpoint
    assert [m["rollout"] for m in rollout_lines(run_dir)] == [1]
    out = torchrun_fit(tmp_path, "resumed", run_dir, "--ckpt_path=last")
    assert [m["rollout"] for m in rollout_lines(run_dir)] == [1, 2]
    for rank in (0, 1):  # each rank's prompts, random state and weights continue where they stopped
        assert_same_weights(torch.load(out / f"rank{rank}.pt"), torch.load(fresh / f"rank{rank}.pt"))
    assert rollout_lines(run_dir)[-1]["objective/scores"] == pytest.approx(
        rollout_lines(fresh_dir)[-1]["objective/scores"], rel=1e-6)


def test_resume_with_another_number_of_ranks_is_refused_before_any_model_loads(two_nodes, tmp_path):
    tmp, run_dir, _ = two_nodes
    before = {p: p.read_bytes() for p in (run_dir / "metrics.jsonl", run_dir / "checkpoints" / "last.ckpt")}
    cmd = [sys.executable, "-m", "rlhf_lit", *_fit_args(run_dir, tmp_path, "--ckpt_path=last")]
    cmd[cmd.index("--trainer.num_nodes=2")] = "--trainer.num_nodes=1"
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (f"error: cannot resume from {last} with 1 data-parallel rank(s) (trainer.num_nodes=1 x "
            f"trainer.devices=1): it was written by 2.") in proc.stderr
    assert "Resume with 2 rank(s), or start a new run from the trained adapter" in proc.stderr
    assert "rlhf_lit: training" not in proc.stdout + proc.stderr  # the model never loaded (it prints its size)
    assert [p.name for p in run_dir.glob("config*.yaml")] == ["config.yaml"]  # the refused run saved no config
    assert all(p.read_bytes() == b for p, b in before.items())
