"""One GRPO iteration on a 7B-shaped policy: rlhf_lit (bf16 and nf4) beside TRL 1.16's GRPOTrainer.

Workload (both frameworks): a randomly initialised model of the exact Qwen2.5-7B-Instruct shape with
an SFT-shaped LoRA (r=16, alpha 16, all seven projections), 64 prompts of 64 tokens, 8 samples per
prompt (512 responses), 128 new tokens forced (min_new_tokens = max_new_tokens = 128), 1 epoch of 4
minibatches (128 responses each), KL to the reference in the loss with beta 0.04 (k3), bf16,
gradient checkpointing (``-nockpt`` runs: off, micro-batches of ``--nockpt-micro-batch``; ``-amb``:
compiled layers under ``policy.activation_memory_budget`` = ``--activation-memory-budget``), and a cheap
Python reward (distinct words / words). TRL: LoRA through
``peft_config`` (its reference = the adapter disabled), its own generation (HF ``generate``, no
vLLM), ``per_device_train_batch_size=16, gradient_accumulation_steps=8, steps_per_generation=32``
(4 optimizer steps per generation of 512). Ours: ``PPOModule`` with ``adv_estimator: grpo``,
``critic: none``, the frozen SFT adapter as reference on the same base weights.

Each run is its own subprocess; ``--iterations`` iterations each, the first is the warm-up, steady
state = the mean of the others; peak = ``torch.cuda.max_memory_allocated`` over the process.

    PYTHONPATH=. python benchmarks/grpo_iteration.py --runs ours-bf16,ours-nf4,trl-bf16 --json out.json
    PYTHONPATH=. python benchmarks/grpo_iteration.py --tiny --runs ours-bf16,trl-bf16   # CPU smoke test

Needs bitsandbytes for nf4 and trl>=1.16 (+ datasets) for the TRL rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _tiny_7b_assets import FULL, TINY, build_assets  # noqa: E402
from ppo_iteration import _peak_gib, _steady, _sync, _versions, fmt  # noqa: E402

from rlhf_lit.atomic_files import write_text_atomic  # noqa: E402

RUNS = ("ours-bf16", "ours-nf4", "ours-bf16-nockpt", "ours-nf4-nockpt", "ours-bf16-nockpt-amb", "trl-bf16", "trl-nf4")
GROUP, EPOCHS, MINIBATCHES, BETA = 8, 1, 4, 0.04
# TRL 1.16 on this workload, one H200, measured when the issue was filed (bf16, checkpointing, beta 0.04).
TRL_ISSUE_BASELINE = {"iteration_s": 63.0, "peak_gib": 43.8}


def distinct_word_ratio(text: str) -> float:
    """The cheap Python reward of both frameworks: distinct words / words (0 for an empty text)."""
    words = text.split()
    return len(set(words)) / len(words) if words else 0.0


def _shapes(tiny: bool):
    return TINY if tiny else FULL


def _micro(args, shapes, ckpt: bool = True) -> int:
    minibatch = shapes.batch * GROUP // MINIBATCHES
    if not ckpt:  # every layer's activations are kept: smaller micro-batches
        return min(args.nockpt_micro_batch or (2 if args.tiny else 8), minibatch)
    return min(args.micro_batch or (4 if args.tiny else 32), minibatch)


# =============================================================================================
# workers
# =============================================================================================
def worker_ours(args, result: dict, quantization: str, ckpt: bool = True, budget: Optional[float] = None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from rlhf_lit.data import PromptDataModule
    from rlhf_lit.model import PolicyConfig
    from rlhf_lit.rewards import RewardBackend
    from rlhf_lit.rollout import SamplingConfig
    from rlhf_lit.stages import PPOConfig, PPOModule

    class DistinctWords(RewardBackend):
        def score(self, prompts, responses):
            return [distinct_word_ratio(r) for r in responses]

    shapes, cuda = _shapes(args.tiny), torch.cuda.is_available()
    a = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.assets))
    micro = _micro(args, shapes, ckpt)
    compiled = cuda and not args.no_compile  # policy.compile runs on a GPU only here
    budget = budget if compiled and not ckpt else None  # a setting of compiled layers without checkpointing
    result.update(micro_batch=micro, gradient_checkpointing=ckpt, compile=compiled, activation_memory_budget=budget)
    iters: list[dict] = []

    class Recorder(Callback):
        def on_train_start(self, trainer, pl_module):
            _sync()
            result["load_s"] = time.perf_counter() - t_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            row = {"wall_s": time.perf_counter() - self.t0, "iteration_s": m.get("time/iteration_s"),
                   "rollout_s": m.get("time/rollout_s"), "reward_s": m.get("time/reward_s"),
                   "ref_values_s": m.get("time/ref_values_s"), "update_s": m.get("time/update_s"),
                   "tokens_per_sec": m.get("perf/tokens_per_sec"), "peak_gib": _peak_gib(),
                   "peak_rollout_gib": m.get("perf/peak_mem_rollout_gb"),
                   "response_length": m.get("response/length_mean"),
                   "ratio_first_minibatch": m.get("val/ratio_first_minibatch"), "kl": m.get("objective/kl"),
                   "logprob_gap_mean": m.get("rollout/logprob_gap_mean")}
            iters.append(row)
            result["iterations"], result["engine"] = iters, pl_module.engine.name
            result["peak_gib"] = max(result.get("peak_gib") or 0.0, row["peak_gib"] or 0.0) if cuda else None
            result["steady"] = _steady(iters)
            write_text_atomic(Path(args.result), json.dumps(result, indent=1, default=str))
            print(f"[{result['name']}] iteration {len(iters)}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    t_start = time.perf_counter()
    module = PPOModule(
        policy=PolicyConfig(base_model=str(a / "base"), sft_adapter=str(a / "sft_adapter"), quantization=quantization,
                            dtype="bfloat16" if cuda else "float32", gradient_checkpointing=ckpt,
                            compile=compiled, critic="none",
                            activation_memory_budget=budget),
        reward=DistinctWords(),
        ppo=PPOConfig(adv_estimator="grpo", samples_per_prompt=GROUP, ppo_epochs=EPOCHS, num_minibatches=MINIBATCHES,
                      micro_batch_size=micro, kl_in="loss", kl_estimator="k3", kl_coef=BETA,
                      loss_agg_mode="seq-mean-token-mean"),
        sampling=SamplingConfig(max_new_tokens=shapes.new_tokens, min_new_tokens=shapes.new_tokens, temperature=1.0),
        rollout_engine=args.engine, rollout_batch_size=shapes.batch, output_dir=str(work / "adapter"), log_samples=0,
    )
    data = PromptDataModule(prompt_file=str(a / "prompts.jsonl"), tokenizer=str(a / "base"), system_prompt=None,
                            batch_size=shapes.batch, max_prompt_tokens=256, val_fraction=0.0, test_fraction=0.0)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                        max_epochs=1, limit_train_batches=args.iterations, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(work), callbacks=[Recorder()])
    trainer.fit(module, datamodule=data)


def worker_trl(args, result: dict, quantization: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    shapes, cuda = _shapes(args.tiny), torch.cuda.is_available()
    a = Path(args.assets)
    tok = AutoTokenizer.from_pretrained(a / "base")
    tok.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in (a / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                 for p in prompts[: shapes.batch * args.iterations]])
    model_kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model_kwargs["device_map"] = {"": 0}
    t_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a / "base", **model_kwargs)
    micro = 16 if not args.tiny else 4
    per_gen = shapes.batch * GROUP
    accum = per_gen // MINIBATCHES // micro
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(dir=args.assets), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, steps_per_generation=per_gen // micro, num_generations=GROUP,
        num_iterations=EPOCHS, max_completion_length=shapes.new_tokens, beta=BETA, learning_rate=1e-5,
        temperature=1.0, top_k=0, top_p=1.0, bf16=cuda, gradient_checkpointing=True,
        generation_kwargs={"min_new_tokens": shapes.new_tokens}, logging_steps=1, report_to=[], save_strategy="no",
        max_steps=MINIBATCHES * args.iterations, use_cpu=not cuda, seed=0, loss_type="grpo",
    )
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    marks: list[float] = []
    phases: dict[str, float] = {}

    class Steps(TrainerCallback):
        def on_step_end(self, a_, state, control, **kw):
            _sync()
            marks.append(time.perf_counter())
            if len(marks) % MINIBATCHES == 0:
                k = len(marks) // MINIBATCHES
                start = marks[-MINIBATCHES - 1] if len(marks) > MINIBATCHES else result["train_start"]
                row = {"iteration_s": marks[-1] - start, "rollout_s": phases.pop("generate_s", None),
                       "peak_gib": _peak_gib()}
                if row["rollout_s"]:
                    row["tokens_per_sec"] = per_gen * shapes.new_tokens / row["rollout_s"]
                result.setdefault("iterations", []).append(row)
                result["peak_gib"] = max(result.get("peak_gib") or 0.0, row["peak_gib"] or 0.0) if cuda else None
                result["steady"] = _steady(result["iterations"])
                write_text_atomic(Path(args.result), json.dumps(result, indent=1, default=str))
                print(f"[{result['name']}] iteration {k}: " + ", ".join(
                    f"{k_}={v:.3f}" for k_, v in row.items() if isinstance(v, float)), flush=True)

    def reward(completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [distinct_word_ratio(t) for t in texts]

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tok, peft_config=lora, callbacks=[Steps()])
    gen = trainer._generate_and_score_completions

    def timed_generate(*a_, **kw):  # generation + scoring + old/ref log-probs of one generation batch
        _sync()
        t = time.perf_counter()
        out = gen(*a_, **kw)
        _sync()
        phases["generate_s"] = phases.get("generate_s", 0.0) + time.perf_counter() - t
        return out

    trainer._generate_and_score_completions = timed_generate
    result["load_s"] = time.perf_counter() - t_start
    result["train_start"] = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()


# =============================================================================================
# driver
# =============================================================================================
def run_worker(args) -> int:
    result = {"name": args.worker, "ok": False, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu"}
    try:
        if args.worker == "build":
            shapes = _shapes(args.tiny)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            result["assets"] = build_assets(args.assets, shapes, device, n_prompts=shapes.batch * (args.iterations + 2))
        else:
            framework, quantization, *variant = args.worker.split("-")
            if framework == "ours":
                worker_ours(args, result, quantization, ckpt="nockpt" not in variant,
                            budget=args.activation_memory_budget if "amb" in variant else None)
            else:
                worker_trl(args, result, quantization)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - every failure is a result row
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        result["peak_gib_at_failure"] = _peak_gib()
    result["versions"] = _versions()
    write_text_atomic(Path(args.result), json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


def spawn(args, name: str, timeout: float) -> dict:
    out = Path(args.assets) / f"grpo-result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--assets", args.assets, "--result", str(out),
           "--iterations", str(args.iterations), "--engine", args.engine] \
        + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else []) + (["--tiny"] if args.tiny else []) \
        + (["--nockpt-micro-batch", str(args.nockpt_micro_batch)] if args.nockpt_micro_batch else []) \
        + (["--no-compile"] if args.no_compile else []) \
        + ["--activation-memory-budget", str(args.activation_memory_budget)]
    env = dict(os.environ)
    if name.startswith("trl-") and args.trl_path:  # TRL 1.16 beside another TRL the PPO benchmark uses
        env["PYTHONPATH"] = os.pathsep.join([args.trl_path, env.get("PYTHONPATH", "")])
    print(f"\n=== {name} (timeout {timeout:.0f} s) ===", flush=True)
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, timeout=timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    res = json.loads(out.read_text()) if out.is_file() else {"name": name, "ok": False}
    if rc == "timeout":
        res.update(ok=False, error=f"timed out after {timeout:.0f} s ({len(res.get('iterations', []))} iterations)")
    res["process_wall_s"] = time.perf_counter() - t
    print(f"=== {name}: {'ok' if res.get('ok') else 'FAILED: ' + str(res.get('error'))[:300]} "
          f"({res['process_wall_s']:.0f} s) ===", flush=True)
    return res


def table(results: dict) -> str:
    rows = ["| run | engine | s / iteration (steady) | rollout | reward | ref + old log-probs | update | first | "
            "peak GiB | generated tokens/s | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == "build":
            continue
        iters = r.get("iterations", [])
        if not iters:
            rows.append(f"| {name} | - | failed | | | | | | {fmt(r.get('peak_gib_at_failure'))} | | "
                        f"{str(r.get('error', '')).replace('|', '/')[:160]} |")
            continue
        s = _steady(iters)
        note = f"steady = mean of {max(len(iters) - 1, 0)} after the warm-up" if len(iters) > 1 else "warm-up only"
        if name.startswith("trl"):
            note += "; rollout = TRL's generate + score + old/ref log-probs"
        else:
            note += f"; micro-batch {r.get('micro_batch')}"
            if r.get("activation_memory_budget") is not None:
                note += f", activation_memory_budget {r['activation_memory_budget']}"
        rows.append(f"| {name} | {r.get('engine', 'HF generate (TRL)')} | {fmt(s.get('iteration_s'), '.2f')} | "
                    f"{fmt(s.get('rollout_s'), '.2f')} | {fmt(s.get('reward_s'), '.2f')} | "
                    f"{fmt(s.get('ref_values_s'), '.2f')} | {fmt(s.get('update_s'), '.2f')} | "
                    f"{fmt(iters[0].get('iteration_s'), '.1f')} | {fmt(r.get('peak_gib'))} | "
                    f"{fmt(s.get('tokens_per_sec'), '.0f')} | {note} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="ours-bf16,ours-nf4,trl-bf16", help=f"comma-separated subset of {RUNS}")
    ap.add_argument("--iterations", type=int, default=3, help="GRPO iterations per run (the first is the warm-up)")
    ap.add_argument("--engine", default="auto", help="model.rollout_engine for rlhf_lit")
    ap.add_argument("--micro-batch", type=int, default=None, help="our micro-batch (default 32; tiny: 4)")
    ap.add_argument("--nockpt-micro-batch", type=int, default=None,
                    help="our micro-batch of the -nockpt runs (gradient checkpointing off; default 8; tiny: 2)")
    ap.add_argument("--no-compile", action="store_true", help="our runs without policy.compile")
    ap.add_argument("--activation-memory-budget", type=float, default=0.8,
                    help="model.policy.activation_memory_budget of the -amb runs")
    ap.add_argument("--trl-path", default="", help="a folder put first on PYTHONPATH for the TRL runs")
    ap.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "rlhf_lit_grpo_bench"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--json", default="", help="write all results here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    if not 0 < args.activation_memory_budget <= 1:
        raise SystemExit(f"--activation-memory-budget {args.activation_memory_budget}: expected a number in (0, 1]")
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"unknown run {r!r}; expected some of {RUNS}")
    if not torch.cuda.is_available():
        runs = [r for r in runs if not r.endswith("nf4")]
    results = {"build": spawn(args, "build", 300)}
    if not results["build"].get("ok"):
        return 1
    for name in runs:
        results[name] = spawn(args, name, args.timeout)
    summary = {"workload": {"prompts": _shapes(args.tiny).batch, "samples_per_prompt": GROUP,
                            "new_tokens": _shapes(args.tiny).new_tokens, "epochs": EPOCHS, "minibatches": MINIBATCHES,
                            "beta": BETA, "tiny": args.tiny},
               "trl_issue_baseline": TRL_ISSUE_BASELINE, "results": results, "table_markdown": table(results)}
    trl = results.get("trl-bf16", {})
    for name, ours in results.items():  # every bf16 run of ours against TRL's bf16 run of this call
        if not (name.startswith("ours-bf16") and ours.get("iterations") and trl.get("iterations")):
            continue
        so, st = _steady(ours["iterations"]), _steady(trl["iterations"])
        tag = name.replace("ours-bf16", "").replace("-", "_")
        summary[f"speedup_vs_trl_bf16{tag}"] = st["iteration_s"] / so["iteration_s"]
        if ours.get("peak_gib") and trl.get("peak_gib"):
            summary[f"memory_fraction_vs_trl_bf16{tag}"] = ours["peak_gib"] / trl["peak_gib"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.json), json.dumps(summary, indent=1, default=str))
    print("\n" + summary["table_markdown"])
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(("speedup", "memory"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
