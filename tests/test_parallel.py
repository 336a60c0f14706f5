"""Data-parallel runs: the strategies a stage runs under, and one collective for a step's logged
scalars (rlhf_lit/parallel.py)."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from helpers import run_cli

from rlhf_lit.errors import ConfigError
from rlhf_lit.parallel import check_resume_world_size, rank_state, strategy_refusal


@pytest.mark.parametrize("strategy, says", [
    ("ddp_spawn", "start_method='spawn'"),
    ("ddp_fork", "start_method='fork'"),
    ("ddp_notebook_find_unused_parameters_true", "start_method='fork'"),
    ("fsdp", "FSDPStrategy"),
    ("deepspeed", "DeepSpeedStrategy"),
    ("deepspeed_stage_3_offload", "DeepSpeedStrategy"),
    ("xla", "XLAStrategy"),
    ('{"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"start_method": "spawn"}}',
     "start_method='spawn'"),
    ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}', "ModelParallelStrategy"),
])
def test_strategies_the_stages_cannot_run_under_are_refused_before_anything_loads(tmp_path, strategy, says):
    # Lightning's own errors (FSDP needs a GPU, DeepSpeed its package) would come first: the check
    # runs on the parsed config, before the trainer or any model exists.
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_cli("fit", "--config", "configs/demo.yaml", f"--trainer.strategy={strategy}", "--trainer.devices=2",
                f"--trainer.logger.init_args.save_dir={run_dir}")
    msg = str(e.value)
    assert msg.startswith("trainer.strategy=") and says in msg and "Use --trainer.strategy ddp" in msg
    assert not run_dir.exists()  # nothing started


@pytest.mark.parametrize("option, says", [
    ("--trainer.strategy=foo", "Invalid strategy name"),
    ("--trainer.accelerator=gpu" if not torch.cuda.is_available() else "--trainer.devices=999", ""),
])
def test_trainer_settings_lightning_refuses_are_a_user_error(tmp_path, option, says):
    """What Lightning's Trainer refuses (an unknown strategy, a GPU that is not there) is a one-line
    ConfigError naming the trainer options, not a traceback; nothing is written."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_cli("fit", "--config", "configs/demo.yaml", option, f"--trainer.logger.init_args.save_dir={run_dir}")
    msg = str(e.value)
    assert msg.startswith("trainer: ") and "trainer.strategy" in msg and says.lower() in msg.lower()
    assert not run_dir.exists()


@pytest.mark.parametrize("strategy", ["auto", "ddp", "ddp_find_unused_parameters_true", "single_device",
                                      {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                       "init_args": {"process_group_backend": "gloo"}}])
def test_single_device_and_ddp_strategies_are_accepted(strategy):
    assert strategy_refusal(strategy) is None


def test_a_strategy_instance_chosen_in_python_is_checked_too():
    from lightning.pytorch.strategies import DDPStrategy

    assert "start_method='fork'" in strategy_refusal(DDPStrategy(start_method="fork"))
    assert strategy_refusal(DDPStrategy()) is None


def test_resume_with_another_number_of_ranks_is_refused_naming_both():
    check_resume_world_size(None, 4, "x.ckpt", 2, 2)  # checkpoints of older versions record none
    check_resume_world_size(2, 2, "x.ckpt", 2, 1)
    with pytest.raises(ConfigError, match=r"cannot resume from x.ckpt with 1 data-parallel rank\(s\) "
                                          r"\(trainer.num_nodes=1 x trainer.devices=1\): it was written by 2"):
        check_resume_world_size(2, 1, "x.ckpt", 1, 1)
    assert rank_state(["a", "b"], 1, 2) == "b" and rank_state(["a", "b"], 0, 3) is None and rank_state(None, 0, 1) is None


def test_one_collective_logs_what_sync_dist_logged(tmp_path):
    import ddp_probe

    mp.start_processes(ddp_probe.mean_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = torch.load(tmp_path / "mean0.pt"), torch.load(tmp_path / "mean1.pt")
    def same(a, b):
        return a == b or (math.isnan(a) and math.isnan(b))

    assert r0["ours"].keys() == r1["ours"].keys()
    assert all(same(r0["ours"][k], r1["ours"][k]) for k in r0["ours"])  # every rank logs the same numbers
    assert list(r0["ours"]) == list(r0["values"])  # in the logged order
    for k, v in r0["ours"].items():
        expected = (r0["values"][k] + r1["values"][k]) / 2
        if k == "nan_on_rank1":
            assert math.isnan(v) and math.isnan(r0["lightning"][k])
            continue
        assert v == pytest.approx(expected, rel=1e-12)
        assert v == pytest.approx(r0["lightning"][k], rel=1e-6), k  # Lightning's mean, in float32
    assert r0["ours"]["episode"] == 2 ** 25 + 1  # exact in float64, where float32 rounds
    # A scalar only some ranks log: the mean over those (per-scalar all-reduces would hang)
    assert r0["optional"] == r1["optional"] == {"a": 1.0, "b": 2.0}


def test_ranks_started_by_a_launcher_must_match_num_nodes_times_devices(monkeypatch):
    """torchrun started 2 ranks but the config asks for 1 x 1: a ConfigError naming both, before
    anything is written (Lightning's own check comes later, inside fit, as a traceback)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    from rlhf_lit.parallel import check_launcher_ranks

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29599", "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(k, v)
    strategy = DDPStrategy(cluster_environment=TorchElasticEnvironment())
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=1 x trainer.devices=1 does not match .*world size \(2\)"):
        check_launcher_ranks(strategy, num_nodes=1, devices=1)
    check_launcher_ranks(strategy, num_nodes=1, devices=2)  # 1 x 2 = 2: fine


def test_close_process_group_destroys_the_group_a_run_left_open(tmp_path):
    """Lightning leaves the default process group open; the command line closes it before exit."""
    import torch.distributed as dist

    from rlhf_lit.parallel import close_process_group

    close_process_group()  # none yet: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()
