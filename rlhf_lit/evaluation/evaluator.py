"""The evaluator that the policy stages' test hooks drive (``PPOModule``, ``DPOModule``): :class:`TestEvaluator` collects the paired
RLHF/SFT samples of every test batch in torchmetrics states, and at the end of the test computes
the report over every rank's samples, writes it (rank 0) and returns the headline metrics.

Also here: :func:`check_eval_rewards` (validates ``model.eval_rewards``) and :func:`run_info`
(what was compared, for the report's ``run`` section).
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import CatMetric

from rlhf_lit.rewards.base import RewardBackend, RewardOutput
from rlhf_lit.run_logging import RunLog, run_dir, tensorboard_writer

from .render import write_report
from .report import ADAPTERS, REWARD, build_report, headline_metrics
from .stats import DistinctN, Int64Cat, stable_hash

log = logging.getLogger(__name__)


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

    Attributes:
        extra: Sections a stage adds to the report (e.g. ``preference``: the DPO stage's held-out
            pair accuracy and margins), written to ``report.json`` and rendered in ``report.md``.
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
        self.extra: dict[str, Any] = {}

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
        trainer = module.trainer
        log_dir = run_dir(trainer)  # a broadcast under DDP: every rank reads it exactly once
        report = self.compute()
        if self.extra:
            report.update(self.extra)
        rows = _gather_objects(self.rows)
        report["run"] = run_info(module, report, log_dir)
        if report["run"]["policy_is_sft"] and trainer.is_global_zero:
            log.warning("test: no --ckpt_path and no model.policy.policy_adapter, so the 'RLHF' policy is the SFT "
                        "adapter itself; the report compares SFT with SFT")
        if trainer.is_global_zero and log_dir:
            RunLog(trainer, log_dir).write_test_samples(rows)
            write_report(Path(log_dir), report, rows, n_examples=self.n_examples, seed=self.seed,
                         writer=tensorboard_writer(trainer),
                         step=getattr(module, "rollouts_done", getattr(module, "steps_done", 0)))
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
        "algorithm": getattr(module, "algorithm", type(module).__name__),
        "rollouts_trained": int(module.rollouts_done) if hasattr(module, "rollouts_done") else None,
        "steps_trained": int(module.steps_done) if hasattr(module, "steps_done") else None,
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



__all__ = ["TestEvaluator", "check_eval_rewards", "run_info"]
