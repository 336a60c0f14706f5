"""One PPO iteration on a 7B-shaped policy: rlhf_lit (nf4 and bf16) beside TRL 1.12's PPOTrainer.

Workload (both frameworks): a randomly initialised model of the exact Qwen2.5-7B-Instruct shape,
an SFT-shaped LoRA (r=16, alpha 16, all seven projections), 64 prompts of 64 tokens, 128 new
tokens forced (min_new_tokens = max_new_tokens = 128), 4 PPO epochs x 4 minibatches of 16
(micro-batch 8), gradient checkpointing, bf16. Reward: a 0.5B-shaped (Qwen2 0.5B) sequence
classifier with one output, through our ``RewardModel`` backend for rlhf_lit and as TRL's
``reward_model`` (the same folder). TRL also needs a value model: another 0.5B-shaped classifier,
trained in full (ours is a value head on the policy). TRL's reference is the policy with the
adapter disabled; ours is the frozen SFT adapter on the same base weights.

rlhf_lit runs through its own code: ``PPOModule`` + ``PromptDataModule`` over a prompt JSONL, in
a Lightning ``Trainer(precision="bf16-mixed")`` with ``limit_train_batches``; the split comes from
the module's own metrics (``time/rollout_s``, ``time/reward_s``, ``time/ref_values_s``,
``time/update_s``). TRL runs ``trl.experimental.ppo.PPOTrainer.train`` with its rollout
(``batch_generation``), reward and value calls (``get_reward``) and first training forward timed
by wrapping its module-level functions (a CUDA synchronize at each boundary).

Every run is its own subprocess (clean memory figures; a crash or timeout costs one row). Each
does ``--iterations`` PPO iterations; the first is the warm-up (allocator, cuBLAS, graph capture,
clocks), steady state = the mean of the others. Peak memory = ``torch.cuda.max_memory_allocated``
over the whole process (model loading included); per-iteration peaks are in the JSON.

    PYTHONPATH=. python benchmarks/ppo_iteration.py --json out.json     # all four runs (H100: ~9 min)
    PYTHONPATH=. python benchmarks/ppo_iteration.py --runs ours-bf16,trl-bf16,trl-nf4 --json a.json  # ~6 min
    PYTHONPATH=. python benchmarks/ppo_iteration.py --runs ours-nf4 --json b.json                    # ~3.5 min
    PYTHONPATH=. python benchmarks/ppo_iteration.py --tiny --runs ours-bf16,ours-bf16-nockpt --profile-update  # CPU smoke test

Floors: the first subprocess (``build``) measures the card's copy bandwidth and bf16 matmul rate
(``benchmarks/floors.py``; once per invocation, on an idle card) and counts the policy's parameters
and decode-step bytes from its shape. Each run's ``floor s`` is the compute floor of its iteration
(``floors.ppo_iteration_floor``: forward FLOPs per token = 2 x (non-embedding parameters + LM head
+ LoRA); two experience forwards and, per epoch, forward + input-gradient backward (+ the recompute
when the run checkpoints) over 64 x 192 tokens at the matmul rate; the prompt pass; 127 decode steps
at the roofline floor of weights + KV cache read and 2 x parameters x 64 FLOPs); ``fraction of
floor`` = floor / steady s per iteration. Both are in the JSON (``floors``; each run's ``floor``).

A run stopped at its time limit keeps the iterations it finished (the worker rewrites its result
file after every iteration); the table marks it.

Options of our runs: ``--gradient-checkpointing on|off`` (default on) and ``--micro-batch N`` (default
8; tiny: 1). The run ``ours-<q>-nockpt`` (e.g. ``ours-bf16-nockpt``) is the same run with checkpointing
off and ``--nockpt-micro-batch`` (default 16, clamped to the minibatch size), so one invocation
measures both. ``--profile-update`` (default run: ``ours-bf16``) adds one extra iteration after the
timed ones whose update phase (``PPOModule.ppo_update``) runs under ``torch.profiler`` (CPU + CUDA)
for its first ``--profile-steps`` optimizer steps (default 2 of 16, all alike; 0: the whole phase,
whose ~2.5M events take minutes to tabulate); that iteration is left out of the steady state and the
peaks, and the top-25 ops by CUDA time (and by self CUDA time, plus kernel time by kind) are written
next to the JSON (``<json stem>.update_profile-<run>.txt``):

    PYTHONPATH=. python benchmarks/ppo_iteration.py --runs ours-bf16,ours-bf16-nockpt,trl-bf16 \
        --profile-update --json /tmp/a.json

Needs bitsandbytes for nf4 and trl==1.12.0 (+ datasets) for the TRL rows; a row whose imports fail
is reported as failed, the others still run. Without a CUDA GPU the nf4 rows are skipped, and the
TRL rows too unless ``--tiny`` is given and trl is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
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

from _tiny_7b_assets import FULL, TARGETS, TINY, Shapes, build_assets, qwen2_config, templated_ids  # noqa: E402
from floors import describe, measure_floors, ppo_iteration_floor, shape_counts  # noqa: E402

from rlhf_lit.atomic_files import write_text_atomic  # noqa: E402

RUNS = ("ours-nf4", "ours-bf16", "ours-bf16-nockpt", "trl-bf16", "trl-nf4")
_SAVE = lambda: None  # noqa: E731 - set by run_worker: writes the result file (after every iteration too)
# TRL 1.12 on this workload, H100 80GB, measured earlier (docs/notes: performance.md).
TRL_NOTES_BASELINE = {"iteration_s": 21.1, "peak_gib": 41.7}


# =============================================================================================
# helpers
# =============================================================================================
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "lightning", "bitsandbytes", "trl", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def _steady(iters: list[dict]) -> dict:
    timed = iters[1:] if len(iters) > 1 else iters
    keys = sorted({k for it in timed for k, v in it.items() if isinstance(v, (int, float))})
    out = {}
    for k in keys:
        vals = [it[k] for it in timed if isinstance(it.get(k), (int, float))]
        if vals:
            out[k] = max(vals) if k.startswith("peak") else sum(vals) / len(vals)
    return out


def _shapes(tiny: bool) -> Shapes:
    return TINY if tiny else FULL


VARIANTS = {"ours": ("nockpt", "compile", "offload", "critic", "merged", "amb"), "trl": ("asis",)}


def _parse_run(name: str) -> tuple[str, str, list[str]]:
    """``ours-bf16-nockpt-compile`` -> ("ours", "bf16", ["nockpt", "compile"]).

    Variants: ``nockpt`` (ours: checkpointing off, ``--nockpt-micro-batch``), ``compile`` (ours:
    ``policy.compile``), ``offload`` (ours: the reward model's ``offload``), ``critic`` (ours: ``policy.critic:
    adapter``, the critic as its own LoRA adapter), ``merged`` (ours: ``rollout_engine: cuda_graph_merged``), ``amb``
    (ours: ``policy.activation_memory_budget`` = ``--activation-memory-budget``, with ``compile`` and
    ``nockpt``), ``asis`` (TRL as its users get it: its ignored checkpointing flag left alone)."""
    framework, quantization, *variants = name.split("-") + [""] * (2 - len(name.split("-")))
    if framework not in VARIANTS or quantization not in ("bf16", "nf4") or \
            any(v not in VARIANTS[framework] for v in variants):
        raise ValueError(f"unknown run {name!r} (expected <ours|trl>-<bf16|nf4>[-<variant>...], variants: {VARIANTS})")
    if "amb" in variants and not {"nockpt", "compile"} <= set(variants):
        raise ValueError(f"run {name!r}: the amb variant needs nockpt and compile (the budget applies to "
                         "compiled layers without gradient checkpointing), e.g. ours-bf16-nockpt-compile-amb")
    return framework, quantization, variants


def _trl_checkpointing(args, name: str) -> str:
    return "config" if "asis" in _parse_run(name)[2] else args.trl_checkpointing


def _ours_settings(args, name: str) -> tuple[bool, int]:
    """(gradient checkpointing, micro-batch) of one of our runs."""
    shapes = _shapes(args.tiny)
    minibatch = shapes.batch // 4
    _, _, variants = _parse_run(name)
    if "nockpt" in variants:
        ckpt, micro = False, args.nockpt_micro_batch
    else:
        ckpt, micro = args.gradient_checkpointing == "on", args.micro_batch or shapes.micro_batch
    micro = min(micro, minibatch)
    if minibatch % micro:
        raise ValueError(f"micro-batch {micro} does not divide the minibatch size {minibatch}")
    return ckpt, micro


def _profile_runs(args) -> set[str]:
    return {r for r in (args.profile_update or "").split(",") if r}


def _profile_path(args, name: str) -> Path:
    base = Path(args.json) if args.json else Path(args.assets) / "ppo.json"
    return base.with_name(f"{base.stem}.update_profile-{name}.txt")


def _categorize(kernel: str) -> str:
    k = kernel.lower()
    if any(t in k for t in ("gemm", "xmma", "cutlass", "cublas", "matmul", "gemv", "sm90_", "sm80_", "nvjet")):
        return "GEMM (matmul kernels)"
    if any(t in k for t in ("flash", "fmha", "attention", "cudnn")):
        return "attention (SDPA fwd/bwd)"
    if "softmax" in k:
        return "softmax / log-softmax"
    if any(t in k for t in ("reduce", "norm")):
        return "reductions / norms"
    if any(t in k for t in ("elementwise", "vectorized", "unrolled", "copy", "fill", "cat", "index", "gather",
                            "scatter", "multi_tensor", "foreach")):
        return "elementwise / copies / optimizer"
    return "other"


def write_update_profile(prof, path: Path, name: str, wall_s: float, scope: str = "the whole phase",
                         scale: float = 1.0, top: int = 25) -> dict:
    """Top ops by CUDA time (and by self CUDA time) of one profiled update phase, plus kernels by kind."""
    t = time.perf_counter()
    ka = prof.key_averages()
    def tbl(sort):
        try:
            return ka.table(sort_by=sort, row_limit=top, max_name_column_width=90)
        except (AttributeError, KeyError, ValueError):  # newer names: device_time_total
            return ka.table(sort_by=sort.replace("cuda", "device"), row_limit=top, max_name_column_width=90)
    dev = lambda e, attr: getattr(e, attr.replace("cuda", "device"), None) or getattr(e, attr, 0) or 0  # noqa: E731
    kernels = [e for e in ka if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1"))]
    kernel_us = sum(dev(e, "self_cuda_time_total") for e in kernels)
    groups: dict[str, list[float]] = {}
    for e in kernels:
        g = groups.setdefault(_categorize(e.key), [0.0, 0])
        g[0] += dev(e, "self_cuda_time_total")
        g[1] += e.count
    n_kernels = sum(e.count for e in kernels)
    lines = [
        f"# {name}: one steady-state update phase (PPOModule.ppo_update) under torch.profiler (CPU + CUDA)",
        f"# profiled: {scope}",
        f"# wall of the profiled part: {wall_s:.2f} s (profiler overhead included); "
        f"kernel time: {kernel_us / 1e6:.2f} s in {n_kernels} kernels "
        f"(x {scale:g} for the whole phase: {kernel_us * scale / 1e6:.2f} s)",
        "",
        "## kernel time by kind",
        "| kind | s | share | kernels |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {k} | {us / 1e6:.3f} | {us / max(kernel_us, 1e-9):.1%} | {n} |")
    lines += ["", f"## top {top} by cuda_time_total (ops include their children's kernels)", tbl("cuda_time_total"),
              "", f"## top {top} by self_cuda_time_total", tbl("self_cuda_time_total")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"file": str(path), "scope": scope, "scale": scale, "wall_s": wall_s, "kernel_s": kernel_us / 1e6,
            "kernels": n_kernels, "events": len(prof.events()),
            "by_kind_s": {k: v[0] / 1e6 for k, v in groups.items()}, "postprocess_s": time.perf_counter() - t}


# =============================================================================================
# workers (each in its own process)
# =============================================================================================
def worker_build(args, result: dict) -> None:
    shapes = _shapes(args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    assets = build_assets(args.assets, shapes, device, n_prompts=shapes.batch * (args.iterations + 2))
    result.update(assets=assets, build_s=time.perf_counter() - t)
    # once per invocation, on a card no run holds yet. Our runs hold bf16 weights on a GPU and fp32 ones
    # on the CPU, where --precision bf16-mixed (the default) still runs the matmuls in bf16 (autocast).
    mm_dtype = torch.bfloat16 if device == "cuda" or args.precision.startswith("bf16") else torch.float32
    result["floors"] = measure_floors(device, mm_dtype)
    result["policy_counts"] = _policy_counts(shapes, Path(args.assets), 2 if device == "cuda" else 4)
    print(f"floors: {describe(result['floors'])}", flush=True)


def _policy_counts(shapes: Shapes, assets: Path, dtype_bytes: int) -> dict:
    """``floors.shape_counts`` of the policy's shape with the SFT adapter's rank and projections."""
    lora = json.loads((assets / "sft_adapter" / "adapter_config.json").read_text())
    return shape_counts(qwen2_config(shapes.policy, shapes), lora["r"], lora["target_modules"], dtype_bytes)


def iteration_floor(args, name: str, r: dict, build: dict) -> dict | None:
    """The compute floor of run ``name``'s iteration (``floors.ppo_iteration_floor``) and the fraction
    floor / steady s per iteration; ``None`` without the build's floors."""
    floors, counts = build.get("floors"), build.get("policy_counts")
    if not floors or not counts:
        return None
    framework, quantization, _ = _parse_run(name)
    ck = r.get("gradient_checkpointing")
    if ck is None:
        ck = _ours_settings(args, name)[0] if framework == "ours" else _trl_checkpointing(args, name)
    shapes, pol = _shapes(args.tiny), _shapes(args.tiny).policy
    out = ppo_iteration_floor(
        params=counts["params"], weight_bytes=counts["weight_bytes"][quantization], batch=shapes.batch,
        prompt_len=shapes.prompt_tokens, new_tokens=shapes.new_tokens, layers=pol["num_hidden_layers"],
        kv_heads=pol["num_key_value_heads"], head_dim=pol["hidden_size"] // pol["num_attention_heads"],
        dtype_bytes=counts["dtype_bytes"], epochs=4, recompute=ck in (True, "model"), floors=floors)
    steady = _steady(r.get("iterations", [])).get("iteration_s") if len(r.get("iterations", [])) >= 2 else None
    out["fraction"] = out["total_s"] / steady if steady else None
    return out


