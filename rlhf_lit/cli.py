"""``python -m rlhf_lit {fit,validate,test,predict,export}``: LightningCLI wired for the training stages.

A config (or the command line) that names no ``model.class_path`` is a PPO run, configured as
``model: {policy: ..., ppo: ...}`` with the prompts of ``data: {...}``: the CLI is built for
:class:`~rlhf_lit.stages.ppo.PPOModule` and :class:`~rlhf_lit.data.PromptDataModule`, and
``--help`` lists every field. A config that names one (``model: {class_path: ..., init_args: ...}``,
or ``--model CLASS``) chooses the stage: the CLI takes any :class:`~rlhf_lit.stages.AdapterStage`
and any data module (default data: the prompts), as LightningCLI's subclass mode does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlhf_lit.checkpoint_io import AtomicCheckpointIO, DamagedCheckpointError, check_checkpoint, not_lightning_problem
from rlhf_lit.cli_checks import check_checkpoint_exists, check_config_files
from rlhf_lit.console import console_callbacks
from rlhf_lit.errors import ConfigError, RunStateError
from rlhf_lit.interrupts import InterruptHandling
from rlhf_lit.parallel import check_launcher_ranks, check_strategy
from rlhf_lit.paths import tokenizer_path
from rlhf_lit.rollout_limit import MaxRollouts
from rlhf_lit.run_folder import RunFolderGuard, check_start, first_missing_folder, run_folder, summary
from rlhf_lit.stages.base import AdapterStage

DEFAULT_DATA = "rlhf_lit.data.PromptDataModule"


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs; a resumed run or a later ``test`` adds
    ``config.<stage>N.yaml`` instead of failing on (or overwriting) the first run's ``config.yaml``.

    It is written once the run starts (checkpoint restored, settings given on resume checked), so
    a run refused at start leaves no config of a run that never ran."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, self._stage)

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def _save(self, trainer, pl_module, stage: str) -> None:
        # trainer.log_dir is a collective (a broadcast): read it once on every rank, and let rank 0
        # alone choose the file name, or ranks racing on the file's existence deadlock.
        log_dir = trainer.log_dir
        if self.already_saved or log_dir is None:
            return super().setup(trainer, pl_module, stage)
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
        name = "config.yaml"
        if trainer.is_global_zero and (Path(log_dir) / name).exists():
            n = 1
            while (Path(log_dir) / f"config.{stage}{n}.yaml").exists():
                n += 1
            name = f"config.{stage}{n}.yaml"
        self.config_filename = trainer.strategy.broadcast(name)
        return super().setup(trainer, pl_module, stage)


class RLHFCLI(LightningCLI):
    """LightningCLI with the default stage and the links between the stage and its data, and
    the run folder's life around each command (:mod:`rlhf_lit.run_folder`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--max_rollouts", type=Optional[int], default=None,
                            help="fit: stop after this many rollouts (PPO iterations) in total, counting those of "
                                 "the run a resume continues. (trainer.max_steps counts optimizer steps: "
                                 "ppo_epochs x num_minibatches per rollout.)")
        _describe_max_steps(parser)
        model, data = "model.", "data."
        if self.subclass_mode_model:
            parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
            model, data = "model.init_args.", "data.init_args."
        # The prompts are tokenized with the policy's tokenizer (the SFT adapter's, when it ships one);
        # the stage checks that the rollout batch splits into minibatches. In subclass mode a link
        # whose target the chosen class does not have is skipped.
        parser.link_arguments((f"{model}policy.base_model", f"{model}policy.sft_adapter"), f"{data}tokenizer",
                              compute_fn=tokenizer_path)
        parser.link_arguments(f"{model}policy.trust_remote_code", f"{data}trust_remote_code")
        parser.link_arguments(f"{model}policy.revision", f"{data}revision")
        parser.link_arguments(f"{data}batch_size", f"{model}rollout_batch_size")

    def before_instantiate_classes(self) -> None:
        # A strategy the stages cannot run under is named before Lightning builds it (FSDP needs a
        # GPU, DeepSpeed its package: their errors would come first) and before any model loads.
        sub = self.config.get("subcommand")
        check_strategy((self.config[sub] if sub else self.config).get("trainer.strategy"))

    def before_fit(self) -> None:
        # What can be refused without touching the disk is, before the start checks create folders.
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path not in (None, "last"):  # a missing 'last' starts a new run, as Lightning does (and says so)
            check_checkpoint_exists(ckpt_path, [], "fit")
        max_rollouts = self.config_init[self.subcommand].get("max_rollouts")
        limit = MaxRollouts(max_rollouts) if max_rollouts is not None else None
        run = run_folder(self.trainer)
        created = first_missing_folder(run) if run is not None else None  # what the start will create
        self._start("fit")
        if limit is not None:
            self._add_callback(limit)
        if run is not None and self.trainer.is_global_zero:  # one process per run folder
            self._guard = RunFolderGuard(run, created=created)
            self._guard.acquire()
            self._add_callback(self._guard)

    def before_test(self) -> None:
        self._start(self.subcommand)
        check_checkpoint_exists(self.config_init[self.subcommand].get("ckpt_path"),
                                [getattr(cb, "dirpath", None) for cb in self.trainer.checkpoint_callbacks], self.subcommand)

    before_validate = before_predict = before_test

    def after_fit(self) -> None:
        if getattr(self, "_guard", None) is not None:
            self._guard.release()
        self._summarise()

    def _summarise(self) -> None:
        folder = run_folder(self.trainer)  # a broadcast under DDP: every rank asks, rank 0 prints
        if self.trainer.is_global_zero:
            print(summary(self.trainer, self.model, self.subcommand, folder), flush=True)

    after_test = after_validate = after_predict = _summarise

    def _start(self, subcommand: str) -> None:
        """Before any model loads: checkpoint folder, checks, atomic checkpoints, Ctrl-C handling."""
        check_strategy(self.trainer.strategy)  # also what 'auto' chose, or an instance given from Python
        check_launcher_ranks(self.trainer.strategy, self.trainer.num_nodes, self.trainer.num_devices)
        self._place_checkpoints()
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        check_start(self.trainer, subcommand, ckpt_path, getattr(self.model, "output_dir", None))
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._add_callback(InterruptHandling())

    def _add_callback(self, callback) -> None:
        # Before the checkpoint callbacks, which Lightning keeps last.
        cbs = self.trainer.callbacks
        first_ckpt = next((i for i, cb in enumerate(cbs) if cb in self.trainer.checkpoint_callbacks), len(cbs))
        cbs.insert(first_ckpt, callback)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads an explicit --ckpt_path file before anything else: name a damaged one clearly.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and Path(ckpt_path).is_file():
            try:
                check_checkpoint(ckpt_path)
            except DamagedCheckpointError as e:
                raise RunStateError(str(e)) from None
            problem = not_lightning_problem(ckpt_path)
            if problem is not None:  # Lightning would fail with a bare KeyError
                raise RunStateError(
                    f"--ckpt_path {ckpt_path} is a torch file but not a checkpoint of a run ({problem}): give one "
                    f"a fit wrote (<run folder>/checkpoints/last.ckpt or rollout-N.ckpt, or --ckpt_path last); "
                    f"to start from an adapter instead, use --model.policy.policy_adapter <adapter folder>")
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config, callbacks):
        # The console's progress bar and validation lines join the configured callbacks (console.py).
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super()._instantiate_trainer(config, [*callbacks, *console_callbacks(config)])
        except (MisconfigurationException, ValueError) as e:
            # Lightning checks accelerator, strategy, devices and num_nodes here: a user's setting.
            raise ConfigError(f"trainer: {e} (check trainer.accelerator, trainer.strategy, trainer.devices and "
                              f"trainer.num_nodes)") from e

    def _place_checkpoints(self) -> None:
        # '--ckpt_path last' is resolved before the callbacks' setup, so the checkpoint folder must
        # be known up front: default to <log dir>/checkpoints.
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) is None and self.trainer.log_dir:
                cb.dirpath = os.path.join(self.trainer.log_dir, "checkpoints")


