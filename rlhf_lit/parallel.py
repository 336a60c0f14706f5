"""Data-parallel runs: which Lightning strategies a stage runs under, the one collective of a
step's logged scalars, and the per-rank state a checkpoint carries.

**Strategies.** A stage runs on one device (``auto``, ``single_device``) or under Lightning's DDP
strategy started as fresh processes (``ddp``, ``ddp_find_unused_parameters_*``, a
``DDPStrategy``), on one node or several (torchrun, SLURM). Every other strategy Lightning accepts
is refused before any model loads, naming ``trainer.strategy`` and what to use instead
(:func:`strategy_refusal`):

- ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` run the training in child processes of the command,
  whose model, run-folder lock, Ctrl-C handling and end-of-run summary stay in the parent (spawn
  fails to pickle them; fork shares the lock's file with the children);
- ``fsdp``, ``deepspeed*`` and model-parallel strategies shard the training state and run their own
  backward and step, while the model layer switches adapters and swaps LoRA weights in place and
  the update step reduces gradients itself;
  a LoRA run of a 7B base fits one GPU, so data parallelism is the way to more GPUs;
- XLA (TPU) strategies: the model layer and the rollout engines know CUDA and the CPU only.

**Logged scalars.** :func:`mean_over_ranks` averages a step's scalars over the ranks in one
collective, where ``self.log(..., sync_dist=True)`` makes one all-reduce per scalar (about forty
per PPO rollout); ``metrics.jsonl`` then gets the same means TensorBoard gets.

**Per-rank state.** Every rank samples with its own random state; :func:`gather_per_rank` collects
them for the checkpoint that rank 0 writes, and a resume puts each rank's back
(:func:`rank_state`). A checkpoint records its world size; resuming with another is refused
(:func:`check_resume_world_size`): the restored data position counts batches of each rank's shard,
and the shards depend on the number of ranks.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from rlhf_lit.errors import ConfigError

STRATEGY_OPTION = "trainer.strategy"
#: What the refusals suggest.
USE_INSTEAD = ("Use --trainer.strategy ddp (one process per device, started by Lightning, torchrun or SLURM), or "
               "auto on one device")
#: Settings recorded in checkpoints: the number of data-parallel ranks that wrote it.
WORLD_SIZE_SETTING = "trainer.world_size"


def _strategy_class(value: Any) -> tuple[Optional[type], dict[str, Any], str]:
    """(class, init arguments, the name to quote) of a ``trainer.strategy`` value: a registered
    name (``ddp_spawn``), a ``{class_path, init_args}`` mapping or namespace, or a Strategy
    instance. (None, {}, name) when the value is not one Lightning knows (it reports those)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if value is None:
        return None, {}, "auto"
    if isinstance(value, str):
        if value in StrategyRegistry:
            entry = StrategyRegistry[value]
            return entry["strategy"], dict(entry["init_params"]), value
        return None, {}, value
    class_path = getattr(value, "class_path", None) or (value.get("class_path") if isinstance(value, dict) else None)
    if class_path:
        init = getattr(value, "init_args", None) or (value.get("init_args") if isinstance(value, dict) else None)
        init = dict(vars(init) if hasattr(init, "__dict__") and not isinstance(init, dict) else (init or {}))
        module, _, name = str(class_path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return None, {}, str(class_path)  # jsonargparse or Lightning names it
        return cls, init, str(class_path)
    return type(value), {"start_method": getattr(value, "_start_method", "popen")}, type(value).__name__


def strategy_refusal(value: Any) -> Optional[str]:
    """Why a ``trainer.strategy`` value cannot run a stage, or None when it can (or is not a
    strategy Lightning knows: Lightning's own error names it then).

    Args:
        value: the configured value: a name, ``{class_path, init_args}``, or a ``Strategy`` instance.
    Returns:
        A message naming ``trainer.strategy`` and what to use instead, or None.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    cls, init, name = _strategy_class(value)
    if cls is None:
        return None
    quoted = f"{STRATEGY_OPTION}={name!r}"
    family = cls.__name__
    lineage = " ".join(c.__name__ for c in cls.__mro__)  # DeepSpeed and XLA strategies derive from DDPStrategy
    if any(k in lineage for k in ("FSDP", "DeepSpeed", "ModelParallel")):
        return (f"{quoted} ({family}) is not supported: it shards the training state and runs its own backward and "
                f"optimizer step, while rlhf_lit switches adapters and swaps LoRA weights in place and reduces the "
                f"gradients itself. The trained LoRA weights are megabytes "
                f"and a LoRA run of a 7B base fits one GPU (nf4: about 7 GiB), so more GPUs serve more prompts through "
                f"data parallelism. {USE_INSTEAD}")
    if "XLA" in lineage or "TPU" in lineage:
        return (f"{quoted} ({family}) is not supported: the model and the rollout engines run on CUDA GPUs or the "
                f"CPU only. {USE_INSTEAD}")
    if issubclass(cls, DDPStrategy):
        start = init.get("start_method", "popen")
        if start == "popen":
            return None
        return (f"{quoted} (start_method={start!r}) is not supported: it runs the training in child processes of "
                f"this command, and the model, the run folder's lock, Ctrl-C handling and the end-of-run summary "
                f"stay in the parent. {USE_INSTEAD}: ddp starts every other rank as a fresh copy of this command "
                f"and trains the same way")
    if issubclass(cls, SingleDeviceStrategy):
        return None
    return f"{quoted} ({family}) is not supported: rlhf_lit's stages run on one device or under DDP only. {USE_INSTEAD}"


def check_strategy(value: Any) -> None:
    """Raise :class:`~rlhf_lit.errors.ConfigError` with :func:`strategy_refusal`'s message, if any."""
    message = strategy_refusal(value)
    if message:
        raise ConfigError(message)


def check_launcher_ranks(strategy: Any, num_nodes: int, devices: int) -> None:
    """A launcher (torchrun, SLURM) that started another number of ranks than ``trainer.num_nodes x
    trainer.devices`` is a :class:`~rlhf_lit.errors.ConfigError` naming both, before anything is
    written (Lightning finds it later, as a traceback, inside ``fit``).

    Raises:
        ConfigError: the cluster environment's world size differs.
    """
    env = getattr(strategy, "cluster_environment", None)
    if env is None:
        return
    try:
        env.validate_settings(num_devices=devices, num_nodes=num_nodes)
    except ValueError as e:
        raise ConfigError(f"trainer.num_nodes={num_nodes} x trainer.devices={devices} does not match the ranks the "
                          f"launcher started: {e} Give --trainer.num_nodes and --trainer.devices that multiply to "
                          f"the launcher's world size (torchrun: --nnodes x --nproc_per_node).") from None


# -------------------------------------------------------------------------------------------------
# Collectives
# -------------------------------------------------------------------------------------------------
def close_process_group() -> None:
    """Destroy the default process group if this process has one: Lightning leaves it open.

    Otherwise gloo's (or NCCL's) worker threads are still running when the interpreter shuts down.
    On a loaded CI machine that ended a finished two-rank fit with ``terminate called without an
    active exception`` (exit -6), after everything had been written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_per_rank(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (one ``all_gather_object``; ``[obj]`` without a process group).
    A collective: every rank must call it."""
    import torch.distributed as dist

    if _world() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each scalar's mean over the data-parallel ranks, in one collective.

    What ``self.log(name, value, sync_dist=True)`` logs for each scalar (Lightning's ``mean``
    reduction), computed in float64 from one ``all_gather_object`` of the whole dict instead of one
    all-reduce per scalar. A scalar some ranks lack (a reward backend's optional metric) is the
    mean over the ranks that have it, where per-scalar all-reduces would wait on each other. NaN on
    any rank gives NaN, as the all-reduce does.

    Args:
        values: ``{name: float}`` of this rank.
    Returns:
        ``{name: mean}`` over every name any rank logged, in this rank's order first. A collective:
        every rank must call it; without a process group the values are returned as they are.
    """
    if _world() == 1:
        return {k: float(v) for k, v in values.items()}
    parts = gather_per_rank({k: float(v) for k, v in values.items()})
    names = list(values) + sorted({k for p in parts for k in p} - set(values))
    out = {}
    for name in names:
        seen = [p[name] for p in parts if name in p]
        out[name] = sum(seen) / len(seen)
    return out


def rank_state(states: Any, rank: int, world_size: int) -> Any:
    """This rank's entry of a per-rank list saved by :func:`gather_per_rank` (None when the list
    was written by another number of ranks, or is not a list)."""
    if isinstance(states, (list, tuple)) and len(states) == world_size and 0 <= rank < world_size:
        return states[rank]
    return None


def check_resume_world_size(saved: Any, world_size: int, ckpt_path: Optional[str], num_nodes: int,
                            devices: int) -> None:
    """Refuse to resume a checkpoint written by another number of data-parallel ranks.

    Args:
        saved: the checkpoint's recorded world size (None in checkpoints of older versions: then
            nothing is compared).
        world_size, num_nodes, devices: this run's (``num_nodes x devices`` ranks).
        ckpt_path: for the message.
    Raises:
        ConfigError: naming the checkpoint, both numbers of ranks and what to do.
    """
    if saved is None or int(saved) == int(world_size):
        return
    raise ConfigError(
        f"cannot resume from {ckpt_path or 'the checkpoint'} with {world_size} data-parallel rank(s) "
        f"(trainer.num_nodes={num_nodes} x trainer.devices={devices}): it was written by {int(saved)}. Each rank "
        f"resumes its own shard of the prompts and its own random state, and the shards depend on the number of "
        f"ranks. Resume with {int(saved)} rank(s), or start a new run from the trained adapter "
        f"(--model.policy.policy_adapter <run folder>/adapter)."
    )