def worker_ours(args, result: dict, quantization: str) -> None:  # noqa: C901
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from rlhf_lit.data import PromptDataModule
    from rlhf_lit.stages import PPOConfig, PPOModule
    from rlhf_lit.model import PolicyConfig
    from rlhf_lit.rewards.reward_model import RewardModel
    from rlhf_lit.rollout import SamplingConfig

    shapes = _shapes(args.tiny)
    cuda = torch.cuda.is_available()
    a = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.assets))
    iters: list[dict] = []
    ckpt, micro = _ours_settings(args, args.worker)
    profiling = args.worker in _profile_runs(args)
    n_batches = args.iterations + (1 if profiling else 0)  # the profiled iteration comes after the timed ones
    variants = _parse_run(args.worker)[2]
    result.update(gradient_checkpointing=ckpt, micro_batch=micro, compile="compile" in variants,
                  reward_offload="offload" in variants, critic="adapter" if "critic" in variants else "value_head",
                  rollout_lora_merged="merged" in variants,
                  activation_memory_budget=args.activation_memory_budget if "amb" in variants else None)

    class Recorder(Callback):
        def on_train_start(self, trainer, pl_module):
            _sync()
            result["load_s"] = time.perf_counter() - t_start
            result["peak_after_load_gib"] = _peak_gib()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            wall = time.perf_counter() - self.t0
            if profiling and batch_idx == n_batches - 1:  # not a timed iteration
                result.setdefault("profiled_iteration", {}).update(
                    wall_s=wall, peak_gib=_peak_gib(),
                    **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")})
                _SAVE()
                return
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            row = {
                "wall_s": wall,
                "iteration_s": m.get("time/iteration_s"),
                "rollout_s": m.get("time/rollout_s"),
                "reward_s": m.get("time/reward_s"),
                "ref_values_s": m.get("time/ref_values_s"),
                "update_s": m.get("time/update_s"),
                "tokens_per_sec": m.get("perf/tokens_per_sec"),
                "peak_gib": _peak_gib(),
                "peak_rollout_gib": m.get("perf/peak_mem_rollout_gb"),
                "response_length": m.get("response/length_mean"),
                "ratio_first_minibatch": m.get("val/ratio_first_minibatch"),
                "loss_policy": m.get("loss/policy_avg"),
                "kl": m.get("objective/kl"),
            }
            iters.append(row)
            result["iterations"] = iters
            result["engine"] = pl_module.engine.name  # after the rollout: an 'auto' fallback shows
            if row["peak_gib"] is not None:
                result["peak_gib"] = max(result.get("peak_gib") or 0.0, row["peak_gib"])
            result["steady"] = _steady(iters)
            _SAVE()
            print(f"[{result['name']}] iteration {len(iters)}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    t_start = time.perf_counter()
    module = PPOModule(
        policy=PolicyConfig(base_model=str(a / "base"), sft_adapter=str(a / "sft_adapter"), quantization=quantization,
                            dtype="bfloat16" if cuda else "float32", gradient_checkpointing=ckpt,
                            compile="compile" in variants, critic="adapter" if "critic" in variants else "value_head",
                            activation_memory_budget=args.activation_memory_budget if "amb" in variants else None),
        reward=RewardModel(model_path=str(a / "reward"), input="chat", batch_size=shapes.batch,
                           dtype="bfloat16" if cuda else "float32", max_length=512,
                           offload="offload" in variants),
        ppo=PPOConfig(ppo_epochs=4, num_minibatches=4, micro_batch_size=micro),
        sampling=SamplingConfig(max_new_tokens=shapes.new_tokens, min_new_tokens=shapes.new_tokens, temperature=0.7),
        rollout_engine="cuda_graph_merged" if "merged" in variants else args.engine,
        rollout_batch_size=shapes.batch,
        output_dir=str(work / "adapter"),
        log_samples=0,
        seed=0,
    )
    data = PromptDataModule(prompt_file=str(a / "prompts.jsonl"), tokenizer=str(a / "base"), system_prompt=None,
                            batch_size=shapes.batch, max_prompt_tokens=256, val_fraction=0.0, test_fraction=0.0,
                            seed=0)
    if profiling:
        _wrap_update_with_profiler(module, args, result, n_batches)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_epochs=1,
        limit_train_batches=n_batches, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(work), callbacks=[Recorder()],
    )
    trainer.fit(module, datamodule=data)
    result["peak_gib"] = max(result.get("peak_gib") or 0.0, _peak_gib() or 0.0) if cuda else None
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    result["steady"] = _steady(iters)


def _wrap_update_with_profiler(module, args, result: dict, n_batches: int) -> None:
    """Run the ``n_batches``-th call of ``module.ppo_update`` (the last iteration) under torch.profiler.

    The profiler stops after ``--profile-steps`` optimizer steps of that phase (0: it covers the whole
    phase). Every optimizer step of the phase does the same work (2 micro-batches of 8 x 192 tokens
    by default), and the profiler's post-processing costs ~20-60 us per event on the host: the whole
    phase (~2.5M CPU-op and kernel events with checkpointing) would take minutes to tabulate.
    """
    from torch.profiler import ProfilerActivity, profile

    orig = module.ppo_update
    calls = [0]

    def ppo_update(rollout):
        calls[0] += 1
        if calls[0] != n_batches:
            return orig(rollout)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        prof = profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)
        optimizer = module.trainer.optimizers[0]
        state = {"steps": 0, "stopped_at": None}

        def after_step(*_):
            state["steps"] += 1
            if state["steps"] == args.profile_steps and state["stopped_at"] is None:
                _sync()
                prof.stop()
                state["stopped_at"] = time.perf_counter()

        handle = optimizer.register_step_post_hook(after_step)
        _sync()
        t = time.perf_counter()
        prof.start()
        try:
            out = orig(rollout)
            _sync()
        finally:
            handle.remove()
            if state["stopped_at"] is None:
                prof.stop()
                state["stopped_at"] = time.perf_counter()
        phase_wall = time.perf_counter() - t
        wall = state["stopped_at"] - t
        steps = min(state["steps"], args.profile_steps) if args.profile_steps else state["steps"]
        print(f"[{args.worker}] profiled update phase: {phase_wall:.2f} s ({state['steps']} optimizer steps), "
              f"profiler over the first {steps} step(s): {wall:.2f} s; writing the profile table", flush=True)
        try:
            result["update_profile"] = write_update_profile(
                prof, _profile_path(args, args.worker), args.worker, wall,
                scope=f"the first {steps} of the phase's {state['steps']} optimizer steps "
                      f"(whole phase under the profiler: {phase_wall:.2f} s)",
                scale=state["steps"] / max(steps, 1))
            print(f"[{args.worker}] update profile: {result['update_profile']}", flush=True)
        except Exception as e:  # noqa: BLE001 - the timed iterations stand without it
            result["update_profile"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        _SAVE()
        return out

    module.ppo_update = ppo_update


def worker_trl(args, result: dict, quantization: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    shapes = _shapes(args.tiny)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    a = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix=f"trl-{quantization}-", dir=args.assets))
    iters: list[dict] = []
    phase = {"gen": 0.0, "reward": 0.0, "gen_end": None, "update_start": None}

    # --- phase timers around TRL's module-level functions -----------------------------------
    orig_batch_generation, orig_get_reward, orig_forward = trl_ppo.batch_generation, trl_ppo.get_reward, trl_ppo.forward

    def batch_generation(*a_, **k_):
        _sync()
        t = time.perf_counter()
        out = orig_batch_generation(*a_, **k_)
        _sync()
        phase["gen_end"] = time.perf_counter()
        phase["gen"] += phase["gen_end"] - t
        return out

    def get_reward(model, *a_, **k_):
        if model is not reward_model:
            return orig_get_reward(model, *a_, **k_)
        _sync()
        t = time.perf_counter()
        out = orig_get_reward(model, *a_, **k_)
        _sync()
        phase["reward"] += time.perf_counter() - t
        return out

    def forward(model, *a_, **k_):
        if phase["update_start"] is None and hasattr(model, "value_model"):  # the first training forward
            _sync()
            phase["update_start"] = time.perf_counter()
        return orig_forward(model, *a_, **k_)

    trl_ppo.batch_generation, trl_ppo.get_reward, trl_ppo.forward = batch_generation, get_reward, forward

    class Recorder(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            _sync()
            result["load_s"] = time.perf_counter() - t_start
            result["peak_after_load_gib"] = _peak_gib()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):
            _sync()
            t = time.perf_counter()
            n_tokens = shapes.batch * shapes.new_tokens
            gen_end = phase["gen_end"] or self.t0
            upd = phase["update_start"] or t
            row = {
                "iteration_s": t - self.t0,
                "rollout_s": phase["gen"],
                "reward_s": phase["reward"],
                "ref_values_s": max(upd - gen_end - phase["reward"], 0.0),
                "update_s": t - upd,
                "tokens_per_sec": n_tokens / phase["gen"] if phase["gen"] else None,
                "peak_gib": _peak_gib(),
            }
            logs = [h for h in state.log_history if "val/ratio" in h]
            if logs:
                row["val_ratio_logged"] = logs[-1]["val/ratio"]
            iters.append(row)
            result["iterations"] = iters
            result["steady"] = _steady(iters)
            print(f"[{result['name']}] iteration {len(iters)}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
            phase.update(gen=0.0, reward=0.0, gen_end=None, update_start=None)
            if cuda:
                result["peak_gib"] = max(result.get("peak_gib") or 0.0, row["peak_gib"])
                torch.cuda.reset_peak_memory_stats()
            _SAVE()
            self.t0 = time.perf_counter()

    result["engine"] = "HF generate (TRL)"
    trl_ckpt = _trl_checkpointing(args, args.worker)
    result["gradient_checkpointing"] = trl_ckpt
    result["micro_batch"] = shapes.micro_batch
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a / "base")
    tok.padding_side = "left"
    kw = dict(dtype=dtype)
    if cuda:
        kw["device_map"] = {"": 0}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    policy = AutoModelForCausalLM.from_pretrained(a / "base", **kw)
    # TRL 1.12's PPOTrainer never calls gradient_checkpointing_enable: PPOConfig(gradient_checkpointing=True),
    # its default, is silently ignored. "model" enables it on the policy (the workload asks for it);
    # "config" runs TRL as its users get it (no checkpointing in fact).
    if trl_ckpt == "model":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cls_kw = dict(dtype=dtype, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(a / "reward", **cls_kw)
    value_model = AutoModelForSequenceClassification.from_pretrained(a / "reward", **cls_kw)

    prompts = [json.loads(line)["prompt"] for line in (a / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_dict({"input_ids": [templated_ids(tok, p) for p in prompts]})
    config = PPOConfig(
        output_dir=str(work), per_device_train_batch_size=shapes.micro_batch,
        gradient_accumulation_steps=shapes.batch // shapes.micro_batch, num_mini_batches=4, num_ppo_epochs=4,
        total_episodes=shapes.batch * args.iterations, local_rollout_forward_batch_size=shapes.batch,
        response_length=shapes.new_tokens, temperature=0.7, kl_coef=0.05, learning_rate=1e-5,
        bf16=cuda, use_cpu=not cuda, report_to="none", num_sample_generations=0, save_strategy="no",
        logging_steps=1, seed=0, disable_tqdm=True, stop_token=None,
    )
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
        train_dataset=dataset, value_model=value_model, eval_dataset=dataset.select(range(shapes.batch)),
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
        callbacks=[Recorder()],
    )
    trainer.train()
    result["steady"] = _steady(iters)
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None


def run_worker(args) -> int:
    result = {"name": args.worker, "ok": False, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    path = Path(args.result)
    global _SAVE

    def save():
        write_text_atomic(path, json.dumps(result, indent=1, default=str))

    _SAVE = save

    try:
        if args.worker == "build":
            worker_build(args, result)
        else:
            framework, quantization, _ = _parse_run(args.worker)
            (worker_ours if framework == "ours" else worker_trl)(args, result, quantization)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is a result row
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback_tail"] = tb[-3000:]
        result["iterations_done"] = len(result.get("iterations", []))
        if torch.cuda.is_available():
            result["peak_gib_at_failure"] = _peak_gib()
    result["versions"] = _versions()
    save()
    return 0 if result["ok"] else 1


# =============================================================================================
# driver
# =============================================================================================
def spawn(args, name: str, timeout: float) -> dict:
    out = Path(args.assets) / f"result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--assets", args.assets, "--result", str(out),
           "--iterations", str(args.iterations), "--engine", args.engine, "--precision", args.precision,
           "--trl-checkpointing", args.trl_checkpointing, "--gradient-checkpointing", args.gradient_checkpointing,
           "--nockpt-micro-batch", str(args.nockpt_micro_batch), "--profile-update", args.profile_update or "",
           "--activation-memory-budget", str(args.activation_memory_budget),
           "--profile-steps", str(args.profile_steps),
           "--json", args.json] + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else []) \
        + (["--tiny"] if args.tiny else [])
    print(f"\n=== {name} (timeout {timeout:.0f} s) ===", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t
    res = json.loads(out.read_text()) if out.is_file() else {"name": name, "ok": False}
    if rc == "timeout":
        n = len(res.get("iterations", []))
        res.update(ok=False, error=f"timed out after {timeout:.0f} s ({n} iterations recorded)")
    res["process_wall_s"] = wall
    print(f"=== {name}: {'ok' if res.get('ok') else 'FAILED: ' + str(res.get('error'))[:300]} ({wall:.0f} s) ===",
          flush=True)
    return res


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _usable(r: dict) -> bool:
    """A finished run, or one cut short after at least one iteration past the warm-up."""
    return bool(r.get("ok")) or len(r.get("iterations", [])) >= 2


def table(results: dict) -> str:
    head = ("| run | rollout engine | ckpt / micro | s / iteration (steady) | rollout | reward | ref + values | update | "
            "first iteration | peak GiB | generated tokens/s | floor s | fraction of floor | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name, r in results.items():
        if name == "build":
            continue
        iters = r.get("iterations", [])
        ck = r.get("gradient_checkpointing")
        cm = "-" if ck is None else f"{'on' if ck in (True, 'model') else 'off'} / {r.get('micro_batch', '-')}"
        cm += " / compiled" if r.get("compile") else ""
        cm += " / reward offloaded" if r.get("reward_offload") else ""
        cm += " / critic adapter" if r.get("critic") == "adapter" else ""
        cm += " / rollout LoRA merged" if r.get("rollout_lora_merged") else ""
        cm += f" / activation budget {r['activation_memory_budget']}" if r.get("activation_memory_budget") else ""
        if not iters:
            err = str(r.get("error", "failed")).replace("|", "/").replace("\n", " ")[:160]
            rows.append(f"| {name} | {r.get('engine', '-')} | {cm} | failed | | | | | | "
                        f"{fmt(r.get('peak_gib_at_failure'))} | | {fmt((r.get('floor') or {}).get('total_s'), '.3g')} "
                        f"| | {err} |")
            continue
        s = _steady(iters)
        steady_ok = len(iters) >= 2
        note = "" if r.get("ok") else str(r.get("error", "")).replace("|", "/")[:160]
        if not steady_ok:
            note = (note + "; " if note else "") + "only the warm-up iteration: no steady state"
        n_timed = max(len(iters) - 1, 0)
        if steady_ok:
            note = (note + "; " if note else "") + f"steady = mean of {n_timed} iteration(s) after the warm-up"
        cell = (lambda k, f=".2f": fmt(s.get(k), f)) if steady_ok else (lambda k, f=".2f": "-")
        rows.append(
            f"| {name} | {r.get('engine', '-')} | {cm} | {cell('iteration_s')} | {cell('rollout_s')} | {cell('reward_s')} | "
            f"{cell('ref_values_s')} | {cell('update_s')} | {fmt(iters[0].get('iteration_s'), '.1f')} | "
            f"{fmt(r.get('peak_gib'))} | {cell('tokens_per_sec', '.0f')} | "
            f"{fmt((r.get('floor') or {}).get('total_s'), '.3g')} | {fmt((r.get('floor') or {}).get('fraction'), '.2f')} "
            f"| {note} |"
        )
    return "\n".join(rows)


def ratios(results: dict) -> dict:
    out = {}
    measured = {}  # label -> (s / iteration, peak GiB) of a TRL bf16 run made in this call
    for label, run in (("vs_trl_measured", "trl-bf16"), ("vs_trl_asis", "trl-bf16-asis")):
        trl = results.get(run, {})
        if _usable(trl):
            measured[label] = (_steady(trl["iterations"]).get("iteration_s"), trl.get("peak_gib"))
    baselines = list(measured.items()) + [
        ("vs_trl_notes", (TRL_NOTES_BASELINE["iteration_s"], TRL_NOTES_BASELINE["peak_gib"]))]
    for name in [n for n in results if n.startswith("ours-")]:
        r = results.get(name, {})
        if not _usable(r):
            continue
        t, m = _steady(r["iterations"]).get("iteration_s"), r.get("peak_gib")
        trl_q = results.get("trl-" + _parse_run(name)[1], {})
        if _usable(trl_q) and name.split("-")[1] != "bf16":  # the same precision, measured in the same call
            qt, qm = _steady(trl_q["iterations"]).get("iteration_s"), trl_q.get("peak_gib")
            if qt and t:
                out[f"{name}/speedup_vs_trl_same_precision"] = qt / t
            if qm and m:
                out[f"{name}/memory_fraction_vs_trl_same_precision"] = m / qm
        for label, (base_t, base_m) in baselines:
            if base_t and t:
                out[f"{name}/speedup_{label}"] = base_t / t
            if base_m and m:
                out[f"{name}/memory_fraction_{label}"] = m / base_m
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    ap.add_argument("--iterations", type=int, default=3, help="PPO iterations per run (the first is the warm-up)")
    ap.add_argument("--engine", default="auto", help="model.rollout_engine for rlhf_lit: auto, hf or cuda_graph")
    ap.add_argument("--trl-checkpointing", default="model", choices=["model", "config"],
                    help="model: enable gradient checkpointing on TRL's policy; config: only PPOConfig's flag, "
                         "which TRL 1.12's PPO ignores")
    ap.add_argument("--precision", default="bf16-mixed", help="Lightning precision of the rlhf_lit runs")
    ap.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"],
                    help="gradient checkpointing of our runs (the -nockpt runs: always off)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="micro-batch of our runs (default 8; tiny: 1); must divide the minibatch size (16)")
    ap.add_argument("--nockpt-micro-batch", type=int, default=16,
                    help="micro-batch of the ours-*-nockpt runs (clamped to the minibatch size)")
    ap.add_argument("--activation-memory-budget", type=float, default=0.5,
                    help="policy.activation_memory_budget of the -amb runs (with -compile and -nockpt)")
    ap.add_argument("--profile-update", nargs="?", const="ours-bf16", default="",
                    help="profile one steady-state update phase of these runs (comma-separated; "
                         "the flag alone: ours-bf16) in an extra iteration after the timed ones")
    ap.add_argument("--profile-steps", type=int, default=2,
                    help="the profiler covers this many optimizer steps of the profiled update phase "
                         "(of 16; 0: all of them)")
    ap.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "rlhf_lit_ppo_bench"),
                    help="where the random models, adapter and prompts are written (reused when present)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and workload (smoke test, CPU is fine)")
    ap.add_argument("--timeouts", default="ours-nf4=180,ours-bf16=240,ours-bf16-nockpt=150,trl-bf16=240,"
                                          "trl-nf4=300,build=150",
                    help="per-run time limits in seconds")
    ap.add_argument("--deadline", type=float, default=0, help="stop starting runs after this many seconds (0: none)")
    ap.add_argument("--json", default="", help="write all results here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)

    t0 = time.perf_counter()
    limits = {k: float(v) for k, v in (kv.split("=") for kv in args.timeouts.split(","))}
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        try:  # unknown names fail here, before any work
            _parse_run(r)
            if r.startswith("ours-"):
                _ours_settings(args, r)
        except ValueError as e:
            ap.error(f"--runs: {e}")
    if not torch.cuda.is_available():
        import importlib.util

        skip = {r: "bitsandbytes 4-bit needs CUDA" for r in runs if _parse_run(r)[1] == "nf4"}
        for r in runs:
            if r.startswith("trl-") and r not in skip:
                if not args.tiny:
                    skip[r] = "the full-size TRL run needs CUDA (use --tiny for a CPU smoke test)"
                elif importlib.util.find_spec("trl") is None:
                    skip[r] = "trl is not installed"
        runs = [r for r in runs if r not in skip]
        for r, why in skip.items():
            print(f"no CUDA GPU: skipping {r} ({why})", flush=True)
    results = {"build": spawn(args, "build", limits.get("build", 300))}
    if not results["build"].get("ok"):
        print(json.dumps(results["build"], indent=1))
        return 1
    for name in runs:
        left = args.deadline - (time.perf_counter() - t0) if args.deadline else float("inf")
        if left < 30:
            results[name] = {"name": name, "ok": False, "error": "not run: out of time"}
            continue
        results[name] = spawn(args, name, min(limits.get(name, 300), left))
        results[name]["floor"] = iteration_floor(args, name, results[name], results["build"])
        if args.json:  # partial results survive a later crash or kill
            _write(args, results)
    summary = _write(args, results)
    if summary["floors"]:
        print(f"\nfloors: {describe(summary['floors'])}")
    print("\n" + summary["table_markdown"])
    print(json.dumps(summary["ratios"], indent=1))
    return 0


def _write(args, results: dict) -> dict:
    shapes = _shapes(args.tiny)
    any_ok = next((r for r in results.values() if r.get("versions")), {})
    summary = {
        "date": _dt.date.today().isoformat(),
        "gpu": any_ok.get("device"),  # read in the workers: this process never touches the GPU
        "versions": any_ok.get("versions"),
        "workload": {"prompts": shapes.batch, "prompt_tokens": shapes.prompt_tokens, "new_tokens": shapes.new_tokens,
                     "ppo_epochs": 4, "minibatches": 4, "micro_batch": args.micro_batch or shapes.micro_batch,
                     "gradient_checkpointing": args.gradient_checkpointing,
                     "nockpt_micro_batch": args.nockpt_micro_batch, "profile_update": args.profile_update,
                     "profile_steps": args.profile_steps,
                     "iterations": args.iterations, "engine": args.engine, "precision": args.precision,
                     "tiny": args.tiny},
        "trl_notes_baseline": TRL_NOTES_BASELINE,
        "floors": results.get("build", {}).get("floors"),  # measured by the build subprocess
        "results": results,
        "table_markdown": table(results),
        "ratios": ratios(results),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    sys.exit(main())
