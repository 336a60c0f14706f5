"""Probes for the data-parallel tests: callbacks put into real runs through the command line, and
workers of a 2-process gloo group."""

import json
import os

import torch
from lightning.pytorch import Callback


class SaveRankWeights(Callback):
    """Each rank saves its trained weights (``rank<r>.pt``) when fit ends."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.model.trainable_named_parameters()}
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather_object")


class CountCollectives(Callback):
    """Counts the collective calls (``torch.distributed.<op>``, by op) each call of the stage's
    ``ppo_update`` and ``_log_rollout`` makes, and writes each rank's counts, a list per method with
    one ``{op: n}`` per call, to ``collectives<r>.json`` when fit ends."""

    METHODS = ("ppo_update", "_log_rollout")

    def __init__(self, out_dir: str):
        self.out_dir, self.counts = out_dir, {m: [] for m in self.METHODS}

    def on_train_start(self, trainer, pl_module):
        import torch.distributed as dist

        def counting(method, inner):
            def counted(*args, **kwargs):
                calls: dict = {}
                saved = {name: getattr(dist, name) for name in COLLECTIVES}

                def wrap(name, fn):
                    def call(*a, **k):
                        calls[name] = calls.get(name, 0) + 1
                        return fn(*a, **k)
                    return call

                for name, fn in saved.items():
                    setattr(dist, name, wrap(name, fn))
                try:
                    return inner(*args, **kwargs)
                finally:
                    for name, fn in saved.items():
                        setattr(dist, name, fn)
                    self.counts[method].append(calls)
            return counted

        for method in self.METHODS:
            setattr(pl_module, method, counting(method, getattr(pl_module, method)))

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"collectives{trainer.global_rank}.json"), "w") as f:
            json.dump(self.counts, f)


def mean_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank ``rank`` of a gloo group: logs the same scalars through :func:`mean_over_ranks` and
    through Lightning's per-scalar ``sync_dist`` reduction, and saves both."""
    import torch.distributed as dist
    from lightning.fabric.utilities.distributed import _sync_ddp_if_available

    from rlhf_lit.parallel import mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        values = {f"m{i}": float(torch.randn((), generator=g) * 10 ** (i % 5)) for i in range(40)}
        values["same"] = 3.0
        values["nan_on_rank1"] = float("nan") if rank == 1 else 1.0
        values["episode"] = float(2 ** 25 + 1)  # past float32's integers
        ours = mean_over_ranks(values)
        lightning = {k: float(_sync_ddp_if_available(torch.tensor(v), reduce_op="mean")) for k, v in values.items()}
        optional = mean_over_ranks({"a": 1.0, **({"b": float(rank + 1)} if rank else {})})
        torch.save({"values": values, "ours": ours, "lightning": lightning, "optional": optional},
                   os.path.join(out, f"mean{rank}.pt"))
    finally:
        dist.destroy_process_group()
