"""A callback for the DDP test: each rank saves its trained weights when fit ends."""

import os

import torch
from lightning.pytorch import Callback


class SaveRankWeights(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.model.trainable_named_parameters()}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))
