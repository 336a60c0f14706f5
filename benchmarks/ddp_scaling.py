"""Data-parallel scaling of PPO and GRPO on the 7B shape: one GPU against two (Lightning DDP, NCCL).

Workload: the random-weight Qwen2.5-7B-shaped policy of ``benchmarks/_tiny_7b_assets.py`` with an
SFT-shaped LoRA (r=16, all seven projections), 64-token prompts, 128 new tokens forced, bf16,
gradient checkpointing, ``compile: true``, the 0.5B-shaped reward model through ``RewardModel``
(offloaded between rollouts), the CUDA-graph rollout engine.

- PPO as ``configs/c13_tox.yaml`` (value head, 4 epochs x 4 minibatches, micro-batch 16);
- GRPO as ``configs/algorithms/grpo.yaml`` with 8 samples per prompt (no critic, 1 epoch of 4
  minibatches, KL k3 in the loss, beta 0.04; micro-batch 32).

Runs, per algorithm ``A`` (``ppo``, ``grpo``):

- ``A-1gpu``: 64 prompts on one GPU, the baseline of both scalings;
- ``A-2gpu-weak``: 64 prompts per GPU (128 in all): the target is 2-GPU throughput >= 1.85x one GPU's;
- ``A-2gpu-strong``: 32 prompts per GPU (64 in all): the same rollout, split.

Each run is its own process (two ranks started by Lightning's DDP launcher); ``--iterations``
iterations, the first a warm-up (compilation, graph capture, NCCL set-up), steady = the mean of the
others. Per iteration: wall time and the module's phases (``time/*``, averaged over ranks),
samples (responses) and generated tokens per second over all GPUs, each GPU's peak memory
(``max_memory_allocated``, reset at the iteration's start), and each rank's time in collectives,
timed by CUDA events around every ``torch.distributed`` call: the gradient all-reduce (the one
whose size is the trained parameters') apart from all others (denominators, counts, gathers, the
logged scalars). A collective's time includes waiting for the slower rank. The result file is
rewritten after every iteration and the summary JSON after every run; runs whose turn comes with
less than ``--min-left`` seconds before ``--deadline`` are reported as not run.

    PYTHONPATH=. python benchmarks/ddp_scaling.py --json out.json                # 2 GPUs, all six runs
    PYTHONPATH=. python benchmarks/ddp_scaling.py --tiny --json /tmp/tiny.json   # CPU smoke test: gloo, 2 processes

``--tiny`` uses the tiny shapes (8 prompts per GPU, 4 for strong scaling, 12 new tokens) on the CPU,
one thread per process: it checks that every run, the timers and the JSON work; its times say
nothing about GPUs. On the GPUs, NCCL runs with the environment it is given (the two-GPU machine
of this workplace sets NCCL_NVLS_ENABLE=0: keep it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _tiny_7b_assets import FULL, TINY, build_assets  # noqa: E402
from ppo_iteration import _steady, _sync, _versions, fmt  # noqa: E402

from rlhf_lit.atomic_files import write_text_atomic  # noqa: E402

ALGOS = {"ppo": 1, "grpo": 8}  # samples per prompt
RUNS = tuple(f"{a}-{s}" for a in ALGOS for s in ("1gpu", "2gpu-weak", "2gpu-strong"))
ORDER = ("ppo-1gpu", "ppo-2gpu-weak", "grpo-1gpu", "grpo-2gpu-weak", "ppo-2gpu-strong", "grpo-2gpu-strong")
TARGET_WEAK = 1.85
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "reduce_scatter_tensor")


def parse_run(name: str) -> tuple[str, int, str]:
    """``grpo-2gpu-weak`` -> ("grpo", 2, "weak"); the 1-GPU run is the baseline ("base")."""
    algo, gpus, *scaling = name.split("-")
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; expected some of {RUNS}")
    return algo, int(gpus[0]), scaling[0] if scaling else "base"


def prompts_per_rank(name: str, tiny: bool) -> int:
    batch = (TINY if tiny else FULL).batch
    _, gpus, scaling = parse_run(name)
    return batch // gpus if scaling == "strong" else batch


def _is_rank_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


class CollectiveTimer:
    """Times every ``torch.distributed`` collective of this process while active: CUDA events on
    the current stream (whose wait on NCCL's stream ends after the collective), perf_counter on the
    CPU. ``grad_numel``: the size of the flat gradient all-reduce, told apart from the others."""

    def __init__(self, cuda: bool) -> None:
        import torch.distributed as dist

        self.cuda, self.active, self.grad_numel, self.records = cuda, False, -1, []
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._timed(name, fn))

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            kind = "grad" if name == "all_reduce" and t is not None and t.numel() == self.grad_numel else "other"
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.records.append((kind, start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.records.append((kind, t0, time.perf_counter()))
            return out
        return call

    def take(self) -> dict:
        """Seconds and calls of the gradient all-reduce and of the other collectives since the last take."""
        _sync()
        out = {"grad_allreduce_s": 0.0, "grad_allreduce_calls": 0, "other_collectives_s": 0.0, "other_collectives_calls": 0}
        for kind, a, b in self.records:
            sec = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            key = "grad_allreduce" if kind == "grad" else "other_collectives"
            out[f"{key}_s"] += sec
            out[f"{key}_calls"] += 1
        self.records = []
        return out


def worker(args, result: dict, save) -> None:  # noqa: C901
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy

    from rlhf_lit.data import PromptDataModule
    from rlhf_lit.model import PolicyConfig
    from rlhf_lit.parallel import gather_per_rank
    from rlhf_lit.rewards.reward_model import RewardModel
    from rlhf_lit.rollout import SamplingConfig
    from rlhf_lit.stages import PPOConfig, PPOModule

    algo, gpus, scaling = parse_run(args.worker)
    shapes, cuda = (TINY if args.tiny else FULL), torch.cuda.is_available() and not args.tiny
    n, batch = ALGOS[algo], prompts_per_rank(args.worker, args.tiny)
    a = Path(args.assets)
    timer = CollectiveTimer(cuda)
    if algo == "ppo":
        minibatch = batch // 4
        micro = min(args.ppo_micro_batch or (1 if args.tiny else 16), minibatch)
        ppo = PPOConfig(ppo_epochs=4, num_minibatches=4, micro_batch_size=micro)
        critic, temperature = "value_head", 0.7
    else:
        minibatch = batch * n // 4
        micro = min(args.grpo_micro_batch or (4 if args.tiny else 32), minibatch)
        ppo = PPOConfig(adv_estimator="grpo", samples_per_prompt=n, ppo_epochs=1, num_minibatches=4,
                        micro_batch_size=micro, kl_in="loss", kl_estimator="k3", kl_coef=0.04,
                        loss_agg_mode="seq-mean-token-mean", norm_adv_by_std=True)
        critic, temperature = "none", 1.0
    result.update(algo=algo, gpus=gpus, scaling=scaling, prompts_per_gpu=batch, prompts_total=batch * gpus,
                  samples_per_prompt=n, responses_total=batch * gpus * n, micro_batch=micro, minibatch_per_gpu=minibatch)
    iters: list[dict] = []

    class Recorder(Callback):
        def on_train_start(self, trainer, pl_module):
            timer.grad_numel = sum(p.numel() for _, p in pl_module.model.trainable_named_parameters())
            result["trained_params"] = timer.grad_numel
            result["load_s"] = time.perf_counter() - t_start

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            timer.take()
            timer.active, self.t0 = True, time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            _sync()
            wall = time.perf_counter() - self.t0
            timer.active = False
            mine = {"wall_s": wall, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                    **timer.take()}
            ranks = gather_per_rank(mine)  # every rank's figures (a collective, outside the timing)
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            wall = max(r["wall_s"] for r in ranks)
            row = {"wall_s": wall, **{k: m.get(f"time/{k}") for k in ("iteration_s", "rollout_s", "reward_s",
                                                                       "ref_values_s", "update_s")},
                   "samples_per_s": batch * gpus * n / wall, "tokens_per_s": batch * gpus * n * shapes.new_tokens / wall,
                   "peak_gib_per_gpu": [r["peak_gib"] for r in ranks],
                   "grad_allreduce_s": max(r["grad_allreduce_s"] for r in ranks),
                   "grad_allreduce_calls": ranks[0]["grad_allreduce_calls"],
                   "other_collectives_s": max(r["other_collectives_s"] for r in ranks),
                   "other_collectives_calls": ranks[0]["other_collectives_calls"],
                   "kl": m.get("objective/kl"), "ratio_first_minibatch": m.get("val/ratio_first_minibatch")}
            iters.append(row)
            result.update(iterations=iters, steady=_steady(iters), engine=pl_module.engine.name)
            save()
            if _is_rank_zero():
                print(f"[{args.worker}] iteration {len(iters)}: " + ", ".join(
                    f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    t_start = time.perf_counter()
    module = PPOModule(
        policy=PolicyConfig(base_model=str(a / "base"), sft_adapter=str(a / "sft_adapter"), quantization="none",
                            dtype="bfloat16" if cuda else "float32", gradient_checkpointing=True, compile=cuda,
                            critic=critic),
        reward=RewardModel(model_path=str(a / "reward"), input="chat", batch_size=64,
                           dtype="bfloat16" if cuda else "float32", max_length=512, offload=cuda),
        ppo=ppo,
        sampling=SamplingConfig(max_new_tokens=shapes.new_tokens, min_new_tokens=shapes.new_tokens,
                                temperature=temperature),
        rollout_engine="auto" if cuda else "hf", rollout_batch_size=batch, log_samples=0, seed=0,
        output_dir=str(Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.assets)) / "adapter"),
    )
    data = PromptDataModule(prompt_file=str(a / "prompts.jsonl"), tokenizer=str(a / "base"), system_prompt=None,
                            batch_size=batch, max_prompt_tokens=256, val_fraction=0.0, test_fraction=0.0, seed=0)
    strategy = DDPStrategy(process_group_backend="nccl" if cuda else "gloo") if gpus > 1 else "auto"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=gpus, strategy=strategy,
                        precision="bf16-mixed" if cuda else "32-true", max_epochs=1,
                        limit_train_batches=args.iterations, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=args.assets, callbacks=[Recorder()])
    trainer.fit(module, datamodule=data)
    del trainer, module
    gc.collect()


def run_worker(args) -> int:
    result = {"name": args.worker, "ok": False, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              and not args.tiny else "cpu"}

    def save():
        if _is_rank_zero():  # the other rank runs this same script (Lightning's launcher)
            write_text_atomic(Path(args.result), json.dumps(result, indent=1, default=str))

    try:
        if args.worker == "build":
            shapes = TINY if args.tiny else FULL
            device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
            t = time.perf_counter()
            result["assets"] = build_assets(args.assets, shapes, device,
                                            n_prompts=2 * shapes.batch * max(args.iterations + 1, 8))
            result["build_s"] = time.perf_counter() - t
        else:
            worker(args, result, save)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is a result row
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
    result["versions"] = _versions()
    save()
    return 0 if result["ok"] else 1


def spawn(args, name: str, timeout: float) -> dict:
    """Run one worker (and the rank Lightning starts beside it) in a new process group, killed
    whole at the time limit."""
    out = Path(args.assets) / f"ddp-result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--assets", args.assets, "--result", str(out),
           "--iterations", str(args.iterations)] + (["--tiny"] if args.tiny else []) \
        + (["--ppo-micro-batch", str(args.ppo_micro_batch)] if args.ppo_micro_batch else []) \
        + (["--grpo-micro-batch", str(args.grpo_micro_batch)] if args.grpo_micro_batch else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.tiny:  # the CPU: one thread per process, so one and two processes compare on equal terms
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    print(f"\n=== {name} (timeout {timeout:.0f} s) ===", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and the rank its launcher started
        proc.wait()
        rc = "timeout"
    res = json.loads(out.read_text()) if out.is_file() else {"name": name, "ok": False}
    if rc == "timeout":
        res.update(ok=False, error=f"timed out after {timeout:.0f} s ({len(res.get('iterations', []))} iterations)")
    elif rc != 0 and res.get("ok"):
        res.update(ok=False, error=f"exit status {rc}")
    res["process_wall_s"] = time.perf_counter() - t
    print(f"=== {name}: {'ok' if res.get('ok') else 'FAILED: ' + str(res.get('error'))[:300]} "
          f"({res['process_wall_s']:.0f} s) ===", flush=True)
    return res


def analyse(results: dict) -> tuple[str, dict]:
    """The markdown table and the scaling ratios (throughput for weak scaling, time for strong)."""
    head = ("| run | GPUs | prompts / GPU (in all) | s / iteration | rollout | reward | ref + values | update | "
            "grad all-reduce s | other collectives s (calls) | samples / s | peak GiB per GPU | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows, steady = [head], {}
    for name in [r for r in ORDER if r in results]:
        r = results[name]
        iters = r.get("iterations") or []
        if not iters:
            rows.append(f"| {name} | | | failed | | | | | | | | | {str(r.get('error', ''))[:160].replace('|', '/')} |")
            continue
        s = steady[name] = _steady(iters)
        peaks = [max((it["peak_gib_per_gpu"][g] or 0.0) for it in iters[1:] or iters)
                 for g in range(len(iters[0]["peak_gib_per_gpu"]))] if iters[0]["peak_gib_per_gpu"][0] is not None else []
        note = f"steady = mean of {len(iters) - 1}" if len(iters) > 1 else "warm-up only"
        if not r.get("ok"):
            note += "; " + str(r.get("error", ""))[:120].replace("|", "/")
        rows.append(f"| {name} | {r.get('gpus')} | {r.get('prompts_per_gpu')} ({r.get('prompts_total')}) | "
                    f"{fmt(s.get('wall_s'), '.2f')} | {fmt(s.get('rollout_s'), '.2f')} | {fmt(s.get('reward_s'), '.2f')} | "
                    f"{fmt(s.get('ref_values_s'), '.2f')} | {fmt(s.get('update_s'), '.2f')} | "
                    f"{fmt(s.get('grad_allreduce_s'), '.3f')} ({iters[-1]['grad_allreduce_calls']}) | "
                    f"{fmt(s.get('other_collectives_s'), '.3f')} ({iters[-1]['other_collectives_calls']}) | "
                    f"{fmt(s.get('samples_per_s'), '.1f')} | {' / '.join(fmt(p) for p in peaks) or '-'} | {note} |")
    ratios = {}
    for algo in ALGOS:
        base = steady.get(f"{algo}-1gpu")
        weak, strong = steady.get(f"{algo}-2gpu-weak"), steady.get(f"{algo}-2gpu-strong")
        if base and weak:
            ratios[f"{algo}/weak_throughput_2gpu_over_1gpu"] = weak["samples_per_s"] / base["samples_per_s"]
            ratios[f"{algo}/weak_target_met"] = ratios[f"{algo}/weak_throughput_2gpu_over_1gpu"] >= TARGET_WEAK
        if base and strong:
            ratios[f"{algo}/strong_speedup_2gpu_over_1gpu"] = base["wall_s"] / strong["wall_s"]
    return "\n".join(rows), ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(ORDER), help=f"comma-separated, run in this order; of {RUNS}")
    ap.add_argument("--iterations", type=int, default=3, help="iterations per run (the first is the warm-up)")
    ap.add_argument("--ppo-micro-batch", type=int, default=0, help="PPO micro-batch (default 16; tiny: 1)")
    ap.add_argument("--grpo-micro-batch", type=int, default=0, help="GRPO micro-batch (default 32; tiny: 4)")
    ap.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "rlhf_lit_ddp_bench"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (gloo, 2 processes): a smoke test")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--deadline", type=float, default=0, help="start no run after this many seconds (0: none)")
    ap.add_argument("--min-left", type=float, default=60, help="a run needs this many seconds before the deadline")
    ap.add_argument("--json", default="", help="write the summary here (after every run)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    t0 = time.perf_counter()
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        parse_run(r)
    if not args.tiny and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 CUDA GPUs (found {torch.cuda.device_count()}); --tiny runs on the CPU")
    if args.tiny:
        args.assets += "_tiny"
    results = {"build": spawn(args, "build", min(600, args.deadline or 600))}
    summary = {}
    if results["build"].get("ok"):
        for name in runs:
            left = args.deadline - (time.perf_counter() - t0) if args.deadline else float("inf")
            if left < args.min_left:
                results[name] = {"name": name, "ok": False, "error": f"not run: {left:.0f} s left before the deadline"}
            else:
                results[name] = spawn(args, name, min(args.timeout, left))
            summary = write_summary(args, results)
    else:
        summary = write_summary(args, results)
    print("\n" + summary["table_markdown"])
    print(json.dumps(summary["ratios"], indent=1))
    return 0 if all(r.get("ok") for r in results.values()) else 1


def write_summary(args, results: dict) -> dict:
    table, ratios = analyse(results)
    shapes = TINY if args.tiny else FULL
    any_ok = next((r for r in results.values() if r.get("versions")), {})
    summary = {"date": _dt.date.today().isoformat(), "device": any_ok.get("device"), "versions": any_ok.get("versions"),
               "workload": {"prompt_tokens": shapes.prompt_tokens, "new_tokens": shapes.new_tokens,
                            "prompts_per_gpu_weak": shapes.batch, "prompts_total_strong": shapes.batch,
                            "iterations": args.iterations, "tiny": args.tiny, "target_weak": TARGET_WEAK},
               "results": results, "table_markdown": table, "ratios": ratios}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    sys.exit(main())
