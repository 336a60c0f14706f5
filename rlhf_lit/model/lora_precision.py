"""fp32 master LoRA weights, half-precision compute copies refreshed once per optimizer step.

peft keeps adapter weights in fp32 (small updates of ~1e-5 vanish in bf16 weights), so under
autocast every LoRA call casts its input to fp32 and back and both factors to bf16, in the forward,
the recomputed forward and the backward: on a 7B model that is a quarter of all kernel launches of
a PPO update and ~1.5 GB of activation copies per layer pass. Autocast's numbers are
``bf16(W) @ bf16(x)`` with the weight gradient cast back to fp32, which is exactly what a bf16 copy
of ``W`` taken once per optimizer step gives, without the per-call casts.

:class:`LoraComputeCopies` swaps such copies into the peft modules for the duration of a block,
moves their gradients onto the fp32 masters (which the optimizer, gradient clipping, checkpoints
and exports keep seeing) and refreshes the copies after each optimizer step.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from rlhf_lit.model.peft_layers import lora_linears


class LoraComputeCopies:
    """Context manager: the LoRA factors of ``adapters`` computed from ``dtype`` copies of fp32 masters.

    Use::

        with LoraComputeCopies(model, "policy", torch.bfloat16) as lora:
            loss.backward(); lora.collect_grads()   # after every backward
            optimizer.step(); lora.refresh()        # after every optimizer step

    With ``dtype=None`` (or factors already in ``dtype``) it changes nothing.
    """

    def __init__(self, model: nn.Module, adapters: Union[str, Sequence[str]], dtype: Optional[torch.dtype]) -> None:
        self.dtype = dtype
        names = [adapters] if isinstance(adapters, str) else list(adapters)
        linears = [lin for a in names for lin in lora_linears(model, a)] if dtype is not None else []
        self._linears = [lin for lin in linears if lin.weight.dtype != dtype]
        self._masters: list[nn.Parameter] = []
        self._copies: list[nn.Parameter] = []

    def __enter__(self) -> "LoraComputeCopies":
        self._masters = [lin.weight for lin in self._linears]
        self._copies = [nn.Parameter(p.detach().to(self.dtype), requires_grad=p.requires_grad) for p in self._masters]
        for lin, copy in zip(self._linears, self._copies):
            lin.weight = copy
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.collect_grads()
        for lin, master in zip(self._linears, self._masters):
            lin.weight = master
        self._masters, self._copies = [], []

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Add the copies' gradients onto the masters' (in fp32) and clear the copies'."""
        add_to, add_from = [], []
        for master, copy in zip(self._masters, self._copies):
            if copy.grad is None:
                continue
            if master.grad is None:
                master.grad = copy.grad.to(master.dtype)
            else:
                add_to.append(master.grad)
                add_from.append(copy.grad)
            copy.grad = None
        if add_to:
            torch._foreach_add_(add_to, _as(add_from, add_to[0].dtype))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the masters into the compute copies (after the optimizer changed the masters)."""
        if self._copies:
            torch._foreach_copy_(self._copies, self._masters)


def _as(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.to(dtype) for t in tensors]
