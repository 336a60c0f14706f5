"""The used-by path end to end on the tiny demo model: fit, TensorBoard, checkpoints, resume,
adapter export, test, and the bad-input errors."""

import json
from pathlib import Path

import pytest
import torch

from helpers import DEMO, fast_args, run_cli


def read_metrics(run_dir: Path) -> list[dict]:
    """The rollout lines of metrics.jsonl (validation lines hold only ``validation/*`` scalars)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "objective/kl" in m]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short fit shared by the tests that inspect its outputs."""
    run_dir = tmp_path_factory.mktemp("run")
    cli = run_cli("fit", *fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"))
    return run_dir, cli


def test_help_names_the_module(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m rlhf_lit" in out and "__main__" not in out


def test_fit_help_shows_the_config_fields_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--model.ppo.ppo_epochs PPO_EPOCHS Passes over each rollout batch." in out
    assert "--model.policy.critic {value_head,adapter,none} The critic." in out
    assert "--model.sampling.temperature" in out
    # the stage's own arguments too (a "\n\n" in its docstring once hid them all from the parser)
    assert "--model.rollout_kernels {auto,triton,torch} The cuda_graph engines' decode-step glue" in out
    assert "--model.rollout_engine {auto,hf,cuda_graph,cuda_graph_merged} ``hf`` (transformers generate)" in out


def test_print_config_loads_no_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_LIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", DEMO, "--print_config")
    out = capsys.readouterr().out
    assert "base_model: builtin:demo" in out and "class_path: rlhf_lit.rewards.Profanity" in out
    assert not (tmp_path / "empty-cache").exists()  # nothing was built or loaded


def test_rollout_kernels_is_an_option_of_the_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_LIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", DEMO, "--model.rollout_kernels", "torch", "--print_config")
    assert "rollout_kernels: torch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", DEMO, "--model.rollout_kernels", "fast", "--print_config")
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "rollout_kernels" in err and "fast" in err
    # the hf engine has no glue kernels: a ConfigError (python -m prints it alone, exit 2) when the
    # stage is built, before any weights load (the empty cache stays empty)
    from rlhf_lit.errors import ConfigError

    with pytest.raises(ConfigError, match="model.rollout_kernels='triton' chooses the cuda_graph engines"):
        run_cli("fit", "--config", DEMO, "--model.rollout_engine", "hf", "--model.rollout_kernels", "triton")
    assert not (tmp_path / "empty-cache").exists()


def test_fit_writes_logs_checkpoints_and_adapter(trained_run):
    run_dir, cli = trained_run
    metrics = read_metrics(run_dir)
    assert [m["rollout"] for m in metrics] == [1, 2, 3]
    for key in ("objective/kl", "objective/scores", "objective/entropy", "objective/rlhf_reward",
                "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
                "loss/policy_avg", "loss/value_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
                "lr", "episode", "response/length_mean", "perf/tokens_per_sec", "policy/grad_norm"):
        assert all(m[key] is not None for m in metrics), key
    assert all(m["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-4) for m in metrics)

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert "objective/scores" in acc.Tags()["scalars"]
    assert len(acc.Scalars("objective/scores")) == 3
    assert "samples/text_summary" in acc.Tags()["tensors"]

    assert (run_dir / "config.yaml").is_file()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    size_mb = ckpt.stat().st_size / 2**20
    assert size_mb < 20, f"checkpoint is {size_mb:.1f} MB: it must hold only the trained weights"
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"] and all(("lora_" in k and ".policy." in k) or "value_head" in k for k in state["state_dict"])
    assert {"kl_coef", "rng", "rollouts_done"} <= set(state["rlhf_lit"])


def test_exported_adapter_reproduces_policy_logprobs(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_lit.algos.rollout_batch import ResponseBatch

    run_dir, cli = trained_run
    module = cli.model
    adapter = run_dir / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, adapter).eval()

    cli.datamodule.setup("test")
    batch = next(iter(cli.datamodule.test_dataloader()))
    trunc, _ = module.sample(batch, module.eval_sampling)
    with torch.no_grad():
        sampled = ResponseBatch(batch["input_ids"], batch["attention_mask"], trunc.response_ids, trunc.response_mask)
        expected = module.model(sampled, module.sampling.temperature, values=False).logprobs
        ids = torch.cat([batch["input_ids"], trunc.response_ids], 1)
        mask = torch.cat([batch["attention_mask"], trunc.response_mask.long()], 1)
        logits = loaded(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        P, R = batch["input_ids"].shape[1], trunc.response_ids.shape[1]
        got = torch.log_softmax(logits[:, P - 1:P + R - 1].float() / module.sampling.temperature, -1)
        got = got.gather(-1, trunc.response_ids.unsqueeze(-1)).squeeze(-1)
    m = trunc.response_mask
    torch.testing.assert_close(got[m], expected[m], atol=1e-4, rtol=1e-4)


def test_test_subcommand_compares_rlhf_and_sft(trained_run):
    run_dir, _ = trained_run
    cli = run_cli("test", *fast_args(run_dir), "--ckpt_path=last")
    metrics = cli.trainer.callback_metrics
    for key in ("test/score_rlhf", "test/score_sft", "test/kl_rlhf", "test/win_rate"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["test/kl_sft"]) == pytest.approx(0.0, abs=1e-5)  # the reference vs itself
    assert list(run_dir.glob("config.test*.yaml")), "the test run's config was not saved beside the first"
    rows = [json.loads(x) for x in (run_dir / "test_samples.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "rlhf_texts", "sft_texts", "rlhf_scores", "sft_scores"} <= set(rows[0])


def test_fresh_fit_refuses_to_overwrite_a_run(trained_run):
    run_dir, _ = trained_run
    from rlhf_lit.errors import RunStateError

    with pytest.raises(RunStateError, match="--ckpt_path last"):
        run_cli("fit", *fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))


@pytest.mark.parametrize("critic", ["value_head", "adapter"])
def test_resume_mid_epoch_matches_a_straight_run(tmp_path, critic):
    """4 rollouts straight vs 2 + resume + 2: same trained weights and the same metrics."""
    from rlhf_lit.model import PolicyModel

    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=0",
              "--trainer.callbacks.init_args.every_n_rollouts=1", f"--model.policy.critic={critic}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run_cli("fit", *fast_args(straight, *common))
    # global_step counts optimizer steps: ppo_epochs (2) x num_minibatches (2) = 4 per rollout
    run_cli("fit", *fast_args(resumed, *common, "--trainer.max_steps=8"))
    assert len(read_metrics(resumed)) == 2
    b = run_cli("fit", *fast_args(resumed, *common), "--ckpt_path=last")

    wa = {k: v for k, v in a.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    wb = {k: v for k, v in b.model.model.state_dict().items() if PolicyModel.is_trainable_key(k)}
    assert wa.keys() == wb.keys() and any(".policy." in k for k in wa) and "value_head.weight" in wa
    assert any(".critic." in k for k in wa) == (critic == "adapter")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["rollout"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    assert list(resumed.glob("config.fit*.yaml")), "the resumed run's config was not saved"


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, before any model is loaded where possible
# ---------------------------------------------------------------------------------------------
def _fit_error(tmp_path, *extra: str) -> str:
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as e:
        run_cli("fit", *fast_args(tmp_path / "run", "--trainer.max_epochs=1", *extra))
    return str(e.value)


def test_missing_prompt_file(tmp_path):
    msg = _fit_error(tmp_path, f"--data.prompt_file={tmp_path / 'nope.jsonl'}")
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_malformed_prompt_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    msg = _fit_error(tmp_path, f"--data.prompt_file={bad}")
    assert f"{bad}:2" in msg and "not valid JSON" in msg


def test_empty_split(tmp_path):
    only_train = tmp_path / "train_only.jsonl"
    only_train.write_text("".join(json.dumps({"prompt": f"p{i}", "split": "train"}) + "\n" for i in range(8)))
    with pytest.raises(ValueError, match="'test' split .* is empty"):
        run_cli("test", *fast_args(tmp_path / "run"), f"--data.prompt_file={only_train}")


def test_unknown_reward_backend(tmp_path, capsys):
    _fit_error(tmp_path, "--model.reward=rlhf_lit.rewards.NoSuchReward")
    err = capsys.readouterr().err
    assert 'Parser key "model.reward"' in err and "has no attribute 'NoSuchReward'" in err


def test_missing_adapter_folder(tmp_path):
    msg = _fit_error(tmp_path, f"--model.policy.sft_adapter={tmp_path / 'missing-adapter'}")
    assert "missing-adapter" in msg and "no such folder" in msg


def test_batch_size_must_divide(tmp_path):
    msg = _fit_error(tmp_path, "--data.batch_size=6", "--model.ppo.num_minibatches=4")
    assert "data.batch_size=6" in msg and "num_minibatches=4" in msg


def test_resume_after_a_finished_epoch_trains_the_next_one(tmp_path):
    """A run resumed from the checkpoint of its last rollout continues with the next epoch."""
    run_dir = tmp_path / "run"
    args = fast_args(run_dir, "--data.batch_size=96", "--trainer.limit_val_batches=0", "--model.ppo.ppo_epochs=1",
                     "--model.sampling.max_new_tokens=4", "--trainer.callbacks.init_args.every_n_rollouts=1")
    run_cli("fit", *args, "--trainer.max_epochs=1")  # 192 training prompts / 96 = 2 rollouts an epoch
    assert len(read_metrics(run_dir)) == 2
    run_cli("fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert [m["rollout"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]
