"""Issue 18, items 9-13: command-line parsing, logged values, expected errors, the console a
researcher watches, and the README's claims about what a run writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import DEMO, ROOT, fast_args, run_cli
from rlhf_lit.errors import ConfigError, InputFileError, MissingPathError

pytestmark = pytest.mark.usefixtures("forbid_network")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    if "RLHF_LIT_DEBUG" not in extra:
        env.pop("RLHF_LIT_DEBUG", None)
    return env


def _cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_lit", *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=900)


def _rollout_lines(run_dir) -> list[dict]:
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "objective/kl" in m]


# --------------------------------------------------------------------------------------- item 9
def test_abbreviated_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", *fast_args(tmp_path / "run", "--model.ppo.ppo_epoch", "2", "--print_config"))
    assert e.value.code != 0 and "unrecognized arguments: --model.ppo.ppo_epoch 2" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, expected", [
    ("kl_coef", "-0.1", "model.ppo.kl_coef=-0.1: expected a number >= 0"),
    ("vf_coef", "-1", "model.ppo.vf_coef=-1.0: expected a number >= 0"),
    ("clip_eps", "0", "model.ppo.clip_eps=0.0: expected a number in (0, 1)"),
    ("clip_eps_low", "1.5", "model.ppo.clip_eps_low=1.5: expected null or a number in (0, 1)"),
    ("adv_estimator", "foo", "model.ppo.adv_estimator='foo': expected one of ['gae', 'grpo', "),
    ("gamma", "1.5", "model.ppo.gamma=1.5: expected a number in [0, 1]"),
    ("missing_eos_penalty", "-1", "model.ppo.missing_eos_penalty=-1.0: expected null or a number >= 0"),
])
def test_coefficients_are_range_checked(tmp_path, monkeypatch, option, value, expected):
    import rlhf_lit.stages.base as stage_base

    monkeypatch.setattr(stage_base, "PolicyModel", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError) as e:
        run_cli("fit", *fast_args(tmp_path / "run", f"--model.ppo.{option}={value}"))
    assert expected in str(e.value)


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "override.yaml"
    bad.write_text("model:\n  ppo:\n    kl_coef: [0.1\n  sampling: {}\n")
    with pytest.raises(InputFileError) as e:
        run_cli("fit", "--config", DEMO, "--config", str(bad))
    assert re.search(rf"{re.escape(str(bad))}:\d+:\d+: not valid YAML", str(e.value)), str(e.value)
    assert "line 3" in str(e.value)


def test_test_with_ckpt_last_and_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(MissingPathError, match=r"test --ckpt_path last: there is no last.ckpt .*run.checkpoints"):
        run_cli("test", *fast_args(tmp_path / "run"), "--ckpt_path=last")
    with pytest.raises(MissingPathError, match=r"--ckpt_path .*nope.ckpt: no such file"):
        run_cli("test", *fast_args(tmp_path / "run"), f"--ckpt_path={tmp_path / 'nope.ckpt'}")


# --------------------------------------------------------------------------------------- item 10
def test_logged_lr_is_the_one_the_update_used(tmp_path):
    scheduler = json.dumps({"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}})
    run_dir = tmp_path / "run"
    run_cli("fit", *fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                              "--trainer.limit_val_batches=0", "--model.ppo.ppo_epochs=1",
                              "--model.sampling.max_new_tokens=4", f"--model.lr_scheduler={scheduler}"))
    lrs = [m["lr"] for m in _rollout_lines(run_dir)]
    assert lrs == pytest.approx([5e-4, 2.5e-4])  # demo.yaml's lr, then halved after the first rollout


# --------------------------------------------------------------------------------------- item 11
def test_user_errors_print_the_message_alone(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    args = ["fit", *fast_args(tmp_path / "run", f"--data.prompt_file={bad}")]
    quiet = _cli(args, tmp_path)
    print("\n", quiet.stderr)
    assert quiet.returncode == 2
    assert f"error: {bad}:2: not valid JSON" in quiet.stderr and "Traceback" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) <= 8
    loud = _cli(args, tmp_path, RLHF_LIT_DEBUG="1")
    assert loud.returncode == 2 and "Traceback" in loud.stderr and f"{bad}:2: not valid JSON" in loud.stderr


# --------------------------------------------------------------------------------------- items 12, 13
@pytest.fixture(scope="module")
def console_run(tmp_path_factory):
    """``python -m rlhf_lit fit`` with the progress bar on (2 rollouts, a validation), then ``test``."""
    tmp = tmp_path_factory.mktemp("console")
    run_dir = tmp / "run"
    args = [a for a in fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                 "--model.ppo.ppo_epochs=1", "--model.sampling.max_new_tokens=6")
            if a != "--trainer.enable_progress_bar=false"]
    fit = _cli(["fit", *args], tmp)
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = _cli(["test", *args, "--ckpt_path=last"], tmp)
    assert test.returncode == 0, test.stderr[-3000:]
    return run_dir, fit


def test_progress_bar_shows_reward_kl_and_rollouts(console_run):
    _, fit = console_run
    bar = (fit.stdout + fit.stderr).replace("\r", "\n")
    assert re.search(r"score=[-\d.e]+, kl=[-\d.e]+, distinct2=[\d.e]+, rollout=2", bar), bar[-2000:]
    assert re.search(r"rlhf_lit: validation after rollout 2: distinct_2 [\d.]+, kl [-\d.e]+, length [\d.]+, "
                     r"score [-\d.e]+", fit.stderr), fit.stderr[-2000:]
    assert "rlhf_lit: training" in fit.stderr and "parameters" in fit.stderr


def test_known_harmless_warnings_are_silenced(console_run):
    _, fit = console_run
    for noise in ("litlogger", "module(s) in eval mode", "set_vital", "LeafSpec", "Total FLOPs", "DeprecationWarning",
                  "FutureWarning"):
        assert noise not in fit.stderr and noise not in fit.stdout, noise


def test_metrics_jsonl_has_diversity_and_validation_scalars(console_run):
    run_dir, _ = console_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [m for m in lines if "objective/kl" in m]
    assert [m["rollout"] for m in rollouts] == [1, 2]
    assert all(0 < m["response/distinct_2"] <= 1 for m in rollouts)
    validation = [m for m in lines if "validation/score" in m]
    assert len(validation) == 1 and validation[0]["rollout"] == 2
    assert {"validation/kl", "validation/length", "validation/distinct_2"} <= set(validation[0])


def test_readme_lists_everything_a_run_writes(console_run):
    run_dir, _ = console_run
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What a run writes", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)`", section, flags=re.M)
    patterns = [re.compile(re.escape(x).replace(r"\*", ".*").replace(r"/", "/?") + "$") for x in listed]
    for path in sorted(run_dir.iterdir()):
        name = path.name + ("/" if path.is_dir() else "")
        assert any(p.match(name) or p.match(path.name) for p in patterns) or \
            re.fullmatch(r"config\.(fit|test)\d+\.yaml", path.name) and "config.test1.yaml" in section, \
            f"{name} is not in the README's 'What a run writes'"
    assert "max_epochs" in section  # resuming a finished run needs more epochs


def test_export_social_sim_script_as_the_readme_writes_it(console_run, tmp_path):
    run_dir, _ = console_run
    readme = (ROOT / "README.md").read_text()
    assert "--cluster 13 --suffix -rlhf-tox" in readme
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_social_sim.py"), str(run_dir / "adapter"),
                           "--loras-path", str(tmp_path / "loras"), "--cluster", "13", "--suffix", "-rlhf-tox"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "loras" / "Qwen2.5-7B-Instruct-lora-finetuned-13-no-focal-rlhf-tox"
    assert (target / "adapter_config.json").is_file() and (target / "adapter_model.safetensors").is_file()
