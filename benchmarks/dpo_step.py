"""One DPO optimizer step on a 7B-shaped policy: rlhf_lit (bf16 and nf4) beside TRL 1.16's DPOTrainer.

Workload (both frameworks): a randomly initialised model of the exact Qwen2.5-7B-Instruct shape
(``benchmarks/_tiny_7b_assets.py``), LoRA r=16 / alpha 16 on all seven projections, 64 pairs per
optimizer step, every prompt 128 tokens and every response 128 tokens (chosen and rejected), bf16
compute, gradient checkpointing, micro-batch 8 pairs x 8 accumulation steps, beta 0.1, sigmoid loss.

- rlhf_lit: ``DPOModule`` + ``PreferenceDataModule`` over a pair JSONL in a Lightning ``Trainer``
  (``bf16-mixed``). Policy = the SFT-shaped adapter (trainable), reference = a frozen copy of it on the
  same base weights. With ``precompute_ref_logps`` (the default) the reference log-probs of every pair are
  computed once before the first step: that one-off pass is timed on its own (``precompute_s``, and
  per step when amortised over this run's pairs); ``-nocache`` runs do a reference forward in every step
  as TRL does.
- TRL: ``trl.DPOTrainer`` with ``peft_config`` (a fresh LoRA of the same shape on the base model). Its
  reference is then the base model with the adapter disabled (``use_adapter(model, None)``), not an SFT
  adapter: TRL copies an adapter into a frozen ``ref`` adapter only when handed a ``PeftModel`` without
  ``peft_config``. The reference forward runs in every step (``precompute_ref_log_probs=False``, its default).
  Conversational pairs, TRL's own tokenisation: 128 prompt tokens, 126 content tokens + ``<|im_end|>\\n``.

Every run is its own subprocess (clean memory figures). Each does ``--steps`` optimizer steps; the
first is the warm-up (allocator, cuBLAS, compilation), steady state = the mean of the others. Peak
memory = ``torch.cuda.max_memory_allocated`` over the whole process (model loading included).

    # one device call each (a call is at most 10 minutes; a fresh machine rebuilds the assets, ~1.5 min):
    PYTHONPATH=. python benchmarks/dpo_step.py --runs ours-bf16-compile,ours-bf16-nockpt-compile,trl-bf16 \
        --trl-path <trl 1.16> --json a.json
    PYTHONPATH=. python benchmarks/dpo_step.py --runs ours-nf4-compile,trl-nf4 --trl-path <trl 1.16> --json b.json
    PYTHONPATH=. python benchmarks/dpo_step.py --tiny --runs ours-bf16,ours-bf16-nocache,trl-bf16   # CPU smoke test

The device machines lack bitsandbytes, trl, datasets (and its dill, multiprocess) and torchdata: carry their
wheels (trl 1.16.0 for the TRL rows, bitsandbytes for nf4), as the device notes say.

Run names: ``<framework>-<bf16|nf4>[-variant...]``; our variants ``nockpt`` (checkpointing off,
``--nockpt-micro-batch`` pairs per forward, default 2), ``compile`` (``policy.compile``), ``nocache`` (no
reference cache: a reference forward per step, TRL's work). Needs
bitsandbytes for nf4 and trl 1.16 (+ datasets) for the TRL rows; a row whose imports fail is reported as
failed and the others still run. Without a CUDA GPU the nf4 rows are skipped, and the TRL rows too unless
``--tiny`` is given and trl is installed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _tiny_7b_assets import FULL, TARGETS, TINY, build_assets, build_tokenizer, templated_ids  # noqa: E402
from ppo_iteration import _peak_gib, _steady, _sync, _versions  # noqa: E402  (the benchmarks share these)

from rlhf_lit.atomic_files import write_text_atomic  # noqa: E402
from rlhf_lit.testing.tokenizers import ALPHABET  # noqa: E402

RUNS = ("ours-bf16-compile", "ours-bf16-nockpt-compile", "trl-bf16", "ours-nf4-compile", "trl-nf4")
VARIANTS = {"ours": ("nockpt", "compile", "nocache"), "trl": ()}
#: TRL 1.16 on this workload, H200, measured by the lead before this benchmark existed (issue #16).
TRL_ISSUE_BASELINE = {"step_s": 5.67, "peak_gib": 57.1}
_SAVE = lambda: None  # noqa: E731 - set by run_worker: writes the result file (after every step too)


@dataclass
class Workload:
    pairs: int            # pairs per optimizer step
    prompt_tokens: int
    response_tokens: int  # EOS included (ours); TRL: content + <|im_end|> + "\n"
    micro: int            # pairs per forward/backward


FULL_DPO = Workload(pairs=64, prompt_tokens=128, response_tokens=128, micro=8)
TINY_DPO = Workload(pairs=8, prompt_tokens=24, response_tokens=12, micro=2)


def _w(tiny: bool) -> Workload:
    return TINY_DPO if tiny else FULL_DPO


def _parse_run(name: str) -> tuple[str, str, list[str]]:
    framework, quantization, *variants = name.split("-")
    if framework not in VARIANTS or quantization not in ("bf16", "nf4") or \
            any(v not in VARIANTS[framework] for v in variants):
        raise ValueError(f"unknown run {name!r}")
    return framework, quantization, variants


# =============================================================================================
# the pairs: exact token lengths in both frameworks
# =============================================================================================
def _text(tok, g, n_tokens: int, n_words: int) -> str:
    """A letter, then space-led words: ``n_tokens`` tokens of the benchmark tokenizer."""
    first = string.ascii_lowercase[int(torch.randint(26, (1,), generator=g))]
    return first + tok.decode(torch.randint(len(ALPHABET), n_words, (n_tokens - 1,), generator=g).tolist())


def write_pairs(path: Path, special_start: int, w: Workload, n: int, seed: int = 0) -> None:
    """``n`` conversational pairs (no system prompt): templated prompts of exactly ``w.prompt_tokens``,
    responses of ``w.response_tokens - 1`` content tokens (ours adds EOS; TRL's template adds
    ``<|im_end|>\\n``, so its responses are one token longer)."""
    tok = build_tokenizer(special_start)
    g = torch.Generator().manual_seed(seed)
    overhead = len(templated_ids(tok, "a")) - 1
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            prompt = _text(tok, g, w.prompt_tokens - overhead, special_start)
            assert len(templated_ids(tok, prompt)) == w.prompt_tokens
            chosen, rejected = (_text(tok, g, w.response_tokens - 1, special_start) for _ in range(2))
            assert len(tok(chosen, add_special_tokens=False)["input_ids"]) == w.response_tokens - 1
            f.write(json.dumps({"id": f"pair-{i:05d}", "prompt": [{"role": "user", "content": prompt}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}],
                                "meta": {"split": "train"}}) + "\n")


# =============================================================================================
# workers (each in its own process)
# =============================================================================================
def worker_build(args, result: dict) -> None:
    shapes, w = (TINY if args.tiny else FULL), _w(args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    assets = build_assets(args.assets, shapes, device, n_prompts=8)
    pairs = Path(args.assets) / f"dpo_pairs_{w.prompt_tokens}x{w.response_tokens}.jsonl"
    write_pairs(pairs, shapes.special_start, w, w.pairs * args.steps)
    result.update(assets=assets, pairs=str(pairs), build_s=time.perf_counter() - t)


def _record(result: dict, steps: list[dict], row: dict) -> None:
    steps.append(row)
    result["steps"] = steps
    if row.get("peak_gib") is not None:
        result["peak_gib"] = max(result.get("peak_gib") or 0.0, row["peak_gib"])
    result["steady"] = _steady(steps)
    _SAVE()
    print(f"[{result['name']}] step {len(steps)}: " + ", ".join(
        f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)


def worker_ours(args, result: dict, quantization: str) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from rlhf_lit.model import PolicyConfig
    from rlhf_lit.preference_data import PreferenceDataModule
    from rlhf_lit.rewards.length import LengthPenalty
    from rlhf_lit.stages.dpo import DPOConfig, DPOModule

    w, cuda = _w(args.tiny), torch.cuda.is_available()
    a = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.assets))
    variants = _parse_run(args.worker)[2]
    ckpt = "nockpt" not in variants
    micro = w.micro if ckpt else min(args.nockpt_micro_batch, w.pairs)
    steps: list[dict] = []
    result.update(gradient_checkpointing=ckpt, micro_batch=micro, compile="compile" in variants,
                  reference_cache="nocache" not in variants)

    class Recorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync()
            m = {k: float(v) for k, v in trainer.callback_metrics.items()}
            _record(result, steps, {"step_s": time.perf_counter() - self.t0, "peak_gib": _peak_gib(),
                                    "loss": m.get("loss"), "margin": m.get("rewards/margins")})

    t_start = time.perf_counter()
    module = DPOModule(
        policy=PolicyConfig(base_model=str(a / "base"), sft_adapter=str(a / "sft_adapter"), quantization=quantization,
                            dtype="bfloat16" if cuda else "float32", gradient_checkpointing=ckpt,
                            compile="compile" in variants, critic="none"),
        reward=LengthPenalty(),  # scores only a `test` report, which the benchmark never runs: no dependency
        dpo=DPOConfig(beta=0.1, loss_type="sigmoid", precompute_ref_logps="nocache" not in variants,
                      micro_batch_size=micro),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5, eps=1e-8), output_dir=str(work / "adapter"), seed=0)
    fill = module._filled_reference_cache

    def timed_fill():
        _sync()
        result["load_s"] = time.perf_counter() - t_start
        result["peak_after_load_gib"] = _peak_gib()
        t = time.perf_counter()
        cache = fill()
        _sync()
        result["precompute_s"] = time.perf_counter() - t
        result["precompute_per_step_s"] = result["precompute_s"] / args.steps
        result["peak_precompute_gib"] = _peak_gib()
        _SAVE()
        return cache

    module._filled_reference_cache = timed_fill
    data = PreferenceDataModule(pair_file=str(a / f"dpo_pairs_{w.prompt_tokens}x{w.response_tokens}.jsonl"),
                                tokenizer=str(a / "base"), system_prompt=None, batch_size=w.pairs,
                                eval_batch_size=w.pairs, max_prompt_tokens=w.prompt_tokens,
                                max_response_tokens=w.response_tokens, long_pairs="error", val_fraction=0.0,
                                test_prompts=False, seed=0)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_epochs=1,
                        limit_train_batches=args.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(work), callbacks=[Recorder()])
    trainer.fit(module, datamodule=data)
    result["peak_gib"] = max(result.get("peak_gib") or 0.0, _peak_gib() or 0.0) if cuda else None
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None


def worker_trl(args, result: dict, quantization: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    w, cuda = _w(args.tiny), torch.cuda.is_available()
    a = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix=f"trl-{quantization}-", dir=args.assets))
    steps: list[dict] = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            _sync()
            result["load_s"] = time.perf_counter() - t_start
            result["peak_after_load_gib"] = _peak_gib()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kw):  # after each optimizer step
            _sync()
            t = time.perf_counter()
            logs = [h for h in state.log_history if "loss" in h]
            _record(result, steps, {"step_s": t - self.t0, "peak_gib": _peak_gib(),
                                    "loss": logs[-1].get("loss") if logs else None})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a / "base")
    kw = dict(dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        kw["device_map"] = {"": 0}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a / "base", **kw)
    rows = [json.loads(x) for x in (a / f"dpo_pairs_{w.prompt_tokens}x{w.response_tokens}.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(
        output_dir=str(work), per_device_train_batch_size=w.micro, gradient_accumulation_steps=w.pairs // w.micro,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=cuda,
        use_cpu=not cuda, max_length=w.prompt_tokens + w.response_tokens + 1, beta=0.1, loss_type=["sigmoid"],
        learning_rate=1e-5, max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_drop_last=True,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"),
                         callbacks=[Recorder()])
    sample = trainer.train_dataset[0]
    result["trl_tokens"] = {"prompt": len(sample["prompt_ids"]), "chosen": len(sample["chosen_ids"]),
                            "rejected": len(sample["rejected_ids"])}
    result["trl_reference"] = ("base model, adapter disabled" if "ref" not in trainer.model.peft_config
                               else "frozen 'ref' copy of the adapter")
    trainer.train()
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None


def run_worker(args) -> int:
    result = {"name": args.worker, "ok": False,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    global _SAVE
    _SAVE = lambda: write_text_atomic(Path(args.result), json.dumps(result, indent=1, default=str))  # noqa: E731
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
        result.update(error=f"{type(e).__name__}: {e}"[:2000], traceback_tail=tb[-3000:],
                      steps_done=len(result.get("steps", [])))
        if torch.cuda.is_available():
            result["peak_gib_at_failure"] = _peak_gib()
    result["versions"] = _versions()
    _SAVE()
    return 0 if result["ok"] else 1


# =============================================================================================
# driver
# =============================================================================================
def spawn(args, name: str, timeout: float) -> dict:
    out = Path(args.assets) / f"dpo-result-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--assets", args.assets, "--result", str(out),
           "--steps", str(args.steps), "--precision", args.precision,
           "--nockpt-micro-batch", str(args.nockpt_micro_batch)] + (["--tiny"] if args.tiny else [])
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
        res.update(ok=False, error=f"timed out after {timeout:.0f} s ({len(res.get('steps', []))} steps recorded)")
    res["process_wall_s"] = time.perf_counter() - t
    print(f"=== {name}: {'ok' if res.get('ok') else 'FAILED: ' + str(res.get('error'))[:300]} "
          f"({res['process_wall_s']:.0f} s) ===", flush=True)
    return res


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    rows = ["| run | ckpt / micro | reference | s / optimizer step (steady) | first step | precompute once (s; per step "
            "of this run) | peak GiB | note |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == "build":
            continue
        steps = r.get("steps", [])
        if name.startswith("trl"):
            setup = f"on / {_w(False).micro if not r.get('tiny') else _w(True).micro} x accumulation"
            ref = r.get("trl_reference", "base model, adapter disabled") + ", every step"
        else:
            setup = f"{'on' if r.get('gradient_checkpointing') else 'off'} / {r.get('micro_batch', '-')}" + \
                (" / compiled" if r.get("compile") else "")
            ref = "SFT adapter, " + ("cached once" if r.get("reference_cache") else "every step")
        if not steps:
            err = str(r.get("error", "failed")).replace("|", "/").replace("\n", " ")[:160]
            rows.append(f"| {name} | {setup} | {ref} | failed | | | {_fmt(r.get('peak_gib_at_failure'), '.1f')} | {err} |")
            continue
        s = _steady(steps)
        note = "" if r.get("ok") else str(r.get("error", "")).replace("|", "/")[:120]
        note += f"{'; ' if note else ''}steady = mean of {max(len(steps) - 1, 1)} step(s) after the warm-up"
        pre = "-" if r.get("precompute_s") is None else \
            f"{r['precompute_s']:.1f}; {r['precompute_per_step_s']:.2f}"
        rows.append(f"| {name} | {setup} | {ref} | {_fmt(s.get('step_s'))} | {_fmt(steps[0].get('step_s'), '.1f')} | "
                    f"{pre} | {_fmt(r.get('peak_gib'), '.1f')} | {note} |")
    return "\n".join(rows)


def ratios(results: dict) -> dict:
    out = {}
    for base_label, base in (("trl-bf16", results.get("trl-bf16")), ("trl-nf4", results.get("trl-nf4"))):
        if not base or len(base.get("steps", [])) < 2:
            continue
        bt, bm = _steady(base["steps"]).get("step_s"), base.get("peak_gib")
        for name, r in results.items():
            if name.startswith("ours-") and len(r.get("steps", [])) >= 2 and _parse_run(name)[1] == base_label[4:]:
                t, m = _steady(r["steps"]).get("step_s"), r.get("peak_gib")
                out[f"{name}/speedup_vs_{base_label}"] = bt / t if bt and t else None
                if r.get("precompute_per_step_s") is not None and bt and t:
                    out[f"{name}/speedup_vs_{base_label}_precompute_amortised"] = bt / (t + r["precompute_per_step_s"])
                out[f"{name}/memory_fraction_vs_{base_label}"] = m / bm if bm and m else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated runs, e.g. {','.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is the warm-up)")
    ap.add_argument("--precision", default="bf16-mixed", help="Lightning precision of the rlhf_lit runs")
    ap.add_argument("--nockpt-micro-batch", type=int, default=2,
                    help="pairs per forward of the -nockpt runs (without checkpointing every layer's activations "
                         "are kept: ~1.4 GB per 256-token sequence for a 7B)")
    ap.add_argument("--assets", default="", help="where the random models and pairs are written (reused when "
                                                  "present); default: a temporary folder per size")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and workload (smoke test, CPU is fine)")
    ap.add_argument("--timeouts", default="build=240,ours=240,trl=300", help="per-run time limits (s) by framework")
    ap.add_argument("--trl-path", default="", help="a folder put first on PYTHONPATH for the TRL runs")
    ap.add_argument("--json", default="", help="write all results here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.assets = args.assets or str(Path(tempfile.gettempdir()) / ("rlhf_lit_bench_tiny" if args.tiny
                                                                       else "rlhf_lit_ppo_bench"))
    if args.worker:
        return run_worker(args)
    runs = [r for r in args.runs.split(",") if r]
    for r in runs:
        _parse_run(r)  # unknown names fail here, before any work
    if not torch.cuda.is_available():
        import importlib.util

        skip = {r: "bitsandbytes 4-bit needs CUDA" for r in runs if _parse_run(r)[1] == "nf4"}
        for r in runs:
            if r.startswith("trl-") and r not in skip and (not args.tiny or importlib.util.find_spec("trl") is None):
                skip[r] = "trl is not installed" if args.tiny else "the full-size TRL run needs CUDA"
        for r, why in skip.items():
            print(f"no CUDA GPU: skipping {r} ({why})", flush=True)
        runs = [r for r in runs if r not in skip]
    limits = {k: float(v) for k, v in (kv.split("=") for kv in args.timeouts.split(","))}
    results = {"build": spawn(args, "build", limits.get("build", 300))}
    if not results["build"].get("ok"):
        print(json.dumps(results["build"], indent=1))
        return 1
    w = _w(args.tiny)

    def summarise() -> dict:
        any_ok = next((r for r in results.values() if r.get("versions")), {})
        summary = {"date": _dt.date.today().isoformat(), "gpu": any_ok.get("device"),
                   "versions": any_ok.get("versions"),
                   "workload": {"pairs_per_step": w.pairs, "prompt_tokens": w.prompt_tokens,
                                "response_tokens": w.response_tokens, "micro_batch_pairs": w.micro,
                                "steps": args.steps, "precision": args.precision, "tiny": args.tiny},
                   "trl_issue_baseline": TRL_ISSUE_BASELINE, "results": results, "table_markdown": table(results),
                   "ratios": ratios(results)}
        if args.json:  # after every run, so a call cut short keeps the runs it finished
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
        return summary

    for name in runs:
        results[name] = spawn(args, name, limits.get(name.split("-")[0], 600))
        results[name]["tiny"] = args.tiny
        summary = summarise()
        print(f"=== {name}: {table({name: results[name]}).splitlines()[-1]}", flush=True)
    summary = summarise()
    print("\n" + summary["table_markdown"])
    print(json.dumps(summary["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
