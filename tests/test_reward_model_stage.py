"""The reward-model stage: exact micro-batching of the Bradley-Terry loss, exact resume, the export
(adapter + head + tokenizer + manifest) loading back as a reward backend that scores identically,
and that backend as the reward of a PPO run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_lit.model import PolicyConfig, PolicyModel
from rlhf_lit.stages.reward_model import RewardModelConfig, RewardModelModule

from helpers import ROOT, fast_args, run_cli, write_pairs

DEMO_RM = str(ROOT / "configs" / "demo_rm.yaml")
FIGURES = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected", "policy/grad_norm")


def _sgd_zero(params):
    return torch.optim.SGD(params, lr=0.0)


def test_micro_batch_size_leaves_the_reward_model_step_unchanged(assets, tmp_path):
    import lightning as L

    from rlhf_lit.preference_data import PreferenceDataModule

    captured = {}

    class Probe(RewardModelModule):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers().optimizer
            for micro in (None, 1, 2, 4):
                grads = []
                hook = opt.register_step_pre_hook(lambda o, a, k: grads.append(
                    {n: p.grad.detach().clone() for n, p in self.model.trainable_named_parameters()}))
                self.update_step.micro_batch_size = micro
                captured[micro] = (self.pair_update(batch), grads)
                hook.remove()

    # A non-zero head so that the scores differ from the start; margins from the pairs' score_diff.
    module = Probe(policy=PolicyConfig(base_model=assets["base"], sft_adapter=assets["sft"], dtype="float32",
                                       value_head_init_std=0.1),
                   rm=RewardModelConfig(margin_scale=0.5, center_rewards_coefficient=0.01, max_grad_norm=None),
                   optimizer=_sgd_zero, output_dir=str(tmp_path / "rm"))
    data = PreferenceDataModule(pair_file=str(write_pairs(tmp_path / "pairs.jsonl", n=16)), tokenizer=assets["base"],
                                batch_size=8, val_fraction=0.0)
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path)).fit(module, datamodule=data)

    full, full_grads = captured[None]
    grads = full_grads[0]
    assert float(grads["value_head.weight"].abs().max()) > 0
    assert any(".policy." in n and float(g.abs().max()) > 0 for n, g in grads.items())
    assert full["margin"] != 0.0
    for micro in (1, 2, 4):
        stats, g = captured[micro]
        assert stats["perf/micro_batch_size"] == micro
        for k in FIGURES:
            assert stats[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), (micro, k)
        for n in grads:
            torch.testing.assert_close(g[0][n], grads[n], rtol=1e-5, atol=1e-7, msg=f"micro={micro} {n}")


def test_critic_must_be_the_value_head():
    with pytest.raises(ValueError, match="model.policy.critic='adapter'"):
        RewardModelModule(policy=PolicyConfig(critic="adapter"))


def _rm_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", DEMO_RM, f"--trainer.logger.init_args.save_dir={run_dir}",
            f"--model.init_args.output_dir={run_dir / 'reward_model'}", "--trainer.enable_progress_bar=false",
            f"--data.init_args.pair_file={ROOT / 'prompts' / 'demo_pairs.jsonl'}", "--data.init_args.batch_size=8",
            "--data.init_args.max_val_pairs=16", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """A reward model trained for 4 steps on the demo pairs through the CLI (and its exported folder)."""
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    cli = run_cli("fit", *_rm_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
                                   "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"))
    return run_dir, cli


def test_exported_reward_model_loads_back_and_scores_identically(trained_rm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_lit.paths import resolve_model_path
    from rlhf_lit.rewards import TrainedRewardModel

    run_dir, cli = trained_rm
    folder = run_dir / "reward_model"
    manifest = json.loads((folder / "reward_model.json").read_text())
    assert manifest["format"] == "rlhf_lit.reward_model" and manifest["base_model"] == "builtin:demo"
    assert manifest["trained"]["steps"] == 4 and manifest["system_prompt"] == cli.datamodule.system_prompt
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:demo")),
                              folder / "adapter")  # plain PEFT

    module = cli.model
    dm = cli.datamodule
    dm.setup("test")
    batch = next(iter(dm._eval_loader("test")))
    module.model.eval()
    with torch.no_grad():
        chosen, rejected = module.scores(batch)
    assert float((chosen - rejected).abs().max()) > 0

    rm = TrainedRewardModel(str(folder), name="moderator_rm")
    rm.setup("cpu")
    got_c = rm(batch["prompt"], batch["chosen"])
    got_r = rm(batch["prompt"], batch["rejected"]).scores
    torch.testing.assert_close(got_c.scores, chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, rejected, atol=1e-5, rtol=1e-5)
    assert set(got_c.components) == {"moderator_rm"}
    # Batching does not change a score.
    rm.batch_size = 3
    torch.testing.assert_close(rm(batch["prompt"], batch["chosen"]).scores, chosen, atol=1e-5, rtol=1e-5)


def test_offload_is_a_no_op_on_the_cpu_and_the_backend_pickles(trained_rm):
    import pickle

    from rlhf_lit.rewards import TrainedRewardModel

    folder = str(trained_rm[0] / "reward_model")
    texts = (["why vote today", "hello"], ["thanks for the news", "you idiot"])
    plain, offloaded = TrainedRewardModel(folder), TrainedRewardModel(folder, offload=True)
    plain.setup("cpu")
    offloaded.setup("cpu")
    torch.testing.assert_close(offloaded(*texts).scores, plain(*texts).scores, atol=0, rtol=0)
    copy = pickle.loads(pickle.dumps(offloaded))  # no model inside: it loads again when used
    torch.testing.assert_close(copy(*texts).scores, plain(*texts).scores, atol=0, rtol=0)


def test_trained_reward_model_is_a_ppo_reward(trained_rm, tmp_path):
    run_dir, _ = trained_rm
    ppo_dir = tmp_path / "ppo"
    run_cli("fit", *fast_args(ppo_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                              "--trainer.limit_val_batches=0"),
            "--config", str(ROOT / "configs" / "rewards" / "moderator_rm.yaml"),
            f"--trainer.logger.init_args.save_dir={ppo_dir}", f"--model.output_dir={ppo_dir / 'adapter'}",
            f"--model.reward.init_args.path={run_dir / 'reward_model'}")
    metrics = read_metrics(ppo_dir)
    assert len(metrics) == 2 and all(m["reward/moderator_rm"] is not None for m in metrics)


def test_manifest_errors_name_the_file_and_field(trained_rm, tmp_path):
    from rlhf_lit.export import read_reward_model_manifest

    with pytest.raises(FileNotFoundError, match="reward_model.json is missing"):
        read_reward_model_manifest(tmp_path)
    copy = tmp_path / "rm"
    shutil.copytree(trained_rm[0] / "reward_model", copy)
    manifest = json.loads((copy / "reward_model.json").read_text())
    (copy / "reward_model.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_reward_model_manifest(copy)
    (copy / "reward_model.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "base_model"}))
    with pytest.raises(ValueError, match=r"missing field\(s\) \['base_model'\]"):
        read_reward_model_manifest(copy)
    (copy / "reward_model.json").write_text(json.dumps(manifest))
    (copy / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="'head' names 'head.safetensors'"):
        read_reward_model_manifest(copy)


def test_the_backend_checks_its_folder_when_built(trained_rm, tmp_path):
    from rlhf_lit.errors import InputFileError, MissingPathError
    from rlhf_lit.rewards import TrainedRewardModel

    with pytest.raises(MissingPathError, match=r"path='.*nope' is not a folder \(expected the 'reward_model' folder"):
        TrainedRewardModel(path=str(tmp_path / "nope"))
    with pytest.raises(InputFileError, match=r"reward_model\.json is missing"):
        TrainedRewardModel(path=str(trained_rm[0]))  # the run folder, not its reward_model/
    copy = tmp_path / "rm"
    shutil.copytree(trained_rm[0] / "reward_model", copy)
    (copy / "head.safetensors").unlink()
    with pytest.raises(InputFileError, match=r"TrainedRewardModel .*'head' names 'head.safetensors'"):
        TrainedRewardModel(path=str(copy))


@pytest.fixture(scope="module")
def exported_rm(tmp_path_factory):
    """A reward model folder as the stage exports it, without training: the demo base, a fresh LoRA
    and head (export_reward_model, as the stage calls it)."""
    from rlhf_lit.export import export_reward_model
    from rlhf_lit.model import POLICY
    from rlhf_lit.paths import resolve_model_path
    from rlhf_lit.tokenizer import load_tokenizer

    pm = PolicyModel(PolicyConfig(base_model="builtin:demo", sft_adapter=None, dtype="float32"), torch.device("cpu"))
    out = tmp_path_factory.mktemp("exported_rm") / "reward_model"
    export_reward_model(pm.peft, POLICY, pm.value_head, load_tokenizer(resolve_model_path("builtin:demo")), out,
                        {"base_model": "builtin:demo", "system_prompt": "be civil"})
    return out, int(pm.value_head.weight.shape[1])


def _cut_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_or_misshapen_head_is_named_when_the_backend_is_built(exported_rm, tmp_path):
    from safetensors.torch import save_file

    from rlhf_lit.errors import InputFileError
    from rlhf_lit.rewards import TrainedRewardModel

    folder, hidden = exported_rm
    copy = tmp_path / "rm"
    shutil.copytree(folder, copy)
    TrainedRewardModel(path=str(copy), name="moderator_rm")  # intact: builds
    _cut_to_half(copy / "head.safetensors")
    with pytest.raises(InputFileError, match=rf"TrainedRewardModel 'moderator_rm' \(path='.*rm'\): .*rm/head\.safetensors "
                                             rf"is damaged \(.*bytes\): expected the reward model's scalar head: "
                                             rf"'weight' \(1, {hidden}\) and 'bias' \(1,\)"):
        TrainedRewardModel(path=str(copy), name="moderator_rm")  # raised by the constructor: no model loaded yet
    save_file({"weight": torch.zeros(1, hidden + 1), "bias": torch.zeros(1)}, str(copy / "head.safetensors"))
    with pytest.raises(InputFileError, match=rf"head\.safetensors holds .*'weight': \(1, {hidden + 1}\).*"
                                             rf"expected .*'weight' \(1, {hidden}\)"):
        TrainedRewardModel(path=str(copy), name="moderator_rm")


def test_a_damaged_adapter_names_the_backend_not_a_policy_option(exported_rm, tmp_path):
    from rlhf_lit.errors import InputFileError
    from rlhf_lit.rewards import TrainedRewardModel

    copy = tmp_path / "rm"
    shutil.copytree(exported_rm[0], copy)
    _cut_to_half(copy / "adapter" / "adapter_model.safetensors")
    with pytest.raises(InputFileError, match=r"TrainedRewardModel 'moderator_rm' \(path='.*rm'\): its adapter .*: "
                                             r".*rm/adapter/adapter_model\.safetensors is damaged") as e:
        TrainedRewardModel(path=str(copy), name="moderator_rm")
    assert "model.policy" not in str(e.value)


def test_a_tokenizer_that_does_not_fit_the_base_is_refused_at_load(trained_rm, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_lit.errors import ConfigError
    from rlhf_lit.rewards import TrainedRewardModel

    copy = tmp_path / "rm"
    shutil.copytree(trained_rm[0] / "reward_model", copy)
    tok = AutoTokenizer.from_pretrained(copy / "tokenizer")
    tok.add_tokens([f"<extra_{i}>" for i in range(len(tok) + 1)])  # more ids than any embedding row it had
    tok.save_pretrained(copy / "tokenizer")
    with pytest.raises(ConfigError, match=r"TrainedRewardModel .*tokens but the model's embedding"):
        TrainedRewardModel(path=str(copy)).setup("cpu")


def test_resume_matches_a_straight_run(tmp_path):
    """4 optimizer steps straight vs 2 + resume + 2: the same adapter, head and metrics."""
    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_rollouts=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_cli("fit", *_rm_args(straight, *common))
    run_cli("fit", *_rm_args(resumed, *common, "--trainer.max_steps=2"))
    b = run_cli("fit", *_rm_args(resumed, *common), "--ckpt_path=last")
    wa = {k: v for k, v in a.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    wb = {k: v for k, v in b.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    assert wa.keys() == wb.keys() and "value_head.weight" in wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["train_step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for key in FIGURES:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
