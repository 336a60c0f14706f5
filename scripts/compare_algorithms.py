"""PPO, GRPO, RLOO and REINFORCE++ on the offline demo at equal sample budgets, several seeds.

Every run is ``python -m rlhf_lit fit --config configs/demo.yaml [--config configs/algorithms/X.yaml]``
with 16 responses per rollout (PPO and REINFORCE++: 16 prompts x 1; GRPO and RLOO: 4 prompts x 4
samples) and 36 rollouts (3 epochs x 12), i.e. 576 generated responses each. The script writes the
per-rollout reward and KL of every run (JSON), a PNG of both against generated samples (mean over
seeds, min-max band) and a markdown table, e.g.::

    python scripts/compare_algorithms.py --seeds 0 1 2 --out docs/results/algorithms_demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESPONSES_PER_ROLLOUT = 16
ALGORITHMS = {  # name -> (extra config, prompts per rollout)
    "PPO": (None, 16),
    "GRPO": ("configs/algorithms/grpo.yaml", 4),
    "RLOO": ("configs/algorithms/rloo.yaml", 4),
    "REINFORCE++": ("configs/algorithms/reinforce_pp.yaml", 16),
}


ROLLOUTS = 36  # 3 epochs x 12


def run_one(name: str, seed: int, work: Path) -> dict:
    extra, prompts = ALGORITHMS[name]
    run_dir = work / f"{name.replace('+', 'p')}-seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and len(_rollout_rows(run_dir)) == ROLLOUTS:  # finished in an earlier call
        return _collect(name, seed, run_dir)
    if run_dir.exists():  # an interrupted run: start it again
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "rlhf_lit", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
    if extra:
        cmd += ["--config", str(ROOT / extra)]
    cmd += [f"--trainer.logger.init_args.save_dir={run_dir}", "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=3", "--trainer.limit_train_batches=12", f"--data.batch_size={prompts}",
            f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
            f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return _collect(name, seed, run_dir)


def _rollout_rows(run_dir: Path) -> list[dict]:
    """The rollout lines of a run's metrics.jsonl (validation lines carry no ``episode``)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "episode" in r]


def _collect(name: str, seed: int, run_dir: Path) -> dict:
    rows = _rollout_rows(run_dir)
    return {"algorithm": name, "seed": seed, "samples": [r["episode"] for r in rows],
            "scores": [r["objective/scores"] for r in rows], "kl": [r["objective/kl"] for r in rows]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for name in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == name]
        if not mine:
            continue
        first = [sum(r["scores"][:3]) / 3 for r in mine]
        last = [sum(r["scores"][-6:]) / 6 for r in mine]
        kl = [sum(r["kl"][-6:]) / 6 for r in mine]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out[name] = {"seeds": len(mine), "score_first3": mean(first), "score_last6": mean(last),
                     "score_last6_min": min(last), "score_last6_max": max(last), "kl_last6": mean(kl),
                     "kl_last6_min": min(kl), "kl_last6_max": max(kl), "samples": mine[0]["samples"][-1]}
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == name]
        if not mine:
            continue
        x = np.array(mine[0]["samples"])
        for ax, key in zip(axes, ("scores", "kl")):
            y = np.array([r[key] for r in mine])
            ax.plot(x, y.mean(0), label=name)
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    axes[0].set(xlabel="generated responses", ylabel="objective/scores (profanity, raw)", title="reward")
    axes[1].set(xlabel="generated responses", ylabel="objective/kl (nats / response)", title="KL to the SFT adapter")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    rows = ["| algorithm | seeds | responses | score, first 3 rollouts | score, last 6 (min-max over seeds) | "
            "KL, last 6 (min-max) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        rows.append(f"| {name} | {s['seeds']} | {s['samples']:.0f} | {s['score_first3']:.3f} | "
                    f"{s['score_last6']:.3f} ({s['score_last6_min']:.3f}-{s['score_last6_max']:.3f}) | "
                    f"{s['kl_last6']:.2f} ({s['kl_last6_min']:.2f}-{s['kl_last6_max']:.2f}) |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--out", default="docs/results/algorithms_demo", help="prefix of the .json/.png/.md written")
    ap.add_argument("--work", default="", help="run folder; finished runs found there are reused")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rlhf_lit_compare-"))
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(a, s) for a in args.algorithms for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda j: run_one(j[0], j[1], work), jobs))
    summary = summarise(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    plot(runs, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(table(summary) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