def _describe_max_steps(parser) -> None:
    """Say in ``--help`` what ``trainer.max_steps`` counts here (Lightning's text is generic)."""
    for action in parser._actions:
        if action.dest == "trainer.max_steps":
            action.help = ("Stop after this many optimizer steps. A PPO rollout makes ppo_epochs x num_minibatches "
                           "of them (e.g. 8 in configs/demo.yaml), fewer when target_approx_kl stops its epochs "
                           "early; to say N rollouts use --max_rollouts N. (Default: -1, no limit)")


def main(args: Optional[list[str]] = None) -> RLHFCLI:
    """The command line: ``fit``/``validate``/``test``/``predict`` (LightningCLI) and ``export``
    (:mod:`rlhf_lit.export`). ``args`` None reads ``sys.argv`` as the program (and installs the
    Ctrl-C handling of :mod:`rlhf_lit.interrupts`); a list runs in process (tests)."""
    import jsonargparse

    if args is None:
        from rlhf_lit.interrupts import install

        install()
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        from rlhf_lit.export import main as export_main

        return export_main(argv[1:])

    import rlhf_lit.rewards  # noqa: F401  (registers the reward backends' short class names)
    import rlhf_lit.stages  # noqa: F401  (and the stages': --model PPOModule)

    # The config dataclasses document each field in a docstring under it: make those the --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

    # Lightning's model summary counts no FLOPs here; console.py prints the trained parameters instead.
    kwargs = dict(save_config_callback=SaveRunConfig, auto_configure_optimizers=False,
                  trainer_defaults={"enable_model_summary": False},
                  parser_kwargs={"prog": "python -m rlhf_lit", "allow_abbrev": False})
    check_config_files(argv)
    stage = requested_stage(argv)
    if stage is None:
        from rlhf_lit.data import PromptDataModule
        from rlhf_lit.stages.ppo import PPOModule

        return RLHFCLI(PPOModule, PromptDataModule, args=args, **kwargs)
    kwargs.update(subclass_mode_model=True, subclass_mode_data=True)
    if any(a in ("-h", "--help") for a in argv) and argv and argv[0] in SUBCOMMANDS:
        _print_help_with_stage(argv, stage, kwargs)
    return RLHFCLI(AdapterStage, LightningDataModule, args=args, **kwargs)


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def requested_stage(argv: list[str]) -> Optional[str]:
    """The ``model.class_path`` the command line or its ``--config`` files name (the last one
    wins, as jsonargparse merges them), or None when none does."""
    import yaml

    found = None
    for i, a in enumerate(argv):
        for flag in ("--model.class_path", "--model", "--config", "-c"):
            value = argv[i + 1] if a == flag and i + 1 < len(argv) else a[len(flag) + 1:] if a.startswith(flag + "=") \
                else None
            if not value:
                continue
            if flag in ("--config", "-c") or value.endswith((".yaml", ".yml", ".json")):
                try:
                    cfg = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
                except (OSError, yaml.YAMLError):
                    continue  # jsonargparse reports it, with its own message
                model = cfg.get("model") if isinstance(cfg, dict) else None
                if flag not in ("--config", "-c"):
                    model = cfg
                if isinstance(model, dict) and model.get("class_path"):
                    found = str(model["class_path"])
            elif not value.startswith("-"):
                found = value
    return found


def _print_help_with_stage(argv: list[str], stage: str, kwargs: dict) -> None:
    """``fit --help`` for a chosen stage: Lightning's help, then the stage's own options
    (``--model.help <stage>``), so every ``model.*`` field and its docstring shows."""
    import contextlib

    with contextlib.suppress(SystemExit):
        RLHFCLI(AdapterStage, LightningDataModule, args=argv, **kwargs)
    print(f"\nOptions of the training stage {stage}:\n", flush=True)
    RLHFCLI(AdapterStage, LightningDataModule, args=[argv[0], "--model.help", stage], **kwargs)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
