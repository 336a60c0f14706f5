"""The DPO stage: exact micro-batching, the reference (the SFT adapter, cached in the run folder),
exact resume through the CLI, and ``test``'s held-out pairs + paired report naming DPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_lit.model import PolicyConfig, PolicyModel
from rlhf_lit.stages.dpo import DPOConfig, DPOModule
from rlhf_lit.stages.reference_cache import FILE_NAME, ReferenceCache

from helpers import ROOT, ConstantishReward, run_cli, write_pairs

DEMO_DPO = str(ROOT / "configs" / "demo_dpo.yaml")
FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "policy/grad_norm")


def _sgd_zero(params):
    return torch.optim.SGD(params, lr=0.0)  # gradients are computed, the weights never move


def _trainer(tmp_path, logger=False, **kw):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, limit_val_batches=0,
                     num_sanity_val_steps=0, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def _data(assets, tmp_path, batch_size=8, **kw):
    from rlhf_lit.preference_data import PreferenceDataModule

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    return PreferenceDataModule(pair_file=str(pairs), tokenizer=assets["base"], batch_size=batch_size,
                                val_fraction=0.0, **kw)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.1), ("ipo", 0.0)])
def test_micro_batch_size_leaves_the_dpo_step_unchanged(assets, tmp_path, loss_type, smoothing):
    captured = {}

    class Probe(DPOModule):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers().optimizer
            for micro in (None, 1, 2, 4):
                grads = []
                hook = opt.register_step_pre_hook(lambda o, a, k: grads.append(
                    {n: p.grad.detach().clone() for n, p in self.model.trainable_named_parameters()
                     if p.grad is not None}))
                self.update_step.micro_batch_size = micro
                captured[micro] = (self.pair_update(batch), grads)
                hook.remove()

    module = Probe(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32", critic="none"),
                   reward=ConstantishReward(), dpo=DPOConfig(beta=0.5, loss_type=loss_type, label_smoothing=smoothing,
                                                             max_grad_norm=None),
                   rollout_engine="hf", optimizer=_sgd_zero, output_dir=str(tmp_path / "adapter"))
    _trainer(tmp_path, limit_train_batches=1).fit(module, datamodule=_data(assets, tmp_path))

    full, full_grads = captured[None]
    assert full["perf/micro_batch_size"] == 8 and len(full_grads) == 1
    # Policy = reference before any step: every implicit reward is 0 and the sigmoid loss log 2.
    assert full["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    if loss_type == "sigmoid":
        assert full["loss"] == pytest.approx(math.log(2), abs=1e-5)
    grads = full_grads[0]
    assert any(".policy." in n and float(g.abs().max()) > 0 for n, g in grads.items())
    assert not any(".reference." in n for n in grads)
    for micro in (1, 2, 4):
        stats, g = captured[micro]
        assert stats["perf/micro_batch_size"] == micro
        for k in FIGURES:
            assert stats[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), (micro, k)
        assert g[0].keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(g[0][n], grads[n], rtol=1e-5, atol=1e-7, msg=f"micro={micro} {n}")


def test_reference_is_the_sft_adapter_and_is_cached_in_the_run_folder(assets, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = DPOModule(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32", critic="none"),
                       reward=ConstantishReward(), rollout_engine="hf", output_dir=str(tmp_path / "adapter"))
    data = _data(assets, tmp_path, batch_size=4)
    logger = CSVLogger(str(tmp_path), name="", version="")
    _trainer(tmp_path, logger=logger, limit_train_batches=1).fit(module, datamodule=data)
    path = tmp_path / FILE_NAME
    assert path.is_file() and len(module.ref_cache) == 16

    # The cached values are the SFT adapter's log-probs, computed independently by a fresh policy model.
    batch = next(iter(data._eval_loader("train")))
    fresh = PolicyModel(PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32", critic="none"),
                        torch.device("cpu")).eval()
    probe = DPOModule(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32", critic="none"),
                      reward=ConstantishReward())
    probe.model = fresh
    expected = probe._sequence_logps(batch, "policy")  # untrained policy = the SFT adapter
    loaded = ReferenceCache(module.ref_cache.fingerprint)
    assert loaded.load(path)
    got = loaded.lookup(batch["key"], torch.device("cpu"))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-6)
    # A table computed for another model is not used.
    other = ReferenceCache({**module.ref_cache.fingerprint, "sft_adapter": "another"})
    assert not other.load(path) and len(other) == 0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="model.policy.critic='adapter'"):
        DPOModule(policy=PolicyConfig(critic="adapter"))
    assert DPOModule(policy=PolicyConfig(critic="none")).algorithm.startswith("DPO (loss_type=sigmoid")
    with pytest.raises(ValueError, match="model.policy.sft_adapter is required"):
        DPOModule(policy=PolicyConfig(sft_adapter=None))
    with pytest.raises(ValueError, match="model.dpo.label_smoothing"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)


def _dpo_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", DEMO_DPO, f"--trainer.logger.init_args.save_dir={run_dir}",
            "--trainer.enable_progress_bar=false", f"--data.init_args.pair_file={ROOT / 'prompts' / 'demo_pairs.jsonl'}",
            "--data.init_args.batch_size=8", "--data.init_args.max_val_pairs=16", "--model.init_args.sampling.max_new_tokens=8",
            *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_matches_a_straight_run(tmp_path):
    """4 optimizer steps straight vs 2 + resume + 2: the same trained weights and metrics."""
    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_rollouts=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_cli("fit", *_dpo_args(straight, *common))
    run_cli("fit", *_dpo_args(resumed, *common, "--trainer.max_steps=2"))
    assert [m["train_step"] for m in read_metrics(resumed)] == [1, 2]
    with (resumed / "metrics.jsonl").open("a") as f:  # a step logged after the last checkpoint, then a crash
        f.write(json.dumps({"train_step": 3, "step": 3, "loss": 9.0}) + "\n")
    b = run_cli("fit", *_dpo_args(resumed, *common), "--ckpt_path=last")

    wa = {k: v for k, v in a.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    wb = {k: v for k, v in b.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    assert wa.keys() == wb.keys() and any(".policy." in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    sd = a.model.model.state_dict()
    assert any(not torch.equal(v, sd[k.replace(".policy.", ".reference.")]) for k, v in wa.items() if ".lora_" in k)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["train_step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for key in FIGURES:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    assert ma[-1]["rewards/margins"] > 0  # it learned something from the pairs
    assert (resumed / FILE_NAME).is_file() and (resumed / "adapter" / "adapter_config.json").is_file()


def test_a_copied_run_folder_resumes_into_its_own_last_ckpt_and_export_takes_it(tmp_path):
    """A run folder copied (or moved) and resumed with '--ckpt_path last' rewrites its own last.ckpt
    and step files, as an unmoved resume does (Lightning took the copied last.ckpt for another run's,
    wrote last-v1.ckpt beside it, and 'export <run folder>' then exported the stale last.ckpt);
    'export <run folder>' takes the checkpoint that '--ckpt_path last' resumes from. A resume from
    another folder's checkpoint still leaves the files of the run in this folder alone."""
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf_lit.cli import main

    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_rollouts=2", "--model.init_args.dpo.precompute_ref_logps=false"]
    first, copy = tmp_path / "a", tmp_path / "b"
    run_cli("fit", *_dpo_args(first, *common, "--trainer.max_steps=4"))
    shutil.copytree(first, copy)
    resumed = run_cli("fit", *_dpo_args(copy, *common, "--trainer.max_steps=6"), "--ckpt_path=last")

    ckpts = copy / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-6.ckpt"]  # as in an unmoved resume
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6 and last["rlhf_lit"]["steps_done"] == 6
    assert [m["train_step"] for m in read_metrics(copy)] == [1, 2, 3, 4, 5, 6]

    out = main(["export", str(copy), "--out", str(tmp_path / "exported")])
    got = load_file(out / "adapter_model.safetensors")
    want = get_peft_model_state_dict(resumed.model.model.peft, adapter_name="policy")
    assert got.keys() == {k for k in want if "lora_" in k}
    assert all(torch.equal(got[k], want[k]) for k in got)
    stale = load_file(main(["export", str(first), "--out", str(tmp_path / "step4")]) / "adapter_model.safetensors")
    assert any(not torch.equal(got[k], stale[k]) for k in got)  # the two steps changed the adapter

    # Another run's checkpoint resumed into this folder: its files get versioned names, this run's stay.
    before = (ckpts / "last.ckpt").read_bytes()
    run_cli("fit", *_dpo_args(copy, *common, "--trainer.max_steps=5"), f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert (ckpts / "last.ckpt").read_bytes() == before and (ckpts / "step-6.ckpt").is_file()
    assert (ckpts / "last-v1.ckpt").is_file()
    # Now the newest last*.ckpt, so '--ckpt_path last' resumes from it, and the export takes it too.
    assert main(["export", str(copy)]) == copy / "adapter-last-v1"


def test_a_run_killed_in_validation_resumes_it_and_matches_a_straight_run(tmp_path):
    """Killed (no handler runs) in the validation after step 2, where a checkpoint is also due: the
    resumed run has that validation's line and the straight run's figures and weights. The checkpoint
    of such a step is written after its validation, so it holds the random state the validation left
    (its data loader draws a seed) and Lightning does not skip the validation on resume."""
    import os
    import subprocess
    import sys

    common = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1", "--trainer.callbacks.init_args.every_n_rollouts=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_cli("fit", *_dpo_args(straight, *common))
    die = '{"class_path": "helpers.DieInValidation", "init_args": {"at_step": 2}}'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, "-m", "rlhf_lit", "fit", *_dpo_args(resumed, *common),
                           f"--trainer.callbacks+={die}"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert [m.get("train_step") for m in read_metrics(resumed) if not any(k.startswith("validation/") for k in m)] \
        == [1, 2]
    b = run_cli("fit", *_dpo_args(resumed, *common), "--ckpt_path=last")

    ma, mb = read_metrics(straight), read_metrics(resumed)
    val_steps = [m["train_step"] for m in mb if "validation/rewards/accuracies" in m]
    assert val_steps == [m["train_step"] for m in ma if "validation/rewards/accuracies" in m] and 2 in val_steps
    assert [m["train_step"] for m in mb] == [m["train_step"] for m in ma]
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for key in x:
            if key.startswith(("time/", "perf/")) or not isinstance(x[key], float):
                continue
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["train_step"], key)
    wa = {k: v for k, v in a.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    wb = {k: v for k, v in b.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_fit_then_test_reports_held_out_pairs_and_names_dpo(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_cli("fit", *_dpo_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                              "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1"))
    lines = read_metrics(run_dir)
    val = [m for m in lines if "validation/rewards/accuracies" in m]
    assert len(val) == 1 and val[-1]["train_step"] == 3  # one line per validation, counted in steps
    assert all("train_step" in m and "rollout" not in m for m in lines)
    assert "rlhf_lit: fit done: 3 optimizer steps, held-out accuracy" in capsys.readouterr().out
    cli = run_cli("test", *_dpo_args(run_dir, "--trainer.limit_test_batches=2"), "--ckpt_path=last")
    metrics = cli.trainer.callback_metrics
    for key in ("test/rewards/accuracies", "test/rewards/margins", "test/loss", "test/score_rlhf", "test/kl_rlhf"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["test/kl_sft"]) == pytest.approx(0.0, abs=1e-5)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run"]["algorithm"].startswith("DPO (loss_type=sigmoid") and report["run"]["steps_trained"] == 3
    assert report["preference"]["pairs"] == 2 * 32 and 0 <= report["preference"]["accuracy"] <= 1
    md = (run_dir / "report.md").read_text()
    assert "trained with DPO (loss_type=sigmoid, beta=0.1" in md and "## Held-out preference pairs" in md
    assert "(after 3 optimizer steps)" in md and "not trained on" in md
