"""A frozen scorer's weights in pinned host memory, on the GPU only while it scores.

A reward model is used for a fraction of a second per PPO iteration but, resident, holds its
weights through the rollout and the update, where the policy needs the memory most. Pinned host
copies go to the GPU with one asynchronous copy per tensor (about 0.05 s per GB on an H100 host) at
the start of scoring and are dropped after it; nothing is copied back, since the weights never
change.

4-bit (bitsandbytes nf4) weights move too: besides the packed weight, each 4-bit parameter carries
its quantization state (block absmax, the code book and, with double quantization, a nested state)
as plain tensor attributes rather than parameters or buffers; those are moved alongside.
"""

from __future__ import annotations

import torch
from torch import nn

#: Tensor attributes of a bitsandbytes ``QuantState`` (and of its nested ``state2``).
_QUANT_STATE_TENSORS = ("absmax", "code", "offset")


def _quant_state_slots(model: nn.Module) -> list[tuple[object, str]]:
    """``(owner, attribute)`` of every tensor held by the 4-bit parameters' quantization states."""
    slots, seen = [], set()
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None and id(state) not in seen:
            seen.add(id(state))
            slots += [(state, a) for a in _QUANT_STATE_TENSORS if isinstance(getattr(state, a, None), torch.Tensor)]
            state = getattr(state, "state2", None)
    return slots


class HostOffload:
    """``with HostOffload(model, device):`` runs the block with ``model`` on ``device``.

    Outside the block the parameters, buffers and 4-bit quantization states hold pinned CPU tensors.
    A no-op for a CPU ``device``."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, torch.device(device)
        model.to("cpu")  # a 4-bit parameter's .to moves its quantization state as well
        self._tensors = [*model.parameters(), *model.buffers()]
        self._slots = _quant_state_slots(model)
        if self.device.type == "cuda":
            for t in self._tensors:
                t.data = t.data.pin_memory()
            for owner, attr in self._slots:
                setattr(owner, attr, getattr(owner, attr).pin_memory())
        self._host = [t.data for t in self._tensors]
        self._slot_host = [getattr(owner, attr) for owner, attr in self._slots]

    def __enter__(self) -> nn.Module:
        if self.device.type != "cpu":
            for t, host in zip(self._tensors, self._host):
                t.data = host.to(self.device, non_blocking=True)
            for (owner, attr), host in zip(self._slots, self._slot_host):
                setattr(owner, attr, host.to(self.device, non_blocking=True))
        return self.model

    def __exit__(self, *exc) -> None:
        for t, host in zip(self._tensors, self._host):
            t.data = host
        for (owner, attr), host in zip(self._slots, self._slot_host):
            setattr(owner, attr, host)
