"""Importing the reward backends before Lightning must not change how the CLI parses Trainer options."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rewards_imported_first_keep_trainer_int_options_int():
    # httpx creates typing.Optional[Union[float, int]] at import; typing's Union cache then hands
    # Lightning's Trainer the float-first annotation and jsonargparse reads limit_train_batches=1 as 1.0.
    code = ("import rlhf_lit.rewards, inspect, lightning.pytorch as pl\n"
            "print(inspect.signature(pl.Trainer.__init__).parameters['limit_train_batches'].annotation)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("typing.Union[int, float"), out
