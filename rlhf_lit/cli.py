"""``python -m rlhf_lit {fit,validate,test}``: LightningCLI wired for PPO runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from rlhf_lit.data import PromptDataModule
from rlhf_lit.module import PPOModule
from rlhf_lit.policy import tokenizer_path


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs; a resumed run or a later ``test`` adds
    ``config.<stage>N.yaml`` instead of failing on (or overwriting) the first run's ``config.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
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
    """LightningCLI with the links a PPO run needs."""

    def add_arguments_to_parser(self, parser) -> None:
        # The prompts are tokenized with the policy's tokenizer (the SFT adapter's, when it ships one);
        # the module checks that the rollout batch splits into minibatches.
        parser.link_arguments(("model.policy.base_model", "model.policy.sft_adapter"), "data.tokenizer",
                              compute_fn=tokenizer_path)
        parser.link_arguments("model.policy.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("data.batch_size", "model.rollout_batch_size")

    def before_fit(self) -> None:
        self._place_checkpoints()
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        for cb in self.trainer.checkpoint_callbacks:
            last = Path(cb.dirpath) / "last.ckpt" if cb.dirpath else None
            if ckpt_path is None and last is not None and last.exists():
                raise SystemExit(
                    f"error: {last} exists: this run folder already holds a run. Resume it with "
                    f"'--ckpt_path last', or start a new run in another folder "
                    f"(--trainer.logger.init_args.save_dir=...)."
                )

    def before_test(self) -> None:
        self._place_checkpoints()

    before_validate = before_test

    def _place_checkpoints(self) -> None:
        # '--ckpt_path last' is resolved before the callbacks' setup, so the checkpoint folder must
        # be known up front: default to <log dir>/checkpoints.
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None) is None and self.trainer.log_dir:
                cb.dirpath = os.path.join(self.trainer.log_dir, "checkpoints")


def main(args: Optional[list[str]] = None) -> RLHFCLI:
    import jsonargparse

    import rlhf_lit.rewards  # noqa: F401  (registers the reward backends' short class names)

    # The config dataclasses document each field in a docstring under it: make those the --help text.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

    return RLHFCLI(
        PPOModule,
        PromptDataModule,
        save_config_callback=SaveRunConfig,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "python -m rlhf_lit"},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
