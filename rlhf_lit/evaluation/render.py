"""The test report as files and TensorBoard entries.

:func:`write_report` writes, into the run folder, ``report.json`` (the figures of
:func:`~rlhf_lit.evaluation.report.build_report`), ``reward_histogram.png``
(:func:`histogram_figure`) and ``report.md`` (:func:`render_markdown`, with the sample
conversations chosen by :func:`pick_examples` and laid out by :func:`render_examples`), each file
replaced atomically; and sends the same figures, the histogram and the samples to TensorBoard.
Everything except :func:`write_report` is a pure function of the report and the sample rows.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from rlhf_lit.atomic_files import write_bytes_atomic, write_text_atomic
from rlhf_lit.markdown import markdown_cell

from .report import (ADAPTERS, HISTOGRAM_PNG, LABELS, REPORT_JSON, REPORT_MD, REWARD, TEST_SAMPLES, TRAIN_SAMPLES,
                     flatten)

CELL_CHARS, PROMPT_CHARS = 600, 1000  #: report.md shows at most this much of a response / a prompt


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
    """The text of ``report.md``: what was compared, then the score, paired-gain and response
    tables, the histogram link and the sample conversations.

    Args:
        report: The report without its ``_``-prefixed entries; its ``run`` section
            (:func:`~rlhf_lit.evaluation.evaluator.run_info`) is used when present.
        examples: :func:`pick_examples`' choice of prompts.
    """
    run = report.get("run", {})
    s = run.get("sampling", {})
    conf = int(round(100 * report["bootstrap"]["confidence"]))
    if run.get("checkpoint"):
        trained = (f"{run['rollouts_trained']} rollouts" if run.get("rollouts_trained") is not None
                   else f"{run.get('steps_trained')} optimizer steps")
        policy = f"checkpoint `{run['checkpoint']}` (after {trained})"
    elif run.get("policy_adapter"):
        policy = f"adapter folder `{run['policy_adapter']}`"
        if run.get("policy_adapter_base_model"):
            policy += f" (its adapter_config.json names the base model `{run['policy_adapter_base_model']}`)"
    else:
        policy = "the SFT adapter itself (no `--ckpt_path` and no `model.policy.policy_adapter`)"
    lines = [
        "# RLHF adapter vs SFT adapter on the test prompts", "",
        f"- **RLHF policy**: {policy}" + (f", trained with {run['algorithm']}" if run.get("algorithm") else ""),
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
    lines += render_preference(report.get("preference"))
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


def render_preference(pref: dict[str, Any] | None) -> list[str]:
    """Lines of the held-out preference-pair section (the DPO stage's ``preference`` figures), or none."""
    if not pref:
        return []
    lines = ["", "## Held-out preference pairs", "",
             f"{pref.get('pairs')} test pairs. Implicit reward r = beta (log p − log p_ref) of each response "
             f"(beta {pref.get('beta')}); accuracy: share of pairs where r(chosen) > r(rejected) (ties lose, "
             f"as in TRL); margin: mean r(chosen) − r(rejected).", "",
             "| figure | value |", "|---|---|"]
    for key, label in (("accuracy", "accuracy"), ("margin", "margin, mean"), ("loss", f"{pref.get('loss_type')} loss"),
                       ("rewards_chosen", "r(chosen), mean"), ("rewards_rejected", "r(rejected), mean"),
                       ("logps_chosen", "log p(chosen), mean"), ("logps_rejected", "log p(rejected), mean")):
        if key in pref:
            lines.append(f"| {label} | {_fmt(pref[key])} |")
    return lines


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



__all__ = ["histogram_figure", "pick_examples", "render_examples", "render_markdown", "render_preference", "write_report"]
