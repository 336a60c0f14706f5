"""A resumed run runs its config: a setting given on resume applies, or the run refuses.

A checkpoint restores state that was made from settings: the optimizer's parameter groups (``lr``,
``betas``, ``eps``, ``weight_decay``: ``Optimizer.load_state_dict`` puts the old values back), the
lr scheduler (its own settings and ``base_lrs``), a stage's controllers (PPO's KL coefficient),
the random state and the data position. Restored silently, they would override what the config
and command line of the resumed run say, while its saved ``config.fit1.yaml`` records the new
values. Here each such setting is either

- **applied**: the optimizer's hyperparameters are set to the configured ones after the restore
  (its moments are kept), a stage restarts a controller from its new setting
  (:meth:`ResumePlan.changed`); each change is announced; or
- **refused** before anything runs, naming the setting and why it cannot change (:data:`REFUSED`):
  settings that the restored random state, data position or scheduler state depend on.

Settings whose restored value cannot be read back from the checkpoint itself are recorded in it
by :meth:`~rlhf_lit.stages.base.AdapterStage.resume_settings` (``rlhf_lit.settings``); older
checkpoints without that record are compared only where the checkpoint shows the old value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lit.errors import ConfigError
from rlhf_lit.parallel import WORLD_SIZE_SETTING

#: Settings that cannot change on resume, and why.
REFUSED = {
    "model.seed": "the checkpoint restores the random state so that a resumed run continues exactly; "
                  "a new seed would be ignored",
    "data.batch_size": "the restored data position counts batches of the checkpoint's size",
    "data.seed": "it decides the split and the prompt order that the restored data position refers to",
    "data.shuffle": "the restored data position belongs to the checkpoint's prompt order",
    WORLD_SIZE_SETTING: "each data-parallel rank resumes its own shard of the prompts and its own random "
                        "state, and the shards depend on the number of ranks (trainer.num_nodes x trainer.devices)",
}

_NOT_SETTINGS = {"params", "initial_lr"}


class ResumeRefused(ConfigError):
    """A setting given on resume cannot apply to the restored state."""


@dataclass
class ResumePlan:
    """What a resume does with the settings that differ from the checkpoint's.

    Attributes:
        changes: ``{setting: (checkpoint value, configured value)}`` of the applied changes.
        optimizer: ``{hyperparameter: configured value}`` to set in every parameter group once the
            optimizer state is restored.
    """

    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    def changed(self, setting: str) -> bool:
        """Whether ``setting`` (e.g. ``model.ppo.kl_coef``) was given a new value on resume."""
        return setting in self.changes


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def plan_resume(checkpoint: dict[str, Any], current: dict[str, Any], optimizer_factory: Callable,
                scheduler_factory: Optional[Callable], ckpt_path: Optional[str] = None) -> ResumePlan:
    """Compare the checkpoint's settings with the configured ones.

    Args:
        checkpoint: the loaded checkpoint (``rlhf_lit.settings``, ``optimizer_states``, ``lr_schedulers``).
        current: the configured settings, as :meth:`AdapterStage.resume_settings` returns them.
        optimizer_factory, scheduler_factory: the stage's (built here once on a throwaway
            parameter, to read the configured hyperparameters).
        ckpt_path: for messages.
    Returns:
        The plan (applied changes).
    Raises:
        ResumeRefused: a setting of :data:`REFUSED` changed, or the lr or a scheduler setting
            changed while a scheduler is restored; the message names the setting and why.
    """
    where = f"the checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    saved = checkpoint.get("rlhf_lit", {}).get("settings", {})
    plan = ResumePlan()
    for name, new in current.items():
        if name not in saved or _norm(saved[name]) == _norm(new):
            continue
        if name in REFUSED:
            raise ResumeRefused(
                f"cannot resume with {name}={new!r}: {where} was written with {name}={saved[name]!r}, and "
                f"{REFUSED[name]}. Resume with the checkpoint's value, or start a new run from the trained "
                f"adapter (--model.policy.policy_adapter <run folder>/adapter)."
            )
        plan.changes[name] = (saved[name], new)

    restored = checkpoint.get("optimizer_states") or []
    configured = _fresh_optimizer(optimizer_factory)
    has_scheduler = scheduler_factory is not None and bool(checkpoint.get("lr_schedulers"))
    if restored and configured is not None:
        old_group = restored[0]["param_groups"][0]
        opt, new_group = configured
        for key, new in new_group.items():
            if key in _NOT_SETTINGS:
                continue
            old = old_group.get("initial_lr" if key == "lr" and has_scheduler else key, new)
            if _norm(old) == _norm(new):
                continue
            name = f"model.optimizer.init_args.{key}"
            if key == "lr" and has_scheduler:
                raise ResumeRefused(
                    f"cannot resume with {name}={new!r}: {where} was written with lr={old!r}, and its restored "
                    f"lr scheduler continues from that lr. Resume with the checkpoint's lr, or start a new run "
                    f"from the trained adapter (--model.policy.policy_adapter <run folder>/adapter)."
                )
            plan.changes[name] = (old, new)
            plan.optimizer[key] = new
        if has_scheduler:
            _check_scheduler(checkpoint["lr_schedulers"][0], scheduler_factory, opt, where)
    return plan


def _fresh_optimizer(factory: Callable) -> Optional[tuple[torch.optim.Optimizer, dict[str, Any]]]:
    """The configured optimizer on a throwaway parameter and its group's hyperparameters, or None
    if it cannot be built off its device (then nothing is compared)."""
    try:
        opt = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # e.g. an optimizer that insists on CUDA parameters
        return None
    return opt, dict(opt.param_groups[0])


def _check_scheduler(saved: dict[str, Any], factory: Callable, optimizer, where: str) -> None:
    try:
        fresh = factory(optimizer).state_dict()
    except Exception:
        return
    for key, new in fresh.items():
        if key.startswith("_") or key in ("last_epoch", "base_lrs", "lr_lambdas") or key not in saved:
            continue
        if _norm(saved[key]) != _norm(new):
            raise ResumeRefused(
                f"cannot resume with the lr scheduler's {key}={new!r}: {where} was written with {key}={saved[key]!r}, "
                f"and a restored scheduler keeps its own settings and position. Resume with the checkpoint's "
                f"scheduler, or start a new run from the trained adapter (--model.policy.policy_adapter ...)."
            )


def apply_optimizer_settings(optimizer, plan: ResumePlan) -> None:
    """Set the planned hyperparameters in every group of the restored ``optimizer`` (its state,
    e.g. Adam's moments, is kept) and announce every applied change."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.update(plan.optimizer)
    for name, (old, new) in plan.changes.items():
        rank_zero_info(f"rlhf_lit: resume: {name} is {new!r} as configured (the checkpoint had {old!r})")
