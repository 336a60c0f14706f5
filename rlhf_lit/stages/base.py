"""What every training stage shares: the model, the optimizer, checkpoints, the RNG, the export.

A stage is a LightningModule that trains adapters on the one base model (PPO; later DPO and a
reward model). It is chosen by the config's ``model.class_path``. This base class owns:

- building the tokenizer and the :class:`~rlhf_lit.model.PolicyModel` (``configure_model``), and
  the hook :meth:`AdapterStage.setup_components` for what a stage adds (rewards, a rollout engine);
- the optimizer over the trained weights (policy adapter, value head, critic adapter);
- checkpoints that hold the trained weights, the optimizer, the RNG and the stage's own state
  (:meth:`AdapterStage.stage_state`), never the base model; loading refuses a checkpoint written
  for another model;
- seeding (one seed per rank) and the exact RNG continuation of a resumed run (every rank's own);
- the export of the trained policy adapter as a plain PEFT folder.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rlhf_lit.model import POLICY, PolicyConfig, PolicyModel
from rlhf_lit.parallel import WORLD_SIZE_SETTING, gather_per_rank, rank_state
from rlhf_lit.paths import check_adapter_path, check_model_path, tokenizer_path
from rlhf_lit.run_logging import RunLog, run_dir
from rlhf_lit.stages.resume import ResumePlan, apply_optimizer_settings, plan_resume
from rlhf_lit.tokenizer import load_tokenizer, reconcile_special_tokens
from rlhf_lit.errors import ConfigError

log = logging.getLogger(__name__)


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with eps 1e-5 (the PPO custom)."""
    return torch.optim.AdamW(params, lr=1e-5, eps=1e-5, weight_decay=0.0)


