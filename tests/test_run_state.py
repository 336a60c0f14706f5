"""Run state you can trust (issue 17), end to end on the tiny demo model: one process per run folder,
atomic checkpoints and a clear error for a damaged one, resume without duplicated history and with
the settings it is given, the summary, the export from a checkpoint, permissions, ``max_rollouts``
and ``predict``."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, fast_args, run_cli
from rlhf_lit.errors import RunStateError

BASE = ["--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.callbacks.init_args.every_n_rollouts=2",
        "--trainer.callbacks.init_args.save_top_k=-1"]


def history(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def tb_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps TensorBoard shows for ``tag`` (its plugin loader, which honours restarts)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """A run that died after rollout 3 with its last checkpoint at rollout 2 (and a torn line, as
    ``kill -9`` leaves one), copied fresh for each test that uses it."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    with pytest.raises(RuntimeError, match="simulated crash after rollout 3"):
        run_cli("fit", *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=4",
                                  "--trainer.callbacks+=run_probes.CrashAtRollout", "--trainer.callbacks.rollout=3"))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"rollout": 4.0, "step": 1')
    return run_dir


@pytest.fixture
def run_copy(crashed_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(crashed_run, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. One process per run folder
# ---------------------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from rlhf_lit.run_lock import RunFolderLock; "
            f"lock = RunFolderLock({str(folder)!r}, 'fit').acquire(); print('held', flush=True); time.sleep(600)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_killed_one(tmp_path):
    from rlhf_lit.run_lock import RunFolderBusy, RunFolderLock

    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another rlhf_lit process \(pid {holder.pid} "):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: no cleanup ran, the lock file and the owner note stay behind
        holder.wait()
    assert (tmp_path / ".rlhf_lit.lock").exists()
    lock = RunFolderLock(tmp_path).acquire()  # a dead holder's lock is not held: taken at once
    assert lock.held
    lock.release()
    with RunFolderLock(tmp_path):  # and released on exit
        pass


def test_second_fit_in_a_busy_folder_refuses_at_start(tmp_path):
    from rlhf_lit.run_lock import RunFolderLock

    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)  # another fit is running there
    try:
        with pytest.raises(RunStateError, match=rf"{run_dir} is in use by another rlhf_lit process \(pid {holder.pid}"):
            run_cli("fit", *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=1"))
        # From the command line: the message alone, exit status 2 like every error in what the user gave.
        proc = subprocess.run([sys.executable, "-m", "rlhf_lit", "fit",
                               *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=1")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error: " in proc.stderr and "is in use by another rlhf_lit process" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob("events.*"))  # nothing written
    run_cli("fit", *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=1"))  # the holder died
    assert [m["rollout"] for m in history(run_dir)] == [1]
    RunFolderLock(run_dir).acquire().release()  # the finished fit gave the lock back


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints are written atomically; a damaged one is named with the last good one
# ---------------------------------------------------------------------------------------------
def test_checkpoint_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    """A write that fails half way (here: the file-size limit, EFBIG, as ENOSPC on a full disk)."""
    from rlhf_lit.checkpoint_io import AtomicCheckpointIO, checkpoint_problem

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 4096, hard))
    try:
        with pytest.raises(OSError, match=r"could not write the checkpoint .*last\.ckpt.*the previous checkpoint "
                                          r"there is intact"):
            io.save_checkpoint({"w": torch.randn(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and checkpoint_problem(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_checkpoint_names_the_last_good_one(run_copy, damage):
    last = run_copy / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[:114_688] if damage == "truncated" else b"")
    good = run_copy / "checkpoints" / "rollout-2.ckpt"
    for ckpt in ("last", str(last)):
        with pytest.raises(RunStateError) as e:
            run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=4"), f"--ckpt_path={ckpt}")
        msg = str(e.value)
        assert f"the checkpoint {last} is damaged" in msg and f"--ckpt_path {good}" in msg, msg
        assert ("0 bytes" if damage == "empty" else "114,688 bytes") in msg
    from rlhf_lit.checkpoint_io import AtomicCheckpointIO, DamagedCheckpointError

    with pytest.raises(DamagedCheckpointError, match="rollout-2.ckpt"):  # the plugin itself, as Lightning calls it
        AtomicCheckpointIO().load_checkpoint(last)


def test_fit_writes_checkpoints_through_the_atomic_plugin(run_copy):
    from rlhf_lit.checkpoint_io import AtomicCheckpointIO

    cli = run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=4"), "--ckpt_path=last")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not list((run_copy / "checkpoints").glob(".*.tmp"))


def test_fresh_fit_refuses_a_folder_with_any_checkpoint(run_copy):
    (run_copy / "checkpoints" / "last.ckpt").unlink()  # only rollout-2.ckpt left
    with pytest.raises(RunStateError, match=r"rollout-2\.ckpt exists: this run folder already holds a run"):
        run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=1"))
    with pytest.raises(RunStateError, match=r"no last\.ckpt .* resume from it with --ckpt_path .*rollout-2\.ckpt"):
        run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=1"), "--ckpt_path=last")


# ---------------------------------------------------------------------------------------------
# 3. A resumed run's history ends where its checkpoint ends
# ---------------------------------------------------------------------------------------------
def test_resume_after_a_crash_logs_each_rollout_once(run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert lines[-1] == '{"rollout": 4.0, "step": 1'  # the torn line
    crashed = {m["rollout"]: m for m in map(json.loads, lines[:3])}
    assert tb_steps(run_copy, "objective/scores") == [0, 1, 2]
    run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=4"), "--ckpt_path=last")
    rows = history(run_copy)
    assert [m["rollout"] for m in rows] == [1, 2, 3, 4]
    assert all(type(m["rollout"]) is int for m in rows)  # the counter, not the float scalar TensorBoard gets
    assert [s["rollout"] for s in history(run_copy, "samples.jsonl")] == [r for r in (1, 2, 3, 4) for _ in range(4)]
    for tag in ("objective/scores", "loss/policy_avg", "samples/text_summary"):
        assert tb_steps(run_copy, tag) == [0, 1, 2, 3], tag  # TensorBoard step of rollout r: r - 1
    # rollout 3 was replayed from the checkpoint of rollout 2: the same numbers as before the crash
    assert rows[2]["objective/scores"] == pytest.approx(crashed[3]["objective/scores"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Settings given on resume apply, or the resume refuses
# ---------------------------------------------------------------------------------------------
def test_resume_applies_new_kl_coef_and_lr(run_copy):
    cli = run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=4", "--model.ppo.kl_coef=0.5",
                                    "--model.optimizer.init_args.lr=0.01"), "--ckpt_path=last")
    rows = history(run_copy)
    assert [(m["objective/kl_coef"], m["lr"]) for m in rows[:2]] == [(pytest.approx(0.05), 5e-4)] * 2
    assert [(m["objective/kl_coef"], m["lr"]) for m in rows[2:]] == [(pytest.approx(0.5), 0.01)] * 2
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    saved = (run_copy / "config.fit1.yaml").read_text()
    assert "kl_coef: 0.5" in saved and "lr: 0.01" in saved  # the saved config is what ran


def test_resume_refuses_a_new_batch_size_before_writing_anything(run_copy):
    from rlhf_lit.stages.resume import ResumeRefused

    before = (run_copy / "metrics.jsonl").read_text()
    with pytest.raises(ResumeRefused, match=r"cannot resume with data\.batch_size=4: .*last\.ckpt was written with "
                                            r"data\.batch_size=8, and the restored data position counts batches"):
        run_cli("fit", *fast_args(run_copy, *BASE, "--trainer.limit_train_batches=4", "--data.batch_size=4"),
                "--ckpt_path=last")
    assert not list(run_copy.glob("config.fit*.yaml"))  # no config of a run that never ran
    assert (run_copy / "metrics.jsonl").read_text() == before  # nor any history rewritten


def _checkpoint_with(optimizer, scheduler=None, **settings):
    return {"optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()] if scheduler is not None else [],
            "rlhf_lit": {"settings": settings}}


def _adamw(**kw):
    from functools import partial

    return partial(torch.optim.AdamW, **kw)


def test_resume_plan_applies_optimizer_settings_and_refuses_scheduler_changes():
    from functools import partial

    from rlhf_lit.stages.resume import ResumeRefused, apply_optimizer_settings, plan_resume

    old = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)
    ckpt = _checkpoint_with(old, **{"model.seed": 0, "model.ppo.kl_coef": 0.05})
    plan = plan_resume(ckpt, {"model.seed": 0, "model.ppo.kl_coef": 0.2}, _adamw(lr=1e-2, weight_decay=0.1), None)
    assert plan.changed("model.ppo.kl_coef") and not plan.changed("model.seed")
    assert plan.optimizer == {"lr": 1e-2, "weight_decay": 0.1}
    apply_optimizer_settings(old, plan)
    assert old.param_groups[0]["lr"] == 1e-2 and old.param_groups[0]["weight_decay"] == 0.1

    with pytest.raises(ResumeRefused, match=r"model\.seed=1: .*random state"):
        plan_resume(ckpt, {"model.seed": 1}, _adamw(lr=1e-3), None)

    sched_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(sched_opt, step_size=5, gamma=0.5)
    ckpt = _checkpoint_with(sched_opt, sched)
    step = partial(torch.optim.lr_scheduler.StepLR, step_size=5)
    plan_resume(ckpt, {}, _adamw(lr=1e-3), partial(step, gamma=0.5))  # unchanged: fine
    with pytest.raises(ResumeRefused, match=r"lr=0\.01: .*restored lr scheduler continues from that lr"):
        plan_resume(ckpt, {}, _adamw(lr=1e-2), partial(step, gamma=0.5))
    with pytest.raises(ResumeRefused, match=r"scheduler's gamma=0\.9: .*written with gamma=0\.5"):
        plan_resume(ckpt, {}, _adamw(lr=1e-3), partial(step, gamma=0.9))


# ---------------------------------------------------------------------------------------------
# 8, 9, 10, 12. Where things are; export from a checkpoint; permissions; max_rollouts; predict
# ---------------------------------------------------------------------------------------------
def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run_dir = tmp_path / "run"
    with pytest.raises(RunStateError, match=r"the folder of model\.output_dir .*a_file is not writable"):
        run_cli("fit", *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=1",
                                  f"--model.output_dir={blocker / 'adapter'}"))
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_fit_that_fails_before_its_first_step_leaves_no_run_folder_it_created(tmp_path):
    """A missing prompt file is found in the data module's setup, after the start made the run
    folder (lock, checkpoints/, TensorBoard's first event file): that folder goes again. A folder
    that existed before, or holds anything else, stays as it was."""
    from rlhf_lit.data import PromptFileError

    missing = f"--data.prompt_file={tmp_path / 'no_such_prompts.jsonl'}"
    fresh = tmp_path / "fresh" / "run"
    with pytest.raises(PromptFileError, match="no_such_prompts.jsonl' does not exist"):
        run_cli("fit", *fast_args(fresh, *BASE, "--trainer.limit_train_batches=1", missing))
    assert not fresh.exists() and not (tmp_path / "fresh").exists()  # with the parent the start made
    nested = tmp_path / "kept" / "a" / "b"
    (tmp_path / "kept").mkdir()
    with pytest.raises(PromptFileError):
        run_cli("fit", *fast_args(nested, *BASE, "--trainer.limit_train_batches=1", missing))
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "a").exists()  # not above what it made

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(PromptFileError):
        run_cli("fit", *fast_args(mine, *BASE, "--trainer.limit_train_batches=1", missing))
    assert (mine / "notes.txt").read_text() == "the user's"
    assert not list(mine.glob("events.out.tfevents.*"))  # the start's empty event file went

    # Refusals before the start checks create anything: a bad --max_rollouts, a missing --ckpt_path.
    for name, bad in (("rollouts", "--max_rollouts=0"), ("ckpt", f"--ckpt_path={tmp_path / 'nope.ckpt'}")):
        with pytest.raises(Exception, match="max_rollouts 0|no such file"):
            run_cli("fit", *fast_args(tmp_path / name / "run", *BASE, bad))
        assert not (tmp_path / name).exists(), name


def test_start_leftovers_are_removed_only_when_nothing_else_is_there(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from rlhf_lit.run_folder import remove_start_leftovers

    def started(name: str) -> Path:
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / ".rlhf_lit.lock").write_bytes(b"")
        SummaryWriter(str(folder)).close()  # the event file's header only
        return folder

    assert remove_start_leftovers(started("empty_start")) and not (tmp_path / "empty_start").exists()
    logged = started("logged")
    with SummaryWriter(str(logged)) as w:
        w.add_scalar("objective/scores", 0.5, 1)
    assert not remove_start_leftovers(logged) and logged.is_dir()  # a logged scalar is work
    ckpt = started("ckpt")
    (ckpt / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert not remove_start_leftovers(ckpt) and (ckpt / "checkpoints" / "last.ckpt").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A fit stopped by --max_rollouts 3 (an epoch has 24 rollouts of 8 prompts), then its test and predict."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    common = fast_args(run_dir, *BASE)
    fit = run_cli("fit", *common, "--max_rollouts=3")
    return run_dir, common, fit


def test_max_rollouts_counts_rollouts_across_a_resume(finished_run, tmp_path):
    run_dir, common, fit = finished_run
    assert [m["rollout"] for m in history(run_dir)] == [1, 2, 3]
    assert fit.trainer.global_step == 3 * 2 * 2  # optimizer steps: ppo_epochs 2 x num_minibatches 2 per rollout
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run_cli("fit", *fast_args(copy, *BASE), "--max_rollouts=5", "--ckpt_path=last")
    assert [m["rollout"] for m in history(copy)] == [1, 2, 3, 4, 5]


def test_fit_help_says_what_max_steps_counts(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--max_rollouts MAX_ROLLOUTS fit: stop after this many rollouts" in out
    assert "A PPO rollout makes ppo_epochs x num_minibatches of them" in out


def test_end_of_run_summary_names_the_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_cli("fit", *fast_args(run_dir, *BASE), "--max_rollouts=1")
    out = capsys.readouterr().out
    assert "rlhf_lit: fit done: 1 rollouts, objective/scores" in out
    for line in (f"adapter (PEFT LoRA):  {run_dir / 'adapter'}", f"last checkpoint:      {run_dir / 'checkpoints'}",
                 f"run folder:           {run_dir}"):
        assert line in out, line
    run_cli("test", *fast_args(run_dir), "--ckpt_path=last")
    out = capsys.readouterr().out
    assert "rlhf_lit: test done: score" in out and f"report:               {run_dir / 'report.md'}" in out


def test_export_from_a_checkpoint_equals_the_fits_adapter(finished_run, tmp_path):
    from safetensors.torch import load_file

    from rlhf_lit.cli import main

    run_dir, _, _ = finished_run
    out = main(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "exported"),
                "--loras-path", str(tmp_path / "loras"), "--cluster", "13", "--suffix", "-rlhf-tox"])
    for folder in (out, tmp_path / "loras" / "Qwen2.5-7B-Instruct-lora-finetuned-13-no-focal-rlhf-tox"):
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        got, want = load_file(folder / "adapter_model.safetensors"), load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert json.loads((folder / "adapter_config.json").read_text()) == \
            json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    # the folder form: the run folder's last checkpoint
    assert main(["export", str(run_dir)]) == run_dir / "adapter-last"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exported_adapters_get_the_users_umask(finished_run, tmp_path, mask):
    from rlhf_lit.export import export_checkpoint, export_for_social_sim

    run_dir, _, _ = finished_run
    from rlhf_lit.atomic_files import current_umask

    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    umask = current_umask()  # the fit's own export: the test process's umask
    assert mode(run_dir / "adapter") == 0o777 & ~umask
    assert mode(run_dir / "adapter" / "adapter_model.safetensors") == 0o666 & ~umask
    private = tmp_path / "private"
    shutil.copytree(run_dir / "adapter", private)
    os.chmod(private, 0o700)
    for f in private.iterdir():
        os.chmod(f, 0o600)
    old = os.umask(mask)
    try:
        outs = [export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "adapter"),
                export_for_social_sim(private, tmp_path / "loras", cluster=13)]
    finally:
        os.umask(old)
    for out in outs:
        assert mode(out) == 0o777 & ~mask, out
        assert {mode(f) for f in out.iterdir()} == {0o666 & ~mask}, out


def test_predict_writes_the_adapters_responses(finished_run, capsys):
    run_dir, common, _ = finished_run
    run_cli("test", *common, "--ckpt_path=last")
    capsys.readouterr()
    run_cli("predict", *common, "--trainer.limit_predict_batches=1", "--model.eval_samples_per_prompt=2",
            "--ckpt_path=last")
    assert f"rlhf_lit: predict done: {run_dir / 'predictions.jsonl'}" in capsys.readouterr().out
    rows = history(run_dir, "predictions.jsonl")
    assert len(rows) == 2 * 8 and {r["sample"] for r in rows} == {0, 1}
    assert all(r["adapter"].endswith("last.ckpt") and isinstance(r["response"], str) for r in rows)
    # the same seeds as test: sample 0 is the RLHF adapter's test response to the same prompt
    tested = {r["id"]: r for r in history(run_dir, "test_samples.jsonl") if r["sample"] == 0}
    for r in rows:
        if r["sample"] == 0:
            assert r["response"] == tested[r["id"]]["rlhf_texts"] and r["prompt"] == tested[r["id"]]["prompt"]


def test_fit_ckpt_path_last_without_a_checkpoint_says_it_starts_anew(tmp_path, caplog):
    import logging

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="rlhf_lit"):
        run_cli("fit", *fast_args(run_dir, *BASE, "--trainer.limit_train_batches=1"), "--ckpt_path=last")
    assert "--ckpt_path last: no checkpoint in" in caplog.text and "this fit starts a new run" in caplog.text
    assert [m["rollout"] for m in history(run_dir)] == [1]


def test_an_export_never_replaces_what_is_not_an_export(tmp_path):
    from rlhf_lit.errors import ConfigError
    from rlhf_lit.export import check_replaceable, write_adapter_folder

    parent = tmp_path / "runs"
    (parent / "other_run").mkdir(parents=True)
    (parent / "other_run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"model\.output_dir=.*runs' holds 2 entries that are not an export \(other_run, run\)"):
        run_cli("fit", *fast_args(parent / "run", *BASE, "--trainer.limit_train_batches=1"),
                f"--model.output_dir={parent}")
    assert (parent / "other_run" / "metrics.jsonl").read_text() == "{}\n"  # refused at start: nothing touched
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        write_adapter_folder(a_file, {"peft_type": "LORA"}, {})
    assert a_file.read_text() == "keep me" and not list(tmp_path.glob(".a_file*"))
    adapter = write_adapter_folder(tmp_path / "adapter", {"peft_type": "LORA"}, {})
    check_replaceable(adapter)  # an earlier export is replaced; so is an empty folder
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")


def test_config_keys_given_twice_and_a_missing_checkpoint_file_are_named(tmp_path):
    from rlhf_lit.errors import InputFileError, MissingPathError

    cfg = tmp_path / "twice.yaml"
    cfg.write_text("model:\n  ppo:\n    kl_coef: 0.1\n  ppo:\n    clip_eps: 0.3\n")
    with pytest.raises(InputFileError, match=r"twice\.yaml:4: the key 'ppo' appears twice in one mapping \(first at line 2\)"):
        run_cli("fit", *fast_args(tmp_path / "run", *BASE), "--config", str(cfg))
    with pytest.raises(MissingPathError, match=r"fit --ckpt_path .*nope\.ckpt: no such file"):
        run_cli("fit", *fast_args(tmp_path / "run2", *BASE), f"--ckpt_path={tmp_path / 'nope.ckpt'}")


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_torch_file_that_is_not_a_run_checkpoint_is_named(tmp_path, subcommand):
    """A plain ``torch.save`` of weights given as --ckpt_path: one error naming it and what to give,
    not Lightning's KeyError; no run folder is made."""
    plain = tmp_path / "weights.pt"
    torch.save({"lora_A": torch.zeros(2, 2)}, plain)
    run_dir = tmp_path / "run"
    with pytest.raises(RunStateError, match=r"weights\.pt is a torch file but not a checkpoint of a run \(it has "
                                            r"no 'pytorch-lightning_version' and no 'state_dict'\)"):
        run_cli(subcommand, *fast_args(run_dir, *BASE), f"--ckpt_path={plain}")
    assert not run_dir.exists()
