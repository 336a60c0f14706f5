"""``python -m rlhf_lit test``: the RLHF policy adapter against the SFT reference adapter.

On every test prompt both adapters sample with the same seed and sampling settings (paired
samples, ``model.eval_samples_per_prompt`` per prompt), the configured reward and every
``model.eval_rewards`` backend score both responses, and :class:`TestEvaluator` gathers the
per-sample figures in torchmetrics states, so a data-parallel test concatenates every rank's
samples before any statistic is taken. The statistics are pure functions of those per-sample
tensors (:func:`summary_stats`, :func:`win_rate`, :func:`bootstrap_ci`, :func:`distinct_n`, ...).

Written to the run folder (``trainer.log_dir``) by rank 0:

- ``report.md``: tables, the reward histogram and side-by-side sample conversations;
- ``report.json``: every figure of the report (see :func:`build_report`);
- ``reward_histogram.png``: SFT vs RLHF score distributions;
- ``test_samples.jsonl``: every prompt, both responses and all their scores (the run's
  ``samples.jsonl`` holds *training* samples).

The same figures, the histogram and the samples also go to TensorBoard. The notebook
``notebooks/evaluation.ipynb`` reads a run folder's report back (``docs/evaluation.md``).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import math
import random
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import CatMetric, Metric
from torchmetrics.utilities import dim_zero_cat

from rlhf_lit.atomic_files import write_bytes_atomic, write_text_atomic
from rlhf_lit.markdown import markdown_cell
from rlhf_lit.rewards.base import RewardBackend, RewardOutput

log = logging.getLogger(__name__)

ADAPTERS = ("sft", "rlhf")  #: report order: the baseline first
LABELS = {"sft": "SFT", "rlhf": "RLHF"}
REWARD = "reward"  #: series name of the configured (trained-on) reward
REPORT_MD, REPORT_JSON = "report.md", "report.json"
HISTOGRAM_PNG, TEST_SAMPLES = "reward_histogram.png", "test_samples.jsonl"
TRAIN_SAMPLES = "samples.jsonl"
CELL_CHARS, PROMPT_CHARS = 600, 1000  #: report.md shows at most this much of a response / a prompt


# -------------------------------------------------------------------------------------------
# Statistics: pure functions of 1-D tensors
# -------------------------------------------------------------------------------------------
def summary_stats(x: Tensor) -> dict[str, Optional[float]]:
    """``n``, ``mean``, ``std`` (sample std, ddof 1; 0 for one value), ``median``, ``p10``, ``p90``
    (linear interpolation, as ``numpy.quantile``), ``min`` and ``max``; None when ``x`` is empty."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    n = int(x.numel())
    if n == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "median", "p10", "p90", "min", "max"))}
    q = torch.quantile(x, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
    return {
        "n": n, "mean": float(x.mean()), "std": float(x.std()) if n > 1 else 0.0,
        "median": float(q[0]), "p10": float(q[1]), "p90": float(q[2]), "min": float(x.min()), "max": float(x.max()),
    }


def win_rate(a: Tensor, b: Tensor) -> dict[str, Optional[float]]:
    """Paired comparison of ``a`` (RLHF) with ``b`` (SFT): counts of wins, ties and losses, and
    ``win_rate = (wins + ties / 2) / n`` (None for no pairs)."""
    a, b = torch.as_tensor(a, dtype=torch.float64).reshape(-1), torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = int(a.numel())
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": n - wins - ties}


def group_means(values: Tensor, keys: Tensor) -> Tensor:
    """Mean of ``values`` per distinct key (e.g. the per-prompt mean over several samples), in
    the order of the sorted keys."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    uniq, inverse = torch.unique(torch.as_tensor(keys).reshape(-1), return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, values)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    return sums / counts


def bootstrap_ci(x: Tensor, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap confidence interval of the mean of ``x``.

    ``n_resamples`` means of ``len(x)`` values drawn with replacement from ``sorted(x)`` by
    ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``; the interval is their
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles. Sorting first makes the interval
    a function of the values only, not of their order (which depends on how ranks split the data).
    None for an empty ``x``.
    """
    d = np.sort(np.asarray(torch.as_tensor(x, dtype=torch.float64).reshape(-1).cpu()))
    n = len(d)
    if n == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for s in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - s)
        means[s:s + k] = d[rng.integers(0, n, (k, n))].mean(1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """Word n-grams of ``text`` (whitespace tokens, case kept)."""
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of all ``texts``
    (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def stable_hash(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


# -------------------------------------------------------------------------------------------
# torchmetrics states: synced across data-parallel ranks at compute()
# -------------------------------------------------------------------------------------------
class Int64Cat(Metric):
    """Concatenates int64 values across updates and ranks (``CatMetric`` casts to float, which
    would corrupt 64-bit hashes)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor) -> None:
        self.values.append(torch.as_tensor(values, dtype=torch.int64, device=self.device).reshape(-1))

    def compute(self) -> Tensor:
        if isinstance(self.values, list) and not self.values:
            return torch.zeros(0, dtype=torch.int64)
        return dim_zero_cat(self.values)  # a list of updates, or one tensor after a distributed sync


class DistinctN(Metric):
    """Distinct-n over every response seen by every rank: n-grams are kept as 64-bit hashes, so
    the distinct count is taken over the union of all ranks' n-grams, not averaged per rank."""

    full_state_update = False

    def __init__(self, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.add_state("hashes", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, texts: Sequence[str]) -> None:
        hs = [stable_hash("\x1f".join(g)) for t in texts for g in ngrams(t, self.n)]
        self.hashes.append(torch.tensor(hs, dtype=torch.int64, device=self.device))
        self.total += len(hs)

    def compute(self) -> Tensor:
        total = int(self.total)
        if total == 0:
            return torch.tensor(0.0)
        return torch.tensor(torch.unique(dim_zero_cat(self.hashes)).numel() / total)


def check_eval_rewards(backends: Optional[Sequence[RewardBackend]]) -> list[RewardBackend]:
    """The ``model.eval_rewards`` list, checked: reward backends with distinct names."""
    backends = list(backends or [])
    for i, b in enumerate(backends):
        if not isinstance(b, RewardBackend):
            raise TypeError(f"model.eval_rewards[{i}] must be a RewardBackend, got {type(b).__name__}")
    names = [b.name for b in backends]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model.eval_rewards: backend names must be unique, {dup} repeats; "
                         f"set 'name' on those backends")
    return backends


# -------------------------------------------------------------------------------------------
# The evaluator the module's test hooks delegate to
# -------------------------------------------------------------------------------------------
class TestEvaluator:
    """Collects paired RLHF/SFT test samples and turns them into the report.

    Per sample it keeps (in ``CatMetric`` states, one per column ``<adapter>/<field>``): every score
    series and its validity, the sequence KL to the reference, the response length and whether it
    stopped; plus a hash of the prompt (to pair samples per prompt) and the n-grams of the
    responses (distinct-n). Score series: ``reward`` (the configured reward), ``eval/<name>`` (each
    ``model.eval_rewards`` backend) and ``component/<name>`` (the configured reward's components,
    when it has several, e.g. a :class:`~rlhf_lit.rewards.Composite`).

    Args:
        reward_label: How the report names the configured reward.
        device: Where the metric states live (the module's device: NCCL gathers CUDA tensors).
        seed: Seed of the bootstrap and of the random sample prompts.
        bootstrap_resamples: Resamples of the bootstrap CI on the mean gain.
        confidence: Confidence level of that interval.
        n_examples: Prompts shown per group (highest gain, lowest gain, random) in ``report.md``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, reward_label: str = REWARD, device: torch.device | str = "cpu", seed: int = 0,
                 bootstrap_resamples: int = 1000, confidence: float = 0.95, n_examples: int = 3) -> None:
        self.reward_label = reward_label
        self.device = torch.device(device)
        self.seed, self.bootstrap_resamples, self.confidence = seed, bootstrap_resamples, confidence
        self.n_examples = n_examples
        self.columns: dict[str, CatMetric] = {}
        self.labels: dict[str, str] = {}  # series -> label, in first-seen order
        self.prompt_keys = Int64Cat().to(self.device)
        self.distinct = {a: {n: DistinctN(n).to(self.device) for n in (1, 2)} for a in ADAPTERS}
        self.rows: list[dict[str, Any]] = []

    def _add(self, column: str, values: Tensor) -> None:
        if column not in self.columns:
            self.columns[column] = CatMetric(nan_strategy="disable").to(self.device)
        self.columns[column].update(values.detach().float().reshape(-1).to(self.device))

    def update(self, ids: Sequence[str], prompts: Sequence[str], results: dict[str, dict[str, Any]],
               sample: int = 0) -> None:
        """Add one paired draw for a batch of prompts.

        Args:
            ids, prompts: The batch's prompt ids and texts.
            results: ``{"rlhf": r, "sft": r}`` where ``r`` is ``PPOModule._score_and_kl``'s output:
                ``scores``, ``valid``, ``kl``, ``length``, ``eos`` (``(B,)`` tensors), ``texts``, and
                optionally ``components`` (name -> ``(B,)``) and ``eval`` (name -> RewardOutput).
            sample: Index of this draw among the prompt's ``eval_samples_per_prompt``.
        """
        self.prompt_keys.update(torch.tensor([stable_hash(f"{i}\x1f{p}") for i, p in zip(ids, prompts)]))
        per_adapter = {}
        for a in ADAPTERS:
            r = results[a]
            series = _series(r, self.reward_label)
            for name, (label, scores, valid) in series.items():
                self.labels.setdefault(name, label)
                self._add(f"{a}/{name}", scores)
                self._add(f"{a}/{name}:valid", valid)
            for f in ("kl", "length", "eos"):
                self._add(f"{a}/{f}", torch.as_tensor(r[f]))
            for m in self.distinct[a].values():
                m.update(r["texts"])
            per_adapter[a] = series
        for i, (pid, prompt) in enumerate(zip(ids, prompts)):
            row: dict[str, Any] = {"id": pid, "sample": sample, "prompt": prompt}
            for a in ("rlhf", "sft"):
                r = results[a]
                row[f"{a}_texts"] = r["texts"][i]
                row[f"{a}_scores"] = float(r["scores"][i])
                row[f"{a}_valid"] = bool(r["valid"][i])
                for f in ("kl", "length"):
                    row[f"{a}_{f}"] = float(r[f][i])
                row[f"{a}_eos"] = bool(r["eos"][i])
                for name, (_, scores, valid) in per_adapter[a].items():
                    if name != REWARD:
                        row[f"{a}_{name}"] = float(scores[i]) if bool(valid[i]) else None
            row["gain"] = row["rlhf_scores"] - row["sft_scores"] if row["rlhf_valid"] and row["sft_valid"] else None
            self.rows.append(row)

    def compute(self) -> dict[str, Any]:
        """The report's figures from every rank's samples (a collective call: all ranks must make it)."""
        columns = {k: self.columns[k].compute().double().cpu() for k in sorted(self.columns)}
        keys = self.prompt_keys.compute().cpu()
        distinct = {a: {f"distinct_{n}": float(m.compute()) for n, m in self.distinct[a].items()} for a in ADAPTERS}
        report = build_report(columns, keys, distinct, self.labels, self.bootstrap_resamples,
                              self.confidence, self.seed)
        report["_columns"] = columns  # per-sample values for the histogram; dropped from report.json
        return report

    def finish(self, module) -> dict[str, float]:
        """Compute the report (all ranks), write it (rank 0), return the headline metrics to log."""
        from rlhf_lit.run_logging import RunLog, run_dir, tensorboard_writer

        trainer = module.trainer
        log_dir = run_dir(trainer)  # a broadcast under DDP: every rank reads it exactly once
        report = self.compute()
        rows = _gather_objects(self.rows)
        report["run"] = run_info(module, report, log_dir)
        if report["run"]["policy_is_sft"] and trainer.is_global_zero:
            log.warning("test: no --ckpt_path and no model.policy.policy_adapter, so the 'RLHF' policy is the SFT "
                        "adapter itself; the report compares SFT with SFT")
        if trainer.is_global_zero and log_dir:
            RunLog(trainer, log_dir).write_test_samples(rows)
            write_report(Path(log_dir), report, rows, n_examples=self.n_examples, seed=self.seed,
                         writer=tensorboard_writer(trainer), step=module.rollouts_done)
        return headline_metrics(report)


def _series(r: dict[str, Any], reward_label: str = REWARD) -> dict[str, tuple[str, Tensor, Tensor]]:
    """Score series of one adapter's results: name -> (label, scores, valid)."""
    valid = torch.as_tensor(r["valid"]).bool()
    out = {REWARD: (reward_label, torch.as_tensor(r["scores"]).float(), valid)}
    components = r.get("components") or {}
    if len(components) > 1:
        for name, comp in components.items():
            out[f"component/{name}"] = (f"{name} (component, raw)", torch.as_tensor(comp).float().cpu(), valid.cpu())
    for name, o in (r.get("eval") or {}).items():
        o = o if isinstance(o, RewardOutput) else RewardOutput(*o)
        out[f"eval/{name}"] = (f"{name} (evaluation only)", o.scores.float(), o.valid.bool())
    return out


def _gather_objects(rows: list) -> list:
    """Every rank's rows, rank by rank (a collective call under data parallelism)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(rows)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for p in parts for r in p]


# -------------------------------------------------------------------------------------------
# The report
# -------------------------------------------------------------------------------------------
def build_report(columns: dict[str, Tensor], prompt_keys: Tensor, distinct: dict[str, dict[str, float]],
                 labels: dict[str, str], bootstrap_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, Any]:
    """The report's figures from per-sample columns (``<adapter>/<series>``, ``<adapter>/<series>:valid``,
    ``<adapter>/kl|length|eos``), one prompt key per sample and distinct-n per adapter.

    Per score series: ``sft``/``rlhf`` summary stats over valid samples; ``gain``: RLHF − SFT over
    the pairs both scored, averaged per prompt then over prompts, with its bootstrap CI over prompts;
    the paired win rate. Then KL, length, EOS rate and distinct-n per adapter.
    """
    keys = torch.as_tensor(prompt_keys).reshape(-1)
    scores: dict[str, Any] = {}
    for name, label in labels.items():
        entry: dict[str, Any] = {"label": label}
        val = {a: columns[f"{a}/{name}:valid"] > 0.5 for a in ADAPTERS}
        for a in ADAPTERS:
            entry[a] = summary_stats(columns[f"{a}/{name}"][val[a]])
        both = val["rlhf"] & val["sft"]
        diff = columns[f"rlhf/{name}"][both] - columns[f"sft/{name}"][both]
        per_prompt = group_means(diff, keys[both]) if len(diff) else diff
        lo, hi = bootstrap_ci(per_prompt, bootstrap_resamples, confidence, seed)
        entry["gain"] = {"mean": float(per_prompt.mean()) if len(per_prompt) else None, "ci_low": lo, "ci_high": hi,
                         "pairs": int(both.sum()), "prompts": int(len(per_prompt))}
        entry.update(win_rate(columns[f"rlhf/{name}"][both], columns[f"sft/{name}"][both]))
        scores[name] = entry
    return {
        "n_prompts": int(torch.unique(keys).numel()),
        "n_pairs": int(keys.numel()),
        "bootstrap": {"resamples": bootstrap_resamples, "confidence": confidence, "seed": seed,
                      "unit": "prompt (mean of its samples' gains)"},
        "scores": scores,
        "kl": {a: summary_stats(columns[f"{a}/kl"]) for a in ADAPTERS},
        "length": {a: summary_stats(columns[f"{a}/length"]) for a in ADAPTERS},
        "eos_rate": {a: float(columns[f"{a}/eos"].mean()) if keys.numel() else None for a in ADAPTERS},
        "distinct": {a: dict(distinct[a]) for a in ADAPTERS},
    }


def run_info(module, report: dict[str, Any], log_dir: Optional[str] = None) -> dict[str, Any]:
    """What was compared, how it was sampled, where it was written."""
    cfg = module.policy_config
    trainer = module.trainer
    sampling = module.eval_sampling
    ckpt = getattr(trainer, "ckpt_path", None)
    info = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(log_dir) if log_dir else None,
        "base_model": cfg.base_model,
        "sft_adapter": cfg.sft_adapter,
        "policy_adapter": cfg.policy_adapter,
        "checkpoint": str(ckpt) if ckpt else None,
        "rollouts_trained": int(module.rollouts_done),
        "reward": f"{type(module.reward).__name__} ({module.reward.name})",
        "eval_rewards": [f"{type(b).__name__} ({b.name})" for b in getattr(module, "eval_rewards", [])],
        "sampling": asdict(sampling) if is_dataclass(sampling) else dict(vars(sampling)),
        "samples_per_prompt": int(module.eval_samples_per_prompt),
        "seed": int(module.seed),
        "world_size": int(trainer.world_size),
        "policy_is_sft": ckpt is None and cfg.policy_adapter is None,
    }
    if cfg.policy_adapter:
        recorded = _adapter_base(cfg.policy_adapter)
        info["policy_adapter_base_model"] = recorded
    return info


def _adapter_base(folder: str) -> Optional[str]:
    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The scalars logged with ``self.log`` (and shown in Lightning's test table)."""
    nan = float("nan")
    val = lambda x: nan if x is None else float(x)  # noqa: E731
    r = report["scores"][REWARD]
    out = {}
    for a in ("rlhf", "sft"):
        out[f"test/score_{a}"] = val(r[a]["mean"])
        out[f"test/kl_{a}"] = val(report["kl"][a]["mean"])
        out[f"test/length_{a}"] = val(report["length"][a]["mean"])
        out[f"test/eos_rate_{a}"] = val(report["eos_rate"][a])
        out[f"test/distinct_2_{a}"] = val(report["distinct"][a]["distinct_2"])
    out["test/win_rate"] = val(r["win_rate"])
    out["test/gain"] = val(r["gain"]["mean"])
    out["test/gain_ci_low"], out["test/gain_ci_high"] = val(r["gain"]["ci_low"]), val(r["gain"]["ci_high"])
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as ``a/b/c`` -> float (labels, strings and None left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out |= flatten(v, key)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(run_dir: Path, report: dict[str, Any], rows: list[dict[str, Any]], n_examples: int = 3,
                 seed: int = 0, writer=None, step: int = 0) -> None:
    """Write ``report.json``, ``reward_histogram.png`` and ``report.md`` into ``run_dir``, and the
    same figures, histogram and samples to the TensorBoard ``writer`` (a SummaryWriter) if given."""
    run_dir = Path(run_dir)
    columns = report.get("_columns", {})
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["files"] = {"report": REPORT_MD, "histogram": HISTOGRAM_PNG, "test_samples": TEST_SAMPLES,
                       "training_samples": TRAIN_SAMPLES}
    write_text_atomic(run_dir / REPORT_JSON, json.dumps(_clean(public), indent=2, ensure_ascii=False))

    fig = histogram_figure(report, columns)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_bytes_atomic(run_dir / HISTOGRAM_PNG, png.getvalue())

    examples = pick_examples(rows, n_examples, seed)
    md = render_markdown(public, examples)
    write_text_atomic(run_dir / REPORT_MD, md)

    if writer is not None:
        for k, v in flatten({k: public[k] for k in ("scores", "kl", "length", "eos_rate", "distinct")}).items():
            if math.isfinite(v):
                writer.add_scalar(f"test_report/{k}", v, global_step=step)
        writer.add_figure("test_report/reward_histogram", fig, global_step=step, close=False)
        for a in ADAPTERS:
            col, val = columns.get(f"{a}/{REWARD}"), columns.get(f"{a}/{REWARD}:valid")
            if col is not None and bool((val > 0.5).any()):
                writer.add_histogram(f"test_report/reward_{a}", col[val > 0.5], global_step=step)
        writer.add_text("test_report/report", md.split("\n## Reward distribution")[0], global_step=step)
        writer.add_text("test_report/samples", render_examples(examples), global_step=step)
        writer.flush()


def histogram_figure(report: dict[str, Any], columns: dict[str, Tensor]):
    """One panel per score series (the configured reward first): SFT and RLHF histograms on shared bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["scores"])[:6]
    fig = Figure(figsize=(5.2 * min(len(names), 3), 3.6 * math.ceil(len(names) / 3)))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names, 1):
        ax = fig.add_subplot(math.ceil(len(names) / 3), min(len(names), 3), i)
        data = {a: columns[f"{a}/{name}"][columns[f"{a}/{name}:valid"] > 0.5].numpy() for a in ADAPTERS}
        both = np.concatenate(list(data.values()))
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
            for a, color in (("sft", "tab:blue"), ("rlhf", "tab:orange")):
                mean = report["scores"][name][a]["mean"]
                ax.hist(data[a], bins=bins, alpha=0.55, color=color,
                        label=f"{LABELS[a]} (mean {_fmt(mean)}, n={len(data[a])})")
                if mean is not None:
                    ax.axvline(mean, color=color, linestyle="--", linewidth=1)
            ax.legend(fontsize=8)
        ax.set_title(report["scores"][name]["label"], fontsize=10)
        ax.set_xlabel("score")
        ax.set_ylabel("samples")
    fig.suptitle("Test-prompt scores: SFT vs RLHF adapter (same prompts, same seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def pick_examples(rows: list[dict[str, Any]], n: int = 3, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Prompts to show: the ``n`` with the highest and lowest mean gain (configured reward) and
    ``n`` random others (seeded); each with its samples (at most 2 per prompt)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["id"], r["prompt"]), []).append(r)
    scored = []
    for key, rs in groups.items():
        gains = [r["gain"] for r in rs if r.get("gain") is not None]
        scored.append((sum(gains) / len(gains) if gains else None, key, sorted(rs, key=lambda r: r["sample"])[:2]))
    ranked = sorted((s for s in scored if s[0] is not None), key=lambda s: s[0], reverse=True)
    top = ranked[:n]
    bottom = [s for s in ranked[::-1][:n] if s not in top]
    rest = [s for s in scored if s not in top and s not in bottom]
    rnd = random.Random(seed).sample(rest, min(n, len(rest)))
    fmt = lambda group: [{"id": k[0], "prompt": k[1], "gain": g, "samples": rs} for g, k, rs in group]  # noqa: E731
    return {"highest gain": fmt(top), "lowest gain": fmt(bottom), "random": fmt(rnd)}


# -------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------
def _fmt(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def render_markdown(report: dict[str, Any], examples: dict[str, list[dict[str, Any]]]) -> str:
    run = report.get("run", {})
    s = run.get("sampling", {})
    conf = int(round(100 * report["bootstrap"]["confidence"]))
    if run.get("checkpoint"):
        policy = f"checkpoint `{run['checkpoint']}` (after {run.get('rollouts_trained')} rollouts)"
    elif run.get("policy_adapter"):
        policy = f"adapter folder `{run['policy_adapter']}`"
        if run.get("policy_adapter_base_model"):
            policy += f" (its adapter_config.json names the base model `{run['policy_adapter_base_model']}`)"
    else:
        policy = "the SFT adapter itself (no `--ckpt_path` and no `model.policy.policy_adapter`)"
    lines = [
        "# RLHF adapter vs SFT adapter on the test prompts", "",
        f"- **RLHF policy**: {policy}",
        f"- **SFT reference**: `{run.get('sft_adapter')}` on base model `{run.get('base_model')}`",
        f"- **Prompts**: {report['n_prompts']} test prompts, {run.get('samples_per_prompt', '?')} sample(s) per "
        f"prompt and adapter = {report['n_pairs']} paired samples; both adapters sample each prompt with the same "
        f"seed (seed {run.get('seed')}) and settings: temperature {s.get('temperature')}, top-k {s.get('top_k')}, "
        f"top-p {s.get('top_p')}, at most {s.get('max_new_tokens')} new tokens",
        f"- **Reward**: {run.get('reward')}"
        + (f"; evaluation only: {', '.join(run['eval_rewards'])}" if run.get("eval_rewards") else ""),
        f"- **Files**: every test prompt with both responses and all scores is in `{TEST_SAMPLES}` (the run's "
        f"`{TRAIN_SAMPLES}` holds training samples); every figure of this report is in `{REPORT_JSON}`.",
    ]
    if run.get("policy_is_sft"):
        lines += ["", "> **Warning**: no trained policy was given, so both columns are the SFT adapter. Pass "
                      "`--ckpt_path last` (or a checkpoint) or `--model.policy.policy_adapter=<folder>`."]
    lines += ["", "## Scores", "",
              "Over the samples each backend could score. p10/p90: 10th/90th percentiles.", "",
              "| score | adapter | mean | std | median | p10 | p90 | n |", "|---|---|---|---|---|---|---|---|"]
    for name, e in report["scores"].items():
        for a in ADAPTERS:
            st = e[a]
            label = markdown_cell(e["label"], CELL_CHARS) if a == "sft" else ""
            lines.append(f"| {label} | {LABELS[a]} | {_fmt(st['mean'])} | "
                         f"{_fmt(st['std'])} | {_fmt(st['median'])} | {_fmt(st['p10'])} | {_fmt(st['p90'])} | {st['n']} |")
    lines += ["", "## RLHF vs SFT, paired", "",
              f"Gain = RLHF score − SFT score on the same prompt and seed, averaged per prompt, then over prompts; "
              f"{conf}% CI: percentile bootstrap over prompts ({report['bootstrap']['resamples']} resamples). "
              f"Win rate: share of pairs where RLHF scores higher (ties count half).", "",
              f"| score | gain | {conf}% CI | win rate | wins / ties / losses | pairs |", "|---|---|---|---|---|---|"]
    for name, e in report["scores"].items():
        g = e["gain"]
        lines.append(f"| {markdown_cell(e['label'], CELL_CHARS)} | {_fmt(g['mean'], True)} | [{_fmt(g['ci_low'], True)}, "
                     f"{_fmt(g['ci_high'], True)}] | {_fmt(e['win_rate'])} | {e['wins']} / {e['ties']} / {e['losses']} "
                     f"| {g['pairs']} |")
    kl, ln = report["kl"], report["length"]
    lines += ["", "## Responses", "",
              "KL: sequence KL of the adapter to the SFT reference on its own samples (sum over tokens of "
              "log p − log p_ref, nats; 0 for SFT by definition). Length in tokens, stop token included. "
              "EOS rate: share of responses that stopped before the token limit. Distinct-n: distinct word "
              "n-grams over all n-grams of the adapter's responses.", "",
              "| | SFT | RLHF |", "|---|---|---|"]
    for label, f in (("KL to reference, mean", lambda a: kl[a]["mean"]), ("KL, median", lambda a: kl[a]["median"]),
                     ("KL, p90", lambda a: kl[a]["p90"]), ("length, mean", lambda a: ln[a]["mean"]),
                     ("length, median", lambda a: ln[a]["median"]), ("EOS rate", lambda a: report["eos_rate"][a]),
                     ("distinct-1", lambda a: report["distinct"][a]["distinct_1"]),
                     ("distinct-2", lambda a: report["distinct"][a]["distinct_2"])):
        lines.append(f"| {label} | {_fmt(f('sft'))} | {_fmt(f('rlhf'))} |")
    lines += ["", "## Reward distribution", "", f"![SFT vs RLHF score histograms]({HISTOGRAM_PNG})", "",
              "## Sample conversations", "", render_examples(examples), ""]
    return "\n".join(lines)


def render_examples(examples: dict[str, list[dict[str, Any]]]) -> str:
    """Side-by-side SFT / RLHF responses of the picked prompts."""
    out = []
    for group, items in examples.items():
        out += [f"### {group[0].upper()}{group[1:]}", ""]
        if not items:
            out += ["(none)", ""]
        for it in items:
            out += [f"**Prompt `{it['id']}`** (mean gain {_fmt(it['gain'], True)}):", "",
                    "> " + markdown_cell(it["prompt"], PROMPT_CHARS), "",
                    "| sample | SFT | RLHF |", "|---|---|---|"]
            for r in it["samples"]:
                sft, rlhf = markdown_cell(r["sft_texts"], CELL_CHARS), markdown_cell(r["rlhf_texts"], CELL_CHARS)
                out.append(f"| {r['sample']} | {sft} | {rlhf} |")
                out.append(f"| score | {_fmt(r['sft_scores'] if r['sft_valid'] else None)} | "
                           f"{_fmt(r['rlhf_scores'] if r['rlhf_valid'] else None)} |")
            out.append("")
    return "\n".join(out)


__all__ = [
    "DistinctN", "Int64Cat", "TestEvaluator", "bootstrap_ci", "build_report", "check_eval_rewards",
    "distinct_n", "flatten", "group_means", "headline_metrics", "ngrams", "pick_examples",
    "render_markdown", "stable_hash", "summary_stats", "win_rate", "write_report",
]
