"""What a researcher sees in the terminal: a progress bar with the reward, the KL and the rollout
count; a line per validation; the package's log lines; no known-harmless third-party noise.

The command line (``python -m rlhf_lit``) installs the filters and the log handler
(:func:`configure_console`); the CLI adds the callbacks (:func:`console_callbacks`). Library use
(tests, notebooks) keeps every warning.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("rlhf_lit")

#: Metrics shown on the progress bar, under a short name.
BAR_METRICS = {"objective/scores": "score", "objective/kl": "kl", "response/distinct_2": "distinct2",
               "rollout": "rollout"}

#: Third-party messages printed on every run that say nothing about this run (regular expressions).
KNOWN_HARMLESS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen base and reference are in eval mode on purpose
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader calls a deprecated torch API
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning on torch >= 2.10
    r"`is_gradient_checkpointing` is deprecated",  # transformers, while the demo model is built
)
#: Modules of the stack whose deprecation notices are for their own developers, not for a run.
STACK_MODULES = r"(torch|torchdata|transformers|peft|lightning|lightning_fabric|pytorch_lightning|jsonargparse|" \
                r"tensorboard|huggingface_hub|torchmetrics)(\.|$)"


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above an active progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def configure_console() -> None:
    """Silence the known-harmless warnings (:data:`KNOWN_HARMLESS`, the stack's deprecation notices,
    Lightning's litlogger tip) and show the package's INFO log lines (``rlhf_lit: ...``)."""
    for pattern in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=STACK_MODULES)
    litlogger_tip = _DropMessages(r"litlogger")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).addFilter(litlogger_tip)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(litlogger_tip)
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("rlhf_lit: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class RolloutProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the last rollout's ``objective/scores``, ``objective/kl``,
    ``response/distinct_2`` and the rollout count (:data:`BAR_METRICS`) instead of ``v_num``."""

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for key, short in BAR_METRICS.items():
            value = trainer.callback_metrics.get(key)
            if value is not None:
                value = float(value)
                items[short] = int(value) if short == "rollout" else f"{value:.4g}"
        return items


class ConsoleLines(Callback):
    """A line with the trained parameter count at the start (in place of Lightning's model summary,
    whose table counts no FLOPs here), and one per validation: ``validation after rollout N: kl ...,
    score ...``."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        log.info("training %s of %s parameters (%.2f%%)", f"{trained:,}", f"{total:,}", 100 * trained / max(total, 1))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        parts = [f"{k.split('/', 1)[1]} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                 if k.startswith("validation/")]
        if parts:
            done = pl_module.history_done() if hasattr(pl_module, "history_done") else None
            unit = getattr(pl_module, "history_counter", "rollout").replace("train_step", "optimizer step")
            log.info("validation after %s %s: %s", unit, trainer.global_step if done is None else done, ", ".join(parts))


def console_callbacks(trainer_config: dict[str, Any]) -> list[Callback]:
    """The callbacks the CLI adds to the configured ones: the rollout progress bar (unless the
    config turns the bar off or brings its own) and the validation line."""
    callbacks: list[Callback] = [ConsoleLines()]
    configured = trainer_config.get("callbacks") or []
    configured = configured if isinstance(configured, list) else [configured]
    has_bar = any(isinstance(cb, ProgressBar) for cb in configured)
    if trainer_config.get("enable_progress_bar") is not False and not has_bar:
        callbacks.append(RolloutProgressBar())
    return callbacks