class AdapterStage(LightningModule):
    """Base class of the training stages (see the module docstring).

    Args:
        policy: Base model, SFT adapter and loading options.
        optimizer: Optimizer over the trained weights.
        lr_scheduler: Optional scheduler (a stage says when it steps).
        output_dir: Where the trained policy adapter is exported (PEFT folder); default ``<log dir>/adapter``.
        seed: Seed of the stage's randomness (each data-parallel rank adds its rank).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        output_dir: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained weights; checked in on_load_checkpoint
        self.policy_config = policy
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.output_dir = output_dir
        self.seed = seed
        check_model_path(policy.base_model, revision=policy.revision)
        check_adapter_path(policy.sft_adapter, "sft_adapter")
        check_adapter_path(policy.policy_adapter, "policy_adapter")
        self.model: Optional[PolicyModel] = None
        self.tokenizer = None
        self._pending_rng: Optional[dict] = None
        self._resume_plan: Optional[ResumePlan] = None
        self.exported_adapter: Optional[Path] = None  # where export_adapter last wrote
        self._run_log: Optional[RunLog] = None

    # ---------------------------------------------------------------------------------------
    # Setup
    # ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # runs for fit and for test: build once
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        cfg = self.policy_config
        self.tokenizer = self._load_tokenizer()
        self.check_tokenizer(self.tokenizer)  # token-level options, before the model loads
        self.model = PolicyModel(cfg, device)
        hf = self.model.peft.get_base_model()
        # Sampled ids past the table would fail deep inside a CUDA kernel; special tokens must agree.
        reconcile_special_tokens(self.tokenizer, hf.config, f"model.policy (base_model={cfg.base_model!r}, sft_adapter="
                                 f"{cfg.sft_adapter!r})", hf.get_input_embeddings().weight.shape[0],
                                 "an adapter trained with added tokens must carry its embeddings and ship its tokenizer")
        self.setup_components(device)

    def _load_tokenizer(self):
        """The data module's tokenizer when there is one (prompts were tokenized with it), else the
        same one loaded here."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        tok = getattr(datamodule, "tokenizer", None)
        if tok is not None:
            return tok
        cfg = self.policy_config
        return load_tokenizer(tokenizer_path(cfg.base_model, cfg.sft_adapter), revision=cfg.revision,
                              trust_remote_code=cfg.trust_remote_code)

    def check_tokenizer(self, tokenizer) -> None:
        """Resolve and check the stage's token-level options against the tokenizer (before the model
        loads); raise ``rlhf_lit.errors.ConfigError`` naming the option."""

    def setup_components(self, device: torch.device) -> None:
        """What a stage needs besides the model (reward backends, a rollout engine); once."""

    def configure_optimizers(self):
        params = [p for _, p in self.model.trainable_named_parameters()]
        if not params:
            raise RuntimeError("no trainable parameters: the policy adapter did not load as trainable")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def _clock(self) -> float:
        """Wall time after the GPU has finished queued work, so phase timings add up."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Restored RNG continues a resumed run exactly; a fresh run gets one seed per rank.
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        else:
            torch.manual_seed(self.seed + self.global_rank)
            random.seed(self.seed + self.global_rank)
        if self._resume_plan is not None:  # the optimizer state is restored by now
            apply_optimizer_settings(self.trainer.optimizers[0] if self.trainer.optimizers else None,
                                     self._resume_plan)
        self._run_log = RunLog(self.trainer)
        done = self.history_done()
        if done is not None:  # history ends where the restored state ends (0 for a fresh run)
            self._run_log.rewind(done, self.history_counter)

    def on_validation_end(self) -> None:
        # metrics.jsonl gets the validation scalars TensorBoard gets (Lightning's epoch means),
        # beside the training batches they follow.
        if getattr(self, "_run_log", None) is None or self.trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("validation/")}
        if values:
            done = self.history_done()
            self._run_log.append_metrics(self.global_step if done is None else done, values, self.history_counter)

    def on_train_end(self) -> None:
        self.export_adapter()

    def export_adapter(self) -> Optional[Path]:
        """Write the policy adapter as a PEFT folder (atomically; rank 0 only)."""
        from rlhf_lit.export import export_adapter

        log_dir = run_dir(self.trainer)  # a broadcast: every rank must ask
        if not self.trainer.is_global_zero:
            return None
        if not self.output_dir and not log_dir:
            log.warning("no model.output_dir and no logger folder: the trained adapter is not exported")
            return None
        out = Path(self.output_dir) if self.output_dir else Path(log_dir) / "adapter"
        path = export_adapter(self.model.peft, POLICY, out, base_model=self.policy_config.base_model)
        log.info("exported the policy adapter to %s", path)
        self.exported_adapter = path
        return path

    # ---------------------------------------------------------------------------------------
    # Checkpoints: trained weights + optimizer + stage state + RNG, never the base model
    # ---------------------------------------------------------------------------------------
    #: The ``metrics.jsonl`` field that counts this stage's training batches (its checkpoints' unit).
    history_counter = "rollout"

    def history_done(self) -> Optional[int]:
        """Training batches done, as restored on resume (``metrics.jsonl``'s :attr:`history_counter`);
        None for a stage that keeps no such count."""
        done = getattr(self, "rollouts_done", None)
        return None if done is None else int(done)

    def stage_state(self) -> dict[str, Any]:
        """The stage's own state for checkpoints (counters, controllers); picklable."""
        return {}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`stage_state` saved (keys may be missing in older checkpoints).
        A controller whose setting was changed on resume restarts from the new setting
        (:meth:`setting_changed_on_resume`)."""

    def resume_settings(self) -> dict[str, Any]:
        """The settings, by config name, that restored state was made from and that the checkpoint
        cannot show otherwise (a stage adds its own, e.g. ``model.ppo.kl_coef``): recorded in
        checkpoints and compared on resume (:mod:`rlhf_lit.stages.resume`)."""
        settings: dict[str, Any] = {"model.seed": self.seed}
        if self._trainer is not None:  # each rank's data shard and random state belong to this many ranks
            settings[WORLD_SIZE_SETTING] = self.trainer.world_size
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        for key in ("batch_size", "seed", "shuffle"):
            value = getattr(datamodule, key, None)
            if value is not None:
                settings[f"data.{key}"] = value
        return settings

    def setting_changed_on_resume(self, setting: str) -> bool:
        """Whether ``setting`` was given a value on resume other than the checkpoint's."""
        return self._resume_plan is not None and self._resume_plan.changed(setting)

    def _trainable_keys(self, state_dict: dict[str, Any]) -> list[str]:
        return [k for k in state_dict if k.startswith("model.") and PolicyModel.is_trainable_key(k[len("model."):])]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from rlhf_lit.export import CONFIG_KEY, adapter_config_json

        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: sd[k] for k in self._trainable_keys(sd)}
        checkpoint["rlhf_lit"] = {
            "base_model": self.policy_config.base_model,
            "sft_adapter": self.policy_config.sft_adapter,
            "policy_adapter": self.policy_config.policy_adapter,
            "critic": self.policy_config.critic,
            # what `python -m rlhf_lit export` needs to write the adapter without loading a model
            CONFIG_KEY: adapter_config_json(self.model.peft, POLICY, self.policy_config.base_model),
            **self.stage_state(),
            "settings": self.resume_settings(),
            "rng": get_rng_state(),
            # Every rank samples with its own random state; rank 0 writes the file (a collective:
            # Lightning builds the checkpoint on every rank).
            "rng_per_rank": gather_per_rank(get_rng_state()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        own = self.state_dict()
        expected = self._trainable_keys(own)
        missing = [k for k in expected if k not in sd]
        wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        # Trained tensors this model has no place for (e.g. a critic adapter) must not vanish silently.
        unexpected = [k for k in self._trainable_keys(sd) if k not in own]
        meta = checkpoint.get("rlhf_lit", {})
        where = (f"base_model={meta.get('base_model')!r}, sft_adapter={meta.get('sft_adapter')!r}, "
                 f"critic={meta.get('critic', 'value_head')!r}")
        if missing or wrong or unexpected:
            example = (missing or wrong or unexpected)[0]
            saved_critic = meta.get("critic", "value_head")
            hint = (f"; to use it, give the run's own config (a critic-free estimator's run: add its "
                    f"--config configs/algorithms/<name>.yaml) or --model.policy.critic {saved_critic}"
                    if saved_critic != self.policy_config.critic else "")
            raise ConfigError(
                f"this checkpoint does not fit the configured model (a checkpoint of another stage or run? {len(missing)} trained tensors missing, "
                f"{len(wrong)} of another shape, {len(unexpected)} unexpected, e.g. {example!r}); it was "
                f"written for {where}, the config "
                f"has base_model={self.policy_config.base_model!r}, sft_adapter={self.policy_config.sft_adapter!r}, "
                f"critic={self.policy_config.critic!r}{hint}"
            )
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Settings given on resume: refused here, before anything runs, or applied.
            self._resume_plan = plan_resume(checkpoint, self.resume_settings(), self.optimizer_factory,
                                            self.scheduler_factory, self.trainer.ckpt_path)
        self.load_stage_state(meta)
        # This rank's own state; checkpoints of older versions hold rank 0's alone.
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        self._pending_rng = rank_state(meta.get("rng_per_rank"), rank, world) or meta.get("rng")


def get_rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device) and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (the Python state may come back as lists)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x
