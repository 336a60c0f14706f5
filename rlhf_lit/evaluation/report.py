"""The test report as data: which series and adapters it has, which files it is written to, and
its figures (:func:`build_report`, the content of ``report.json``) computed from per-sample columns.

Also the scalars taken out of it: :func:`headline_metrics` (logged with ``self.log``) and
:func:`flatten` (every numeric leaf, for TensorBoard). No file I/O; rendering and writing are in
``render.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .stats import bootstrap_ci, group_means, summary_stats, win_rate

ADAPTERS = ("sft", "rlhf")  #: report order: the baseline first
LABELS = {"sft": "SFT", "rlhf": "RLHF"}
REWARD = "reward"  #: series name of the configured (trained-on) reward
REPORT_MD, REPORT_JSON = "report.md", "report.json"
HISTOGRAM_PNG, TEST_SAMPLES = "reward_histogram.png", "test_samples.jsonl"
TRAIN_SAMPLES = "samples.jsonl"


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


__all__ = [
    "ADAPTERS", "HISTOGRAM_PNG", "LABELS", "REPORT_JSON", "REPORT_MD", "REWARD", "TEST_SAMPLES", "TRAIN_SAMPLES",
    "build_report", "flatten", "headline_metrics",
]
