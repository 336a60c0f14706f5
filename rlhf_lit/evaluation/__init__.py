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

Where things are (each file imports only the ones above it):

- ``stats.py``: the statistics, pure functions of 1-D tensors (:func:`summary_stats`,
  :func:`win_rate`, :func:`group_means`, :func:`bootstrap_ci`, :func:`distinct_n`, ...), and the
  torchmetrics states that concatenate values across ranks (:class:`Int64Cat`, :class:`DistinctN`);
- ``report.py``: the report as data: series, adapter and file names, :func:`build_report` (the
  figures), :func:`headline_metrics` and :func:`flatten` (scalars for the loggers);
- ``render.py``: the report as files and TensorBoard entries: :func:`write_report`,
  :func:`render_markdown`, :func:`render_examples`, :func:`pick_examples`, :func:`histogram_figure`;
- ``evaluator.py``: :class:`TestEvaluator`, which ``PPOModule``'s test hooks drive (collect, gather
  across ranks, write, log), :func:`check_eval_rewards` and :func:`run_info`.

Every name is importable from ``rlhf_lit.evaluation`` itself, as before the split into files.
"""

from rlhf_lit.rewards.base import RewardOutput  # noqa: F401 - was importable from here; tests use it

from .evaluator import TestEvaluator, _gather_objects, check_eval_rewards, run_info  # noqa: F401
from .render import histogram_figure, pick_examples, render_examples, render_markdown, write_report  # noqa: F401
from .report import (ADAPTERS, HISTOGRAM_PNG, LABELS, REPORT_JSON, REPORT_MD, REWARD, TEST_SAMPLES,  # noqa: F401
                     TRAIN_SAMPLES, build_report, flatten, headline_metrics)
from .stats import (DistinctN, Int64Cat, bootstrap_ci, distinct_n, group_means, ngrams, stable_hash, summary_stats,
                    win_rate)

__all__ = [
    "DistinctN", "Int64Cat", "TestEvaluator", "bootstrap_ci", "build_report", "check_eval_rewards",
    "distinct_n", "flatten", "group_means", "headline_metrics", "ngrams", "pick_examples",
    "render_markdown", "stable_hash", "summary_stats", "win_rate", "write_report",
]
