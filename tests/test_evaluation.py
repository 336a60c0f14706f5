"""``python -m rlhf_lit test``: the RLHF-vs-SFT report (files, TensorBoard, figures against direct
computation), an exported adapter as the policy, and the evaluation notebook."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_lit import evaluation as ev

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
NOTEBOOK = ROOT / "notebooks" / "evaluation.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LENGTH_EVAL = '--model.eval_rewards=[{"class_path": "rlhf_lit.rewards.LengthPenalty", "init_args": {"name": "words"}}]'
COMPOSITE = ('--model.reward={"class_path": "rlhf_lit.rewards.Composite", "init_args": {"backends": ['
             '{"class_path": "rlhf_lit.rewards.Profanity"}, {"class_path": "rlhf_lit.rewards.LengthPenalty"}], '
             '"weights": [1.0, -0.01]}}')


def fast_args(run_dir: Path, *extra: str) -> list[str]:
    """The demo config shrunk to seconds: 8 prompts per rollout, 12 new tokens, one test batch of 4."""
    return [
        "--config", DEMO,
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.limit_test_batches=1",
        "--data.batch_size=8",
        "--data.eval_batch_size=4",
        f"--data.prompt_file={ROOT / 'prompts' / 'demo_prompts.jsonl'}",
        "--model.ppo.ppo_epochs=2",
        "--model.sampling.max_new_tokens=12",
        *extra,
    ]


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory):
    """A 1-rollout fit, then ``test --ckpt_path last`` with an evaluation-only backend."""
    run_dir = tmp_path_factory.mktemp("evalrun")
    run_cli("fit", *fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))
    cli = run_cli("test", *fast_args(run_dir, LENGTH_EVAL), "--ckpt_path=last")
    return run_dir, cli


def _finite_numbers(x, where="report"):
    if isinstance(x, dict):
        for k, v in x.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        assert math.isfinite(x), where


# ---------------------------------------------------------------------------------------------
# End to end on the tiny demo
# ---------------------------------------------------------------------------------------------
def test_report_files_and_tensorboard(tested_run):
    run_dir, cli = tested_run
    report = json.loads((run_dir / "report.json").read_text())
    assert {"run", "n_prompts", "n_pairs", "bootstrap", "scores", "kl", "length", "eos_rate", "distinct"} <= set(report)
    assert report["n_prompts"] == 4 and report["n_pairs"] == 4  # one test batch of 4, one sample each
    assert set(report["scores"]) == {"reward", "eval/words"}
    for name, entry in report["scores"].items():
        assert {"label", "sft", "rlhf", "gain", "win_rate", "wins", "ties", "losses"} <= set(entry), name
        assert {"mean", "std", "median", "p10", "p90", "n"} <= set(entry["rlhf"])
        g = entry["gain"]
        assert g["ci_low"] <= g["mean"] <= g["ci_high"], name
        assert entry["wins"] + entry["ties"] + entry["losses"] == g["pairs"] == 4
        _finite_numbers(entry, name)
    for key in ("kl", "length", "eos_rate", "distinct"):
        _finite_numbers(report[key], key)
    assert report["kl"]["sft"]["mean"] == 0.0 and report["kl"]["rlhf"]["mean"] != 0.0
    assert report["run"]["checkpoint"].endswith("last.ckpt") and report["run"]["rollouts_trained"] == 1

    rows = [json.loads(x) for x in (run_dir / "test_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {"id", "sample", "prompt", "rlhf_texts", "sft_texts", "rlhf_scores", "sft_scores", "rlhf_kl",
            "rlhf_length", "rlhf_eos", "rlhf_eval/words", "sft_eval/words", "gain"} <= set(rows[0])
    # The report's figures are those of the rows.
    rl = np.array([r["rlhf_scores"] for r in rows])
    assert report["scores"]["reward"]["rlhf"]["mean"] == pytest.approx(rl.mean(), rel=1e-5)
    words = [r["sft_eval/words"] for r in rows]
    assert report["scores"]["eval/words"]["sft"]["median"] == pytest.approx(np.median(words))
    assert report["distinct"]["rlhf"]["distinct_1"] == pytest.approx(ev.distinct_n([r["rlhf_texts"] for r in rows], 1))

    png = run_dir / "reward_histogram.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

    md = (run_dir / "report.md").read_text()
    for text in ("## Scores", "## RLHF vs SFT, paired", "## Responses", "distinct-2", "](reward_histogram.png)",
                 "### Highest gain", "### Lowest gain", "### Random", "`test_samples.jsonl`", "`samples.jsonl`"):
        assert text in md, text
    assert rows[0]["prompt"][:40] in md or rows[1]["prompt"][:40] in md

    metrics = cli.trainer.callback_metrics
    assert metrics["test/score_rlhf"] == pytest.approx(report["scores"]["reward"]["rlhf"]["mean"], rel=1e-5)
    assert metrics["test/win_rate"] == pytest.approx(report["scores"]["reward"]["win_rate"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"test_report/scores/reward/gain/mean", "test_report/kl/rlhf/mean",
            "test_report/distinct/rlhf/distinct_2"} <= set(tags["scalars"])
    assert "test_report/reward_histogram" in tags["images"]
    assert {"test_report/samples/text_summary", "test_report/report/text_summary"} <= set(tags["tensors"])


def test_exported_adapter_as_policy(tested_run, tmp_path):
    """``--model.policy.policy_adapter=<run>/adapter`` without a checkpoint evaluates the same policy
    (same seeds: the same responses); a composite reward reports its components."""
    run_dir, _ = tested_run
    out = tmp_path / "adapter_test"
    run_cli("test", *fast_args(out, COMPOSITE), f"--model.policy.policy_adapter={run_dir / 'adapter'}")
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["policy_adapter"] == str(run_dir / "adapter") and report["run"]["checkpoint"] is None
    assert {"reward", "component/profanity", "component/length", "component/total"} == set(report["scores"])
    first = {r["id"]: r for r in map(json.loads, (run_dir / "test_samples.jsonl").read_text().splitlines())}
    for r in map(json.loads, (out / "test_samples.jsonl").read_text().splitlines()):
        assert r["rlhf_texts"] == first[r["id"]]["rlhf_texts"] and r["sft_texts"] == first[r["id"]]["sft_texts"]
        assert r["rlhf_component/profanity"] == pytest.approx(first[r["id"]]["rlhf_scores"], abs=1e-6)
        assert r["rlhf_scores"] == pytest.approx(r["rlhf_component/total"], abs=1e-6)


def test_adapter_of_another_base_model_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_lit.paths import resolve_model_path

    # The demo's architecture at twice the width: every LoRA matrix has another shape.
    cfg = AutoConfig.from_pretrained(resolve_model_path("builtin:demo"))
    cfg.hidden_size, cfg.intermediate_size = 2 * cfg.hidden_size, 2 * cfg.intermediate_size
    other = AutoModelForCausalLM.from_config(cfg)
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    from rlhf_lit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"policy_adapter=.*could not be loaded on base_model='builtin:demo' "
                                           r"\(an adapter for another base model\?\)"):
        run_cli("test", *fast_args(tmp_path / "run"), f"--model.policy.policy_adapter={tmp_path / 'other'}")


# ---------------------------------------------------------------------------------------------
# The notebook
# ---------------------------------------------------------------------------------------------
def _execute_notebook(run_dir: Path, tmp_path: Path, monkeypatch):
    """Run the notebook top to bottom on a kernelspec written for this interpreter (nothing needs
    to be installed beyond ipykernel)."""
    import nbclient
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec

    name = "rlhf-lit-test"
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / name, overrides={"display_name": name})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("RLHF_LIT_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, kernel_name=name, timeout=180,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def test_notebook_runs_on_the_run_folder(tested_run, tmp_path, monkeypatch):
    run_dir, _ = tested_run
    nb = _execute_notebook(run_dir, tmp_path, monkeypatch)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # histograms + KL-reward trade-off
    text = "".join(o.get("text", "") for o in outputs)
    assert str(run_dir) in text and "training log: yes" in text


def test_notebook_without_report_fails_clearly(tmp_path, monkeypatch):
    import nbclient

    empty = tmp_path / "not_tested"
    empty.mkdir()
    with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
        _execute_notebook(empty, tmp_path, monkeypatch)
    assert "FileNotFoundError" in str(e.value) and "has no report.json" in str(e.value)
    assert "python -m rlhf_lit test" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The figures against direct computation
# ---------------------------------------------------------------------------------------------
X = [0.3, -1.2, 2.5, 0.0, 0.7, 1.1, -0.4, 3.0, 0.9, 0.2]


def test_summary_stats_match_numpy():
    s = ev.summary_stats(torch.tensor(X))
    a = np.array(X)
    assert s["n"] == 10
    assert s["mean"] == pytest.approx(a.mean()) and s["std"] == pytest.approx(a.std(ddof=1))
    assert s["median"] == pytest.approx(np.median(a))
    assert s["p10"] == pytest.approx(np.quantile(a, 0.1)) and s["p90"] == pytest.approx(np.quantile(a, 0.9))
    assert ev.summary_stats(torch.tensor([2.0]))["std"] == 0.0
    assert ev.summary_stats(torch.tensor([]))["mean"] is None


def test_win_rate_counts_ties_half():
    r = ev.win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0]))
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1) and r["win_rate"] == pytest.approx(2.5 / 4)
    assert ev.win_rate(torch.tensor([]), torch.tensor([]))["win_rate"] is None


def test_bootstrap_ci_is_the_percentile_bootstrap():
    d = np.sort(X)
    lo, hi = ev.bootstrap_ci(torch.tensor(X), n_resamples=1000, confidence=0.9, seed=3)
    rng = np.random.default_rng(3)
    means = d[rng.integers(0, len(d), (1000, len(d)))].mean(1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))
    # Seeded, and a function of the values, not of their order.
    assert ev.bootstrap_ci(torch.tensor(X), seed=3) == ev.bootstrap_ci(torch.tensor(X[::-1]), seed=3)
    assert ev.bootstrap_ci(torch.full((5,), 0.25)) == pytest.approx((0.25, 0.25))
    # Large sample: close to the normal-theory interval mean +- 1.96 sd / sqrt(n).
    big = torch.from_numpy(np.random.default_rng(0).normal(1.0, 2.0, 400))
    lo, hi = ev.bootstrap_ci(big)
    assert (hi - lo) == pytest.approx(2 * 1.96 * float(big.std()) / 20, rel=0.15)


def test_distinct_n():
    texts = ["a b a b", "a b c", ""]
    assert ev.distinct_n(texts, 1) == pytest.approx(3 / 7)  # {a, b, c} over 7 words
    assert ev.distinct_n(texts, 2) == pytest.approx(3 / 5)  # {ab, ba, bc} over 5 bigrams
    assert ev.distinct_n([""], 2) == 0.0
    m = ev.DistinctN(2)
    m.update(texts[:2])
    m.update(texts[2:])
    assert float(m.compute()) == pytest.approx(3 / 5)


def _fake_results(scores, valid, texts, kl, comps=None, extra=None):
    n = len(scores)
    r = {"scores": torch.tensor(scores), "valid": torch.tensor(valid), "kl": torch.tensor(kl),
         "length": torch.full((n,), 5.0), "eos": torch.tensor([1.0] * (n - 1) + [0.0]), "texts": texts,
         "components": {k: torch.tensor(v) for k, v in (comps or {}).items()}}
    if extra is not None:
        r["eval"] = {"judge": ev.RewardOutput(torch.tensor(extra[0]), torch.tensor(extra[1]), {}, {})}
    return r


def test_evaluator_aggregates_like_a_direct_computation(tmp_path):
    """Two draws of 3 prompts; one invalid RLHF sample; a composite reward and an eval backend."""
    e = ev.TestEvaluator("tox", seed=1, bootstrap_resamples=500)
    ids, prompts = ["p0", "p1", "p2"], ["x", "y", "z"]
    draws = [
        ({"rlhf": ([0.5, 0.2, 0.9], [True, True, True], [1.0, 2.0, 0.5]),
          "sft": ([0.1, 0.2, 0.4], [True, True, True], [0.0, 0.0, 0.0])}),
        ({"rlhf": ([0.7, 0.0, 0.3], [True, False, True], [1.5, 0.1, 0.2]),
          "sft": ([0.3, 0.6, 0.3], [True, True, True], [0.0, 0.0, 0.0])}),
    ]
    for k, draw in enumerate(draws):
        res = {a: _fake_results(s, v, [f"{a} says {p} {k}" for p in prompts], kl,
                                comps={"tox": [x * 2 for x in s], "total": s}, extra=([x + 1 for x in s], [True] * 3))
               for a, (s, v, kl) in draw.items()}
        e.update(ids, prompts, res, sample=k)
    report = e.compute()

    rl = np.array([0.5, 0.2, 0.9, 0.7, 0.3])  # valid RLHF scores
    sf = np.array([0.1, 0.2, 0.4, 0.3, 0.6, 0.3])
    r = report["scores"]["reward"]
    assert r["label"] == "tox" and r["rlhf"]["n"] == 5 and r["sft"]["n"] == 6
    assert r["rlhf"]["mean"] == pytest.approx(rl.mean()) and r["sft"]["median"] == pytest.approx(np.median(sf))
    assert r["rlhf"]["p90"] == pytest.approx(np.quantile(rl, 0.9))
    # Pairs both scored: p0 (0.4, 0.4), p1 (0.0), p2 (0.5, 0.0); per-prompt means 0.4, 0.0, 0.25.
    per_prompt = np.array([0.4, 0.0, 0.25])
    assert r["gain"]["mean"] == pytest.approx(per_prompt.mean()) and r["gain"]["prompts"] == 3
    ci = ev.bootstrap_ci(torch.tensor(per_prompt), 500, seed=1)
    assert (r["gain"]["ci_low"], r["gain"]["ci_high"]) == pytest.approx(ci)
    assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (3, 2, 0, pytest.approx(0.8))
    assert report["scores"]["component/tox"]["rlhf"]["mean"] == pytest.approx(2 * rl.mean())
    assert report["scores"]["eval/judge"]["rlhf"]["n"] == 6  # the eval backend scored the sample the reward could not
    assert report["kl"]["rlhf"]["mean"] == pytest.approx(np.mean([1.0, 2.0, 0.5, 1.5, 0.1, 0.2]))
    assert report["eos_rate"]["sft"] == pytest.approx(4 / 6)
    assert report["distinct"]["rlhf"]["distinct_1"] == pytest.approx(
        ev.distinct_n([f"rlhf says {p} {k}" for k in range(2) for p in prompts], 1))
    assert report["n_prompts"] == 3 and report["n_pairs"] == 6
    assert [row["gain"] for row in e.rows] == pytest.approx([0.4, 0.0, 0.5, 0.4, None, 0.0])

    ev.write_report(tmp_path, report, e.rows)
    assert (tmp_path / "reward_histogram.png").read_bytes()[:8] == PNG_SIGNATURE
    md = (tmp_path / "report.md").read_text()
    assert "**Prompt `p0`** (mean gain +0.4)" in md and "| tox (component, raw) | SFT |" in md
    assert json.loads((tmp_path / "report.json").read_text())["scores"]["reward"]["wins"] == 3


def test_eval_reward_names_must_be_unique():
    from rlhf_lit.rewards import LengthPenalty

    with pytest.raises(ValueError, match="names must be unique"):
        ev.check_eval_rewards([LengthPenalty(), LengthPenalty()])
    assert len(ev.check_eval_rewards([LengthPenalty(), LengthPenalty(name="chars", unit="chars")])) == 2


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        e = ev.TestEvaluator("tox", seed=1, bootstrap_resamples=200)
        for ids, prompts, res, k in _split_draws()[rank::world]:
            e.update(ids, prompts, res, sample=k)
        report = e.compute()
        rows = ev._gather_objects(e.rows)
        if rank == 0:
            torch.save({"report": {k: v for k, v in report.items() if k != "_columns"}, "rows": rows}, out)
    finally:
        dist.destroy_process_group()


def _split_draws():
    """Four batches of 2 prompts x 2 draws, with an invalid sample: the data the ranks split."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(4):
        ids, prompts = [f"p{2 * b}", f"p{2 * b + 1}"], [f"prompt {2 * b}", f"prompt {2 * b + 1}"]
        for k in range(2):
            res = {a: _fake_results(torch.rand(2, generator=g).tolist(), [True, b != 2 or a == "sft"],
                                    [f"{a} {b} {k} w{int(torch.randint(0, 5, (1,), generator=g))}"] * 2,
                                    torch.rand(2, generator=g).tolist())
                   for a in ("rlhf", "sft")}
            batches.append((ids, prompts, res, k))
    return batches


def test_evaluator_under_data_parallelism_equals_one_process(tmp_path):
    """Two gloo ranks, each with half of the batches, report what one process with all of them does."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.start_processes(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True, start_method="fork")
    ddp = torch.load(out, weights_only=False)

    one = ev.TestEvaluator("tox", seed=1, bootstrap_resamples=200)
    draws = _split_draws()
    for ids, prompts, res, k in draws[0::2] + draws[1::2]:  # a different order than the ranks' interleaving
        one.update(ids, prompts, res, sample=k)
    expected = {k: v for k, v in one.compute().items() if k != "_columns"}
    assert ddp["report"]["n_pairs"] == 16 and ddp["report"]["scores"]["reward"]["rlhf"]["n"] == 14
    assert _nested_close(ddp["report"], expected)
    assert sorted((r["id"], r["sample"]) for r in ddp["rows"]) == sorted((r["id"], r["sample"]) for r in one.rows)


def _nested_close(a, b) -> bool:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return all(_nested_close(a[k], b[k]) for k in a)
    if isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
        return True
    assert a == b
    return True
