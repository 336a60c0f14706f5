"""Everything that reaches into peft's modules, named, in one place.

peft's public switches (``set_adapter``, ``disable_adapter``) also change ``requires_grad`` and walk
every module; the rollout engine needs a LoRA layer's factors, not its forward. Both go through
this file, so a peft upgrade that moves an attribute breaks one module, not three:

- :class:`AdapterSwitch`: the active adapter of every tuner layer and ``modules_to_save`` wrapper;
- :func:`lora_linears`, :func:`cast_adapter_`: an adapter's ``lora_A`` / ``lora_B`` linears;
- :func:`is_lora_layer`, :func:`lora_view`, :func:`lora_state_signature`: how the CUDA-graph
  engine runs a LoRA layer as its base plus low-rank updates, and notices when that changes;
- :func:`fuse_rows_as_views`: parameters moved into one buffer they become views of (q/k/v as one GEMM).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:  # pragma: no cover - peft is a dependency; keep importers importable without it
        return None
    return LoraLayer


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (a base layer plus per-adapter ``lora_A``/``lora_B``)."""
    cls = _lora_layer_type()
    return cls is not None and isinstance(module, cls)


class AdapterSwitch:
    """Makes one adapter (or none: the bare base) active in every peft layer of ``peft_model``.

    Not peft's ``set_adapter``/``disable_adapter``: those also set ``requires_grad`` (freezing every
    adapter but the active one, which would stop a second trained adapter), and walk all modules
    (~15 ms on a 7B, twice per micro-batch with a critic adapter). The layers are found once here.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.peft = peft_model
        self.tuner_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        self.aux_wrappers = [m for m in peft_model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]

    def activate(self, adapter: Optional[str]) -> None:
        """Make ``adapter`` the active one (None: no adapter); ``requires_grad`` is left alone."""
        for layer in self.tuner_layers:
            layer._active_adapter = [adapter] if adapter is not None else []
        for wrapper in self.aux_wrappers:  # modules_to_save / trainable tokens: one adapter or none
            wrapper._active_adapter = adapter if adapter in wrapper._adapters else []
        if adapter is not None:  # peft's own records (PeftModel looks its config up by this name)
            self.peft.active_adapter = self.peft.base_model.active_adapter = adapter


def lora_linears(model: nn.Module, adapter: str) -> list[nn.Linear]:
    """The ``lora_A`` / ``lora_B`` linears of ``adapter`` in every peft LoRA layer of ``model``."""
    out = []
    for m in model.modules():
        for factors in (getattr(m, "lora_A", None), getattr(m, "lora_B", None)):
            if isinstance(factors, nn.ModuleDict) and adapter in factors and isinstance(factors[adapter], nn.Linear):
                out.append(factors[adapter])
    return out


def cast_adapter_(model: nn.Module, adapter: str, dtype: torch.dtype) -> int:
    """Store a frozen adapter's LoRA factors in ``dtype`` (what autocast computes with anyway).

    Returns:
        The number of tensors cast.
    Raises:
        ValueError: the adapter is trainable (its updates would vanish in half precision).
    """
    linears = lora_linears(model, adapter)
    for lin in linears:
        if lin.weight.requires_grad:
            raise ValueError(f"adapter {adapter!r} is trainable; only a frozen adapter can be stored in {dtype}")
        lin.weight.data = lin.weight.data.to(dtype)
    return len(linears)


class LoraSource(NamedTuple):
    """One active adapter of one LoRA layer; its factors are read live (optimizer steps show)."""

    layer: nn.Module
    adapter: str

    @property
    def A(self) -> Tensor:
        """``(r, in_features)``."""
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> Tensor:
        """``(out_features, r)``."""
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        """``alpha / r`` (or peft's rsLoRA variant)."""
        return self.layer.scaling[self.adapter]


class LoraView(NamedTuple):
    """A LoRA layer as ``base(x) + sum_s scaling_s * B_s A_s x``.

    Attributes:
        base: the wrapped base layer (a Linear, a bitsandbytes Linear4bit, ...).
        sources: the active adapters' factors; empty when the adapters are merged or disabled.
    """

    base: nn.Module
    sources: list[LoraSource]


def lora_view(layer: nn.Module) -> Optional[LoraView]:
    """How to run the LoRA ``layer`` as base + low-rank updates, or None when it must be called as a
    whole: merged *and* disabled (peft unmerges inside forward), DoRA or another variant, factors
    that are not bias-free Linears."""
    merged, disabled = bool(layer.merged), bool(layer.disable_adapters)
    if merged and disabled:
        return None
    sources: list[LoraSource] = []
    if not (merged or disabled):
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
                return None
            a, b = layer.lora_A[name], layer.lora_B[name]
            if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
                return None
            sources.append(LoraSource(layer, name))
    return LoraView(layer.get_base_layer(), sources)


def lora_state_signature(lora_layers: Sequence[nn.Module]) -> tuple:
    """What decides how the LoRA layers compute: active adapters, merged, disabled (hashable)."""
    return tuple((tuple(m.active_adapters), bool(m.merged), bool(m.disable_adapters)) for m in lora_layers)


def fuse_rows_as_views(owner: nn.Module, kind: str, params: Sequence[Tensor]) -> Tensor:
    """One tensor whose consecutive row blocks are ``params``, which become views of it.

    The model then computes exactly as before while one GEMM can read all of them (q/k/v); no memory
    is added (the old storage is freed block by block). The tensor is remembered on ``owner`` and
    reused while every parameter still views it (a ``model.to(...)`` or a replaced parameter breaks
    that: the parameters are then moved again).
    """
    attr = f"_rlhf_lit_fused_{kind}"
    buf = getattr(owner, attr, None)
    if buf is not None and _views_rows_of(buf, params):
        return buf
    buf = torch.empty((sum(p.shape[0] for p in params), *params[0].shape[1:]), dtype=params[0].dtype,
                      device=params[0].device)
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.shape[0]
            buf[off:off + n].copy_(p)
            p.data = buf[off:off + n]
            off += n
    setattr(owner, attr, buf)
    return buf


def _views_rows_of(buf: Tensor, params: Sequence[Tensor]) -> bool:
    off = 0
    for p in params:
        n = p.shape[0]
        if off + n > buf.shape[0] or p.data_ptr() != buf[off].data_ptr() or p.shape != buf[off:off + n].shape:
            return False
        off += n
    return off == buf.shape[0]
