"""Fast rollouts: a static KV cache and the one-token decode step replayed as a CUDA graph.

Over 500 lines as one idea: the plan of the model, the static state, the capture and the decode
step are one engine, and read best together.

Why a graph
-----------
Decoding a 7B model at PPO batch sizes is memory-bandwidth bound on the GPU: each step reads every
weight once (15.2 GB in bf16, ~5 ms on an H100). HF ``generate`` takes ~30 ms per step whatever the
batch (60-70 ms with a peft LoRA adapter), because each step is ~1,000-2,000 small kernel launches
issued one by one from Python (peft's LoRA wrappers add four to six launches per projection). Here the step is written once against
preallocated buffers (a static KV cache sized from the batch, the prompt bucket and
``max_new_tokens``, plus the token, position, mask and RNG state), captured once with
``torch.cuda.CUDAGraph`` and replayed per token: the GPU runs the ~900 kernels back to back with
no Python in between and the host only enqueues one graph launch per token. Measured on an H100
(docs/benchmarks.md): 9.0 ms/step at batch 64 and 8.1 ms at batch 1 for the 7B shape with a LoRA
adapter, against 63-70 ms for HF ``generate``; the weight GEMMs run at ~85% of copy bandwidth and the
rest is ~900 small kernels (LoRA, norms, attention, RoPE) of 2-6 us each.
On CUDA the glue between the projections (RMSNorm; bias + RoPE + KV-cache write; attention over
the filled cache columns; SiLU-and-mul; sampling) runs as Triton kernels, one per group
(:mod:`rlhf_lit.rollout.decode_kernels`, ``kernels="auto"``): on an H200 that took a batch-64 step
with merged LoRA from 6.0 to 4.75 ms and from ~530 to ~300 kernels (docs/benchmarks.md).
``torch.compile(mode="reduce-overhead")`` was not used: it recompiles per shape (minutes for a 7B
model), breaks its graphs on peft and bitsandbytes modules, and HF's own static-cache + compile
path measured 27 ms/step with a LoRA adapter (docs/benchmarks.md, shared notes).

Why calling the model's submodules
----------------------------------
The engine owns only the glue of a Llama-family decoder layer: RMSNorm, RoPE, the KV-cache write,
attention over the static cache (SDPA with an additive length/padding mask), residuals and
sampling. Every projection goes through the model's own modules, looked up when the plan is built:

* a plain ``nn.Linear`` base is called through its ``weight``/``bias``; a quantized base
  (bitsandbytes ``Linear4bit``) or any other module is called as a module, so quantization and
  whatever a base layer does are honoured;
* a peft LoRA layer is, by default (``lora="fused"``), split into its base layer plus the low-rank
  update done as two small GEMMs with fused accumulation (``out.addmm_(x @ A^T, (s*B)^T)``). The
  LoRA factors of projections sharing an input (q/k/v; gate/up) are concatenated so their ``A``
  products are one GEMM. For that the factors are copied, in the activation dtype with the scaling
  folded in, into small static buffers at the start of EVERY ``generate`` call (80 MB for a 7B
  r=16 adapter on all projections; a few ms of host time per rollout): in-place optimizer updates of the LoRA weights are
  therefore always seen, without re-capture. DoRA and other variants, LoRA biases, or
  ``lora="module"`` call the peft module as a black box (exact peft numerics, ~3 more launches per
  projection);
* ``lora="merged"`` folds the update into a copy of each plain-Linear weight instead (gate and up
  side by side and transposed, ``(in, 2I)``, so they run as one ``x @ Wt`` GEMM),
  ``W + scaling * B @ A`` in the activation dtype, recomputed at every call (one GEMM per projection,
  a few ms): the decode step then runs no LoRA GEMM at all (~390 small kernels fewer per step on a 7B
  model with all seven projections adapted) for one more copy of those weights (~13 GB in bf16 on a
  7B model, freed by ``release()``). The merged weight rounds ``W + delta`` to bf16 once, where the
  fused path rounds ``W x`` and ``delta x``: the same bf16-rounding level;
* q/k/v with plain ``nn.Linear`` bases (``fuse_qkv=True``) run as ONE GEMM: the first plan moves
  their weights and biases into one side-by-side buffer and leaves the modules' parameters as views
  of it (no copy, no extra memory; the model computes exactly as before), with one block-diagonal
  LoRA ``B`` copied per call; RoPE then runs on q and k in one pass (-0.7 ms/step at batch 64 on an
  H100);
* every other base weight, bias and norm weight is read where it lives, so in-place updates of
  those are seen by replays too.

Numerics: ``lora="fused"`` computes the LoRA delta in the activation dtype (bf16) where peft keeps
fp32 adapter weights; ``norm="fused"`` uses ``torch.rms_norm`` (one kernel, one rounding) instead
of HF's fp32-then-cast formula (``norm="exact"``). Both differ from HF by bf16 rounding only (fp32
runs agree to ~1e-6); PPO recomputes old log-probs with its training forward anyway, so the ratio
starts at 1 whatever the engine does. LoRA dropout is skipped (the engine samples in eval mode). The
Triton glue follows the torch ops' roundings. Its sampler draws the same distribution from Philox
uniforms it computes itself, keyed by one draw of the generator per call: the same seed draws the
same tokens on a path, but the torch and Triton paths draw different ones.

Left-padded prompts are padded further on the left to a multiple of ``prompt_bucket`` so a capture
serves every prompt length in a bucket. Positions are per row (``cumsum(mask) - 1``, as HF), padding
is masked out of attention, and the cache column written at decode step ``t`` is ``bucket + t`` for
every row. Sampling runs inside the graph: temperature, top-k, top-p (sort), min_new_tokens
(suppresses the stop ids), and an exponential race ``argmax p_i / E_i`` (E ~ Exp(1) from
``torch.rand``, graph-safe through the CUDA generator; the Triton sampler computes its uniforms).
Rows that emitted a stop token get PAD after it; the host checks every ``check_every`` steps (once
past ``min_new_tokens``) whether all rows finished and stops early.

What invalidates a capture
--------------------------
The graph holds raw pointers and baked-in control flow. It is re-captured when any of these
changes: batch size, prompt bucket, ``max_new_tokens``, any sampling knob, stop ids, pad id, greedy
or log-prob mode; the model object, its adapter state (active adapters, ``disable_adapter()``,
merged) or the storage of any parameter (``model.to(...)``, a parameter replaced rather than
updated in place). Only one capture (and its cache) is kept: ``release()`` frees the graph, the KV
cache and the LoRA copies so the PPO update phase gets the memory back; the next ``generate``
re-captures.

The same code runs eagerly (no graph) on CPU or with ``use_cuda_graph=False``, which is how it is
tested against HF ``generate`` token for token. Unsupported architectures raise
:class:`UnsupportedModelError`; use :class:`~rlhf_lit.rollout.HFGenerate` for those.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rlhf_lit.rollout.decode_kernels as decode_kernels
from rlhf_lit.model.peft_layers import fuse_rows_as_views, is_lora_layer, lora_state_signature, lora_view
from rlhf_lit.rollout.base import RolloutEngine, SamplingConfig
from rlhf_lit.rollout.sampling import filter_logits, sample_from_filtered, sample_from_logits  # noqa: F401

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(NotImplementedError):
    """The model is not a Llama-family decoder this engine knows how to run."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM (``.model`` + ``.lm_head``) under a peft wrapper, if any."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _rms_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(norm, name, None)
        if eps is not None:
            return float(eps)
    raise UnsupportedModelError(f"cannot read the epsilon of norm {type(norm).__name__}")


def _is_silu(act: nn.Module) -> bool:
    """torch's ``nn.SiLU`` or transformers' ``SiLUActivation`` (``ACT2FN["silu"]``, newer versions)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (its weight carries a ``quant_state``)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _dequantized(module: nn.Module) -> Tensor:
    """The bf16 weight of a bitsandbytes 4-bit layer (peft's helper, which calls bitsandbytes)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, module.weight.quant_state)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# --------------------------------------------------------------------------------------------
# Plan: how to run one model's projections
# --------------------------------------------------------------------------------------------
class _Proj:
    """One projection: a base (plain Linear or any module) plus an optional fused LoRA update."""

    def __init__(self, module: nn.Module, lora_mode: str):
        self.module = module
        self.kind = "module"  # "module": call as a black box; "linear": F.linear; "base": call base
        self.base: Optional[nn.Module] = None
        self.sources: list = []  # peft_layers.LoraSource: the active adapters' factors
        self.r = 0
        self.out_features = 0
        self.in_features = 0
        self.B: Optional[Tensor] = None  # (out, r) snapshot of scaling * B, activation dtype
        self.Wm: Optional[Tensor] = None  # lora="merged": (out, in) W + scaling * B @ A, refreshed per call
        self.a0 = self.a1 = 0  # slice of the group's LoRA-A product
        if is_lora_layer(module):
            view = lora_view(module) if lora_mode == "fused" else None
            if view is None:
                return  # peft's own forward: merged-and-disabled, DoRA & co, or lora="module"
            self.sources = view.sources
            if self.sources:
                self.r = sum(src.A.shape[0] for src in self.sources)
                self.in_features = self.sources[0].A.shape[1]
                self.out_features = self.sources[0].B.shape[0]
            self.base = view.base
        else:
            self.base = module
        self.kind = "linear" if type(self.base) is nn.Linear else "base"

    def _base_out(self, x: Tensor) -> Tensor:
        if self.Wm is not None:
            bias = self.base.bias
            return F.linear(x, self.Wm, None if bias is None else bias.to(self.Wm.dtype))
        if self.kind == "linear":
            return F.linear(x, self.base.weight, self.base.bias)
        if self.kind == "base":
            return self.base(x)
        return self.module(x)

    @property
    def lora_on_the_side(self) -> bool:
        """The LoRA update runs as its own two small GEMMs (not merged into the weight)."""
        return self.B is not None and self.Wm is None

    def __call__(self, x: Tensor, a: Optional[Tensor]) -> Tensor:
        out = self._base_out(x)
        if self.lora_on_the_side:
            out.addmm_(a[:, self.a0:self.a1], self.B.t())
        return out

    def add_into(self, res: Tensor, x: Tensor, a: Optional[Tensor]) -> None:
        """``res += proj(x)``, the base GEMM accumulating straight into the residual when it can."""
        if (self.kind == "linear" or self.Wm is not None) and self.base.bias is None:
            res.addmm_(x, (self.Wm if self.Wm is not None else self.base.weight).t())
        else:
            res.add_(self._base_out(x))
        if self.lora_on_the_side:
            res.addmm_(a[:, self.a0:self.a1], self.B.t())


class _Group:
    """Projections that read the same input: their LoRA ``A`` factors are one GEMM.

    With ``merged``, a plain-Linear projection in the activation dtype gets a merged weight
    ``W + scaling * B @ A`` (a copy the size of ``W``, recomputed at every call) and no LoRA GEMMs."""

    def __init__(self, projs: Sequence[_Proj], dtype: torch.dtype, device: torch.device, merged: bool = False):
        self.projs = list(projs)
        self.A: Optional[Tensor] = None
        self.Wt_cat = None
        lora = [p for p in self.projs if p.r > 0]
        if not lora:
            return
        r_total, in_f = 0, lora[0].in_features
        for p in lora:
            p.a0, p.a1 = r_total, r_total + p.r
            r_total += p.r
            p.B = torch.empty(p.out_features, p.r, dtype=dtype, device=device)
        # the projections that decode from a merged copy (plain Linear in the activation dtype, or 4-bit)
        to_merge = [p for p in lora if merged and (p.kind == "linear" and p.base.weight.dtype == dtype
                                                    or _is_4bit(p.base))]
        if len(to_merge) > 1 and len(to_merge) == len(self.projs):
            # The merged copies transposed and side by side, (in, sum of out), each projection's copy
            # a view of its columns: the same memory, and the projections run as one GEMM ``x @ Wt``
            # (gate and up: 0.92-0.94 of copy bandwidth at 1-64 rows on an H200, against 0.88-0.91
            # for two ``x @ W^T``; docs/benchmarks.md).
            self.Wt_cat = torch.empty(in_f, sum(p.out_features for p in lora), dtype=dtype, device=device)
            off = 0
            for p in lora:
                p.Wm, off = self.Wt_cat[:, off:off + p.out_features].t(), off + p.out_features
        else:
            for p in to_merge:
                p.Wm = torch.empty(p.out_features, p.in_features, dtype=dtype, device=device)
        self.A = torch.empty(r_total, in_f, dtype=dtype, device=device)
        self.side = [p for p in lora if p.lora_on_the_side]  # who still needs the A product

    def refresh(self) -> None:
        """Copy the live LoRA factors (scaling folded into B) into the static buffers."""
        if self.A is None:
            return
        for p in self.projs:
            if p.r == 0:
                continue
            row = p.a0
            col = 0
            for src in p.sources:
                a_w = src.A
                r = a_w.shape[0]
                self.A[row:row + r].copy_(a_w)
                p.B[:, col:col + r].copy_(src.B * src.scaling)
                row += r
                col += r
            if p.Wm is not None:
                base = _dequantized(p.base) if p.kind == "base" else p.base.weight
                torch.addmm(base.to(p.Wm.dtype), p.B, self.A[p.a0:p.a1], out=p.Wm)

    def lora_a(self, x: Tensor) -> Optional[Tensor]:
        return None if self.A is None or not self.side else torch.mm(x, self.A.t())


class _FusedLinear:
    """Plain-Linear projections reading one input (q/k/v) as ONE GEMM over the model's own weights.

    The first plan moves their weights (and biases, when all have one) into one side-by-side buffer
    and makes the modules' parameters views of it: the training forward and the fused GEMM read the
    same memory, so there is no copy to refresh and no extra memory (a copy would cost 0.9 GB for a
    7B model during every rollout). Later plans find the buffer and reuse it. Only the LoRA ``B``
    factors are copied, into one block-diagonal matrix, at every call."""

    def __init__(self, projs: Sequence[_Proj], group: _Group, dtype: torch.dtype, device: torch.device,
                 merged: bool = False):
        self.projs = list(projs)
        self.sizes = [p.base.weight.shape[0] for p in self.projs]
        n = sum(self.sizes)
        self.W = fuse_rows_as_views(self.projs[0].base, "weight", [p.base.weight for p in self.projs])
        biases = [p.base.bias for p in self.projs]
        if all(b is not None for b in biases):
            self.b, self._copy_bias = fuse_rows_as_views(self.projs[0].base, "bias", biases), False
        else:  # some have a bias: zeros for the others, copied every call
            has_bias = any(b is not None for b in biases)
            self.b = torch.zeros(n, dtype=dtype, device=device) if has_bias else None
            self._copy_bias = has_bias
        self.Bd = None if group.A is None else torch.zeros(n, group.A.shape[0], dtype=dtype, device=device)
        self.group = group
        # lora="merged": one (n, in) copy W + Bd @ A instead of the LoRA GEMMs.
        self.Wm = torch.empty_like(self.W) if merged and self.Bd is not None else None

    @staticmethod
    def applies(projs: Sequence[_Proj], dtype: torch.dtype) -> bool:
        return all(p.kind == "linear" and p.base.weight.dtype == dtype for p in projs) and (
            len({p.base.weight.shape[1:] for p in projs}) == 1
        )

    def refresh(self) -> None:
        off = 0
        for p, n in zip(self.projs, self.sizes):
            if self._copy_bias and p.base.bias is not None:
                self.b[off:off + n].copy_(p.base.bias)
            if self.Bd is not None and p.B is not None:
                self.Bd[off:off + n, p.a0:p.a1].copy_(p.B)
            off += n
        if self.Wm is not None:
            torch.addmm(self.W, self.Bd, self.group.A, out=self.Wm)

    def __call__(self, x: Tensor, a: Optional[Tensor], with_bias: bool = True) -> Tensor:
        """``x W^T (+ b)`` with the LoRA update; ``with_bias=False`` leaves the bias to the caller."""
        b = self.b if with_bias else None
        if self.Wm is not None:
            return F.linear(x, self.Wm, b)
        y = F.linear(x, self.W, b)
        if self.Bd is not None:
            y.addmm_(a, self.Bd.t())
        return y


@dataclass
class _LayerPlan:
    ln1: nn.Module
    ln2: nn.Module
    q_norm: Optional[nn.Module]
    k_norm: Optional[nn.Module]
    q: _Proj
    k: _Proj
    v: _Proj
    o: _Proj
    gate: _Proj
    up: _Proj
    down: _Proj
    act: nn.Module
    qkv: _Group
    o_grp: _Group
    gu: _Group
    d_grp: _Group
    fqkv: Optional[_FusedLinear] = None


class _Plan:
    """Everything derived from the model: dims, submodules, LoRA buffers."""

    def __init__(self, model: nn.Module, lora_mode: str, fuse_qkv: bool = True):
        merged = lora_mode == "merged"
        lora_mode = "fused" if merged else lora_mode  # merged = the fused plan with merged weights
        lm = _unwrap(model)
        cfg = getattr(lm, "config", None)
        mtype = getattr(cfg, "model_type", None)
        inner = getattr(lm, "model", None)
        if mtype not in SUPPORTED_MODEL_TYPES or inner is None or not hasattr(lm, "lm_head"):
            raise UnsupportedModelError(
                f"StaticCudaGraphGenerate runs Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"got model_type={mtype!r} ({type(lm).__name__}). Use rlhf_lit.rollout.HFGenerate."
            )
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, name):
                raise UnsupportedModelError(f"{type(inner).__name__} has no `{name}`; use HFGenerate")
        self.rotary = inner.rotary_emb
        rope_type = getattr(self.rotary, "rope_type", "default")
        if rope_type not in _STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} depends on the sequence length; use HFGenerate"
            )
        self.embed = inner.embed_tokens
        self.final_norm = inner.norm
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        attn0 = inner.layers[0].self_attn
        self.head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.group = self.n_heads // self.n_kv
        self.n_layers = len(inner.layers)
        self.vocab = int(cfg.vocab_size)
        w = self.embed.weight if hasattr(self.embed, "weight") else next(self.embed.parameters())
        self.dtype = w.dtype
        self.device = w.device
        self.sliding_windows = []
        self.layers: list[_LayerPlan] = []
        dt, dev = self.dtype, self.device
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not hasattr(attn, name):
                    raise UnsupportedModelError(f"attention without `{name}`; use HFGenerate")
            for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
                if not hasattr(mlp, name):
                    raise UnsupportedModelError(f"MLP without `{name}`; use HFGenerate")
            self.sliding_windows.append(getattr(attn, "sliding_window", None))
            q, k, v = (_Proj(getattr(attn, n), lora_mode) for n in ("q_proj", "k_proj", "v_proj"))
            fuse_qkv_here = fuse_qkv and _FusedLinear.applies([q, k, v], dt)
            o = _Proj(attn.o_proj, lora_mode)
            gate, up, down = (_Proj(getattr(mlp, n), lora_mode) for n in ("gate_proj", "up_proj", "down_proj"))
            self.layers.append(
                _LayerPlan(
                    ln1=layer.input_layernorm,
                    ln2=layer.post_attention_layernorm,
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    q=q, k=k, v=v, o=o, gate=gate, up=up, down=down,
                    act=mlp.act_fn,
                    qkv=_Group([q, k, v], dt, dev, merged and not fuse_qkv_here),
                    o_grp=_Group([o], dt, dev, merged),
                    gu=_Group([gate, up], dt, dev, merged),
                    d_grp=_Group([down], dt, dev, merged),
                )
            )
            L = self.layers[-1]
            if fuse_qkv_here:
                L.fqkv = _FusedLinear([q, k, v], L.qkv, dt, dev, merged)
                if merged and L.fqkv.Wm is not None:
                    L.qkv.side = []  # the fused GEMM reads the merged copy: no A product
        self.lm_head = _Proj(lm.lm_head, lora_mode)
        self.lm_grp = _Group([self.lm_head], dt, dev, merged)
        self.groups = [g for L in self.layers for g in (L.qkv, L.o_grp, L.gu, L.d_grp)] + [self.lm_grp]
        self.lora_modules = [m for m in lm.modules() if is_lora_layer(m)]

    def refresh(self) -> None:
        with torch.no_grad():
            for g in self.groups:
                g.refresh()
            for L in self.layers:
                if L.fqkv is not None:
                    L.fqkv.refresh()


def _model_signature(model: nn.Module, lora_modules: Sequence[nn.Module]) -> tuple:
    ptrs = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters())
    return (id(model), ptrs, lora_state_signature(lora_modules))


# --------------------------------------------------------------------------------------------
# Static state of one (batch, prompt bucket, max_new_tokens, sampling) shape
# --------------------------------------------------------------------------------------------
class _State:
    def __init__(self, plan: _Plan, batch: int, bucket_len: int, max_new: int, stop_ids: Sequence[int]):
        dev, dt = plan.device, plan.dtype
        self.B, self.P, self.R = batch, bucket_len, max_new
        self.L = _round_up(bucket_len + max_new, 16)  # multiple of 16: SDPA's masked kernels want it
        shape = (plan.n_layers, batch, plan.n_kv, self.L, plan.head_dim)
        self.k = torch.zeros(shape, dtype=dt, device=dev)
        self.v = torch.zeros(shape, dtype=dt, device=dev)
        pos = torch.arange(self.L, device=dev)[None]
        cos, sin = plan.rotary(torch.empty(0, dtype=dt, device=dev), pos)
        self.cos = cos[0].to(dt).contiguous()  # (L, D)
        sin = sin[0].to(dt).clone()
        sin[:, : plan.head_dim // 2].neg_()  # rotate_half(q) * sin == roll(q, D/2) * sin_signed
        self.sin = sin.contiguous()
        self.neg = torch.finfo(dt).min
        self.bias = torch.zeros(batch, 1, 1, self.L, dtype=dt, device=dev)
        self.pmask = torch.zeros(batch, bucket_len, dtype=torch.bool, device=dev)
        self.cur_tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.seed = torch.zeros(1, dtype=torch.long, device=dev)  # the Triton sampler's Philox key, per call
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=dev)
        self.out = torch.zeros(batch, max_new + 2, dtype=torch.long, device=dev)  # +2: warm-up slack
        self.lp = torch.zeros(batch, max_new + 2, dtype=torch.float32, device=dev)
        stops = sorted(set(int(s) for s in stop_ids))
        self.stop_t = torch.tensor(stops, dtype=torch.long, device=dev) if stops else None
        self.graph: Any = None

    def mutable(self) -> list[Tensor]:
        return [self.bias, self.cur_tok, self.pos, self.col, self.step, self.finished, self.lengths, self.out, self.lp]


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class StaticCudaGraphGenerate(RolloutEngine):
    """Static-cache decoding with the decode step replayed as a CUDA graph (eager on CPU).

    Args:
        prompt_bucket: prompts are left-padded to a multiple of this (one capture per bucket).
        use_cuda_graph: capture and replay on CUDA (``False``: run the same step eagerly).
        lora: ``"fused"`` (LoRA factors snapshot per call, grouped GEMMs), ``"merged"`` (each
            plain-Linear projection decodes with a merged copy ``W + scaling * B @ A`` recomputed per
            call: no LoRA GEMMs, for one more copy of those weights, ~13 GB on a 7B model, held
            until ``release()``; a bitsandbytes 4-bit base is dequantized into that copy, so nf4
            decodes with bf16 GEMMs instead of dequantizing every weight at every step) or
            ``"module"`` (call peft's modules as they are).
        norm: ``"fused"`` (``torch.rms_norm`` in the activation dtype) or ``"exact"`` (HF's formula).
        greedy: argmax instead of sampling (evaluation and tests); temperature still scales the
            reported log-probs.
        compute_logprobs: keep ``log_softmax(logits / T)`` of each generated token in
            ``last_logprobs`` (``(B, R)``, 0 after the stop).
        sampler_logprobs: keep instead the log-prob under which each token was actually sampled
            (after min_new_tokens' stop suppression, top-k and top-p) in ``last_sampler_logprobs``.
        seed: seed of a private generator (``None``: the global CUDA/CPU generator).
        check_every: steps between host checks for "all rows finished".
        fuse_qkv: run q/k/v (plain Linear bases) as one GEMM; their parameters become views of
            one side-by-side buffer (no extra memory); RoPE then runs on q and k at once.
        prefill_rows: prompts per chunk of the prompt pass (its activations scale with it).
        kernels: the decode step's glue as Triton kernels (:mod:`~rlhf_lit.rollout.decode_kernels`)
            or torch ops: ``"triton"``, ``"torch"``, or ``"auto"`` (Triton on CUDA when it imports
            and its kernels pass :func:`~rlhf_lit.rollout.decode_kernels.self_test` there, else torch,
            with a warning). ``"triton"`` on the CPU needs ``TRITON_INTERPRET=1`` (tests). Where a
            kernel does not apply, that part runs as torch ops: RMSNorm needs the norm weight in the
            activation dtype and ``norm="fused"``; with fused q/k/v and no q/k norms (so not Qwen3),
            bias + RoPE + cache write + attention are one kernel when ``head_dim / 2`` is a power of
            two >= 16 (``decode_kernels.rope_attention``), two kernels when it is a smaller power of
            two; otherwise attention alone needs ``head_dim`` a power of two >= 16
            (:func:`~rlhf_lit.rollout.decode_kernels.head_dim_support`); SiLU-and-mul an ``act_fn``
            that is SiLU; the sampler ``top_k=0``, ``top_p=1`` and sampling (not ``greedy``). The
            prompt pass always uses torch ops.
        gate_up_rows: with ``lora="merged"``, the MLP's gate and up run as one GEMM over their
            side-by-side merged copies when the GEMM has at most this many rows (a decode step: the
            batch; a prompt chunk: its rows x prompt length); otherwise as two GEMMs over the
            column halves. 0: never.
    """

    def __init__(
        self,
        prompt_bucket: int = 32,
        use_cuda_graph: bool = True,
        lora: str = "fused",
        norm: str = "fused",
        greedy: bool = False,
        compute_logprobs: bool = False,
        sampler_logprobs: bool = False,
        seed: Optional[int] = None,
        check_every: int = 8,
        fuse_qkv: bool = True,
        prefill_rows: int = 64,
        kernels: str = "auto",
        gate_up_rows: int = 512,
    ):
        if lora not in ("fused", "merged", "module"):
            raise ValueError(f"lora must be 'fused', 'merged' or 'module', got {lora!r}")
        if norm not in ("fused", "exact"):
            raise ValueError(f"norm must be 'fused' or 'exact', got {norm!r}")
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        if kernels == "triton" and not decode_kernels.available():
            raise ValueError("kernels='triton' needs the triton package (it ships with torch's CUDA builds)")
        self.kernels = kernels
        if isinstance(gate_up_rows, bool) or not isinstance(gate_up_rows, int) or gate_up_rows < 0:
            raise ValueError(f"gate_up_rows must be an integer >= 0, got {gate_up_rows!r}")
        self.gate_up_rows = gate_up_rows
        self._fused_glue = False
        if prompt_bucket < 1 or check_every < 1 or prefill_rows < 1:
            raise ValueError("prompt_bucket, check_every and prefill_rows must be >= 1")
        self.prefill_rows = prefill_rows
        self.prompt_bucket = prompt_bucket
        self.use_cuda_graph = use_cuda_graph
        self.lora_mode = lora
        self.fused_norm = norm == "fused"
        self.greedy = greedy
        self.sampler_logprobs = sampler_logprobs
        self.compute_logprobs = compute_logprobs or sampler_logprobs
        self.seed = seed
        self.check_every = check_every
        self.fuse_qkv = fuse_qkv
        self.num_captures = 0
        self.num_setups = 0
        self.last_logprobs: Optional[Tensor] = None
        self.last_stats: dict = {}
        self._plan: Optional[_Plan] = None
        self._plan_sig: Optional[tuple] = None
        self._state: Optional[_State] = None
        self._state_key: Optional[tuple] = None
        self._gen: Optional[torch.Generator] = None
        self._sampling: Optional[SamplingConfig] = None
        self._pad = 0

    # ----------------------------------------------------------------------------- public API
    @property
    def last_sampler_logprobs(self) -> Optional[Tensor]:
        return self.last_logprobs if self.sampler_logprobs else None

    def release(self) -> None:
        self._state = None
        self._state_key = None
        self._plan = None
        self._plan_sig = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id):
        was_training = model.training
        if was_training:
            model.eval()
        try:
            return self._generate(model, input_ids, attention_mask, sampling, stop_token_ids, pad_token_id)
        finally:
            if was_training:
                model.train()

    # ------------------------------------------------------------------------------ internals
    def _get_plan(self, model: nn.Module) -> _Plan:
        if self._plan is not None:
            sig = _model_signature(model, self._plan.lora_modules)
            if sig == self._plan_sig:
                return self._plan
        self._state = None
        self._state_key = None
        self._plan = None
        plan = _Plan(model, self.lora_mode, self.fuse_qkv)
        self._plan_sig = _model_signature(model, plan.lora_modules)
        self._plan = plan
        return plan

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
        return self._gen

    def _generate(self, model, input_ids, attention_mask, sampling: SamplingConfig, stop_token_ids, pad_token_id):
        plan = self._get_plan(model)
        dev = plan.device
        input_ids = input_ids.to(dev)
        attention_mask = attention_mask.to(dev).bool()
        B, P = input_ids.shape
        Pb = _round_up(P, self.prompt_bucket)
        R = sampling.max_new_tokens
        for w in plan.sliding_windows:
            if w is not None and w < Pb + R:
                raise UnsupportedModelError(
                    f"sliding-window attention (window {w}) shorter than prompt + response ({Pb + R}); use HFGenerate"
                )
        stops = tuple(sorted(set(int(s) for s in stop_token_ids)))
        use_graph = self.use_cuda_graph and dev.type == "cuda"
        if self.kernels == "triton" and dev.type != "cuda" and not decode_kernels.interpreting():
            raise ValueError(f"kernels='triton' runs on CUDA (the model is on {dev}); on the CPU only under "
                             "TRITON_INTERPRET=1, Triton's interpreter (tests). Use kernels='auto' or 'torch'")
        self._fused_glue = self.kernels == "triton" or (
            self.kernels == "auto" and dev.type == "cuda" and decode_kernels.available() and self._kernels_run(dev)
        )
        key = (self._fused_glue, B, Pb, R, sampling.min_new_tokens, float(sampling.temperature), int(sampling.top_k),
               float(sampling.top_p), stops, int(pad_token_id), self.greedy, self.compute_logprobs,
               self.sampler_logprobs, use_graph)
        if self._state is None or self._state_key != key:
            self._state = None
            self._state = _State(plan, B, Pb, R, stops)
            self._state_key = key
            self.num_setups += 1
        st = self._state
        self._sampling = sampling
        self._pad = int(pad_token_id)
        gen = self._generator(dev)
        plan.refresh()
        if self._triton_sampler(sampling):  # its Philox key: one draw of the generator per call
            st.seed.copy_(torch.randint(0, 2 ** 62, (1,), generator=gen, device=dev))

        if Pb > P:
            pad_cols = Pb - P
            input_ids = torch.cat([input_ids.new_full((B, pad_cols), int(pad_token_id)), input_ids], 1)
            attention_mask = torch.cat([attention_mask.new_zeros((B, pad_cols)), attention_mask], 1)

        timing = dev.type == "cuda"
        if timing:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        t0 = time.perf_counter()
        self._prefill(plan, st, input_ids, attention_mask, gen)
        if R > 1 and use_graph and st.graph is None:
            self._capture(plan, st, gen)
        t1 = time.perf_counter()
        if timing:
            ev[1].record()
        steps = 1
        min_new = sampling.min_new_tokens
        for t in range(1, R):
            if use_graph:
                st.graph.replay()
            else:
                self._decode_step(plan, st, gen)
            steps += 1
            if st.stop_t is not None and steps >= max(min_new, 1) and (
                not use_graph or steps % self.check_every == 0
            ):
                if bool(st.finished.all()):
                    break
        n = int(st.lengths.max()) if st.stop_t is not None else steps
        if timing:
            ev[2].record()
            ev[2].synchronize()
            self.last_stats = {
                "prefill_ms": ev[0].elapsed_time(ev[1]),
                "decode_ms": ev[1].elapsed_time(ev[2]),
                "decode_steps": steps - 1,
            }
        else:
            t2 = time.perf_counter()
            self.last_stats = {"prefill_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * (t2 - t1), "decode_steps": steps - 1}
        out = st.out[:, :n].clone()
        self.last_logprobs = st.lp[:, :n].clone() if self.compute_logprobs else None
        return out

    @staticmethod
    def _kernels_run(dev: torch.device) -> bool:
        """The Triton kernels compile and run on ``dev`` (once per device); if not, ``auto`` decodes
        with the torch ops and says why, rather than stopping the run."""
        err = decode_kernels.self_test(dev)
        if err is not None and str(dev) not in _GLUE_WARNED:
            _GLUE_WARNED.add(str(dev))
            log.warning("the Triton decode kernels do not run on %s (%s); decoding with the torch ops", dev, err)
        return err is None

    # ------------------------------------------------------------------------ building blocks
    def _rms(self, x: Tensor, norm: nn.Module) -> Tensor:
        w = norm.weight
        eps = _rms_eps(norm)
        if self.fused_norm and w.dtype == x.dtype:
            return torch.rms_norm(x, (x.shape[-1],), w, eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    @staticmethod
    def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
        """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) * sin == roll(x) * sin_signed``."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)

    @staticmethod
    def _qkv(L: _LayerPlan, h: Tensor, a: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as column slices of one GEMM (``fqkv``) or three separate projections."""
        if L.fqkv is None:
            return L.q(h, a), L.k(h, a), L.v(h, a)
        y = L.fqkv(h, a)
        nq, nk, _ = L.fqkv.sizes
        return y[:, :nq], y[:, nq:nq + nk], y[:, nq + nk:]

    def _mlp(self, L: _LayerPlan, x: Tensor, fused_glue: bool = False) -> None:
        """``x += down(act(gate(h)) * up(h))`` with ``h = norm(x)``, the down GEMM accumulating into ``x``."""
        h = self._rms_step(x, L.ln2) if fused_glue else self._rms(x, L.ln2)
        a = L.gu.lora_a(h)
        if L.gu.Wt_cat is not None and h.shape[0] <= self.gate_up_rows and L.gate.base.bias is None \
                and L.up.base.bias is None:
            y = torch.mm(h, L.gu.Wt_cat)  # merged gate and up side by side: one GEMM
            g, u = y[:, : L.gate.out_features], y[:, L.gate.out_features:]
        else:
            g, u = L.gate(h, a), L.up(h, a)
        m = decode_kernels.silu_mul(g, u) if fused_glue and _is_silu(L.act) else L.act(g) * u
        L.down.add_into(x, m, L.d_grp.lora_a(m))

    def _rms_step(self, x: Tensor, norm: nn.Module) -> Tensor:
        """The decode step's RMSNorm: one Triton kernel where it computes what ``_rms`` would."""
        if self._fused_glue and self.fused_norm and norm.weight.dtype == x.dtype:
            return decode_kernels.rms_norm(x, norm.weight, _rms_eps(norm))
        return self._rms(x, norm)

    def _prefill(self, plan: _Plan, st: _State, ids: Tensor, mask: Tensor, gen) -> None:
        # Rows in chunks: at GRPO batch sizes (512 x 64 prompt tokens) the prompt's MLP activations of
        # all rows at once would outweigh the KV cache; each chunk writes its own rows of the cache.
        last = torch.cat([self._prefill_rows(plan, st, ids[r:r + self.prefill_rows], mask[r:r + self.prefill_rows], r)
                          for r in range(0, ids.shape[0], self.prefill_rows)])
        h = self._rms(last, plan.final_norm)
        logits = plan.lm_head(h, plan.lm_grp.lora_a(h))
        P = ids.shape[1]
        # decode state: token 0 is sampled here, so the first fed token sits at column P
        st.pmask.copy_(mask)
        st.bias.fill_(st.neg)
        st.bias[:, 0, 0, :P].masked_fill_(mask, 0.0)
        st.pos.copy_(mask.long().sum(-1) - 1)
        st.col.fill_(P - 1)
        st.step.zero_()
        st.finished.zero_()
        st.lengths.zero_()
        st.out.fill_(self._pad)
        st.lp.zero_()
        self._sample_and_advance(st, logits, gen)

    def _prefill_rows(self, plan: _Plan, st: _State, ids: Tensor, mask: Tensor, row0: int) -> Tensor:
        """The prompt pass of rows ``row0 : row0 + len(ids)``: fills their KV cache, returns their last
        position's hidden state ``(b, hidden)``."""
        B, P = ids.shape
        rows = slice(row0, row0 + B)
        nH, nKV, D = plan.n_heads, plan.n_kv, plan.head_dim
        dt = plan.dtype
        # per-row positions as HF: cumsum of the mask - 1 (padding gets 0; it is masked anyway)
        pos = (mask.long().cumsum(-1) - 1).clamp_min_(0)
        cos = st.cos[pos].unsqueeze(2)  # (B, P, 1, D)
        sin = st.sin[pos].unsqueeze(2)
        ar = torch.arange(P, device=ids.device)
        allowed = (mask[:, None, None, :] & (ar[None, :] <= ar[:, None])[None, None]) | torch.eye(
            P, dtype=torch.bool, device=ids.device
        )[None, None]  # a padding query sees itself: no all-masked rows, no NaN in the cache
        zero = torch.zeros((), dtype=dt, device=ids.device)
        pbias = torch.where(allowed, zero, torch.full((), st.neg, dtype=dt, device=ids.device))
        x = plan.embed(ids).reshape(B * P, -1)
        for i, L in enumerate(plan.layers):
            h = self._rms(x, L.ln1)
            q, k, v = self._qkv(L, h, L.qkv.lora_a(h))
            q = q.view(B, P, nH, D)
            k = k.view(B, P, nKV, D)
            v = v.view(B, P, nKV, D)
            if L.q_norm is not None:
                q = self._rms(q, L.q_norm)
                k = self._rms(k, L.k_norm)
            q = self._rope(q, cos, sin).transpose(1, 2)  # (B, nH, P, D)
            k = self._rope(k, cos, sin).transpose(1, 2)  # (B, nKV, P, D)
            v = v.transpose(1, 2)
            st.k[i, rows, :, :P].copy_(k)
            st.v[i, rows, :, :P].copy_(v)
            if plan.group > 1:
                k = k[:, :, None].expand(B, nKV, plan.group, P, D).reshape(B, nH, P, D)
                v = v[:, :, None].expand(B, nKV, plan.group, P, D).reshape(B, nH, P, D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=pbias, scale=plan.scale)
            o = o.transpose(1, 2).reshape(B * P, nH * D)
            L.o.add_into(x, o, L.o_grp.lora_a(o))
            self._mlp(L, x)
        return x.view(B, P, -1)[:, -1]

    def _decode_step(self, plan: _Plan, st: _State, gen) -> None:
        st.bias.index_fill_(3, st.col, 0.0)
        x = plan.embed(st.cur_tok)  # (B, H), the residual stream, updated in place
        support = decode_kernels.head_dim_support(plan.head_dim) if self._fused_glue else None
        # the RoPE tables at each row's position, for the layers whose RoPE runs as torch ops
        rope_kernel = support is not None and support.rope
        cos_sin = None
        if any(not (rope_kernel and L.fqkv is not None and L.q_norm is None) for L in plan.layers):
            cos_sin = (st.cos.index_select(0, st.pos).unsqueeze(1), st.sin.index_select(0, st.pos).unsqueeze(1))
        for i, L in enumerate(plan.layers):
            h = self._rms_step(x, L.ln1)
            o = self._attention_step(plan, st, i, L, h, support, cos_sin)
            L.o.add_into(x, o, L.o_grp.lora_a(o))
            self._mlp(L, x, self._fused_glue)
        h = self._rms_step(x, plan.final_norm)
        logits = plan.lm_head(h, plan.lm_grp.lora_a(h))
        self._sample_and_advance(st, logits, gen)

    def _attention_step(self, plan: _Plan, st: _State, i: int, L, h: Tensor, support, cos_sin) -> Tensor:
        """Layer ``i``'s q/k/v, RoPE, cache write and attention for one decode step; returns the
        attention output ``(B, n_heads * D)``.

        With the Triton glue (``support``: :func:`decode_kernels.head_dim_support` of the head dim)
        and fused q/k/v without q/k norms, one :func:`decode_kernels.rope_attention` kernel, or the
        RoPE kernel then the attention kernel where ``D / 2 < 16``; otherwise torch ops for what the
        kernels do not take (``cos_sin``: the RoPE tables at each row's position, ``(B, 1, D)`` each)."""
        B, nH, nKV, D = st.B, plan.n_heads, plan.n_kv, plan.head_dim
        kc, vc = st.k[i], st.v[i]
        # 128 cache columns per attention loop step up to 64 rows, 64 beyond (benchmarks/decode_kernels.py)
        block_n = 128 if B <= 64 else 64
        fused_qkv = L.fqkv is not None and L.q_norm is None
        if fused_qkv and support is not None and support.rope_attention:
            y = L.fqkv(h, L.qkv.lora_a(h), with_bias=False)
            return decode_kernels.rope_attention(y, st.cos, st.sin, st.pos, st.col, kc, vc, st.bias, plan.scale,
                                                 nH, nKV, bias=L.fqkv.b, block_n=block_n)
        if fused_qkv and support is not None and support.rope:
            # one kernel: the bias, RoPE on q (in place) and k, and k and v into the cache
            y = L.fqkv(h, L.qkv.lora_a(h), with_bias=False)
            decode_kernels.rope_qkv_cache_write(y, st.cos, st.sin, st.pos, st.col, kc, vc, nH, nKV, bias=L.fqkv.b)
            q = y[:, : nH * D]
        else:
            cos, sin = cos_sin
            if fused_qkv:
                # q and k are adjacent columns of one GEMM output: one RoPE pass for both
                y = L.fqkv(h, L.qkv.lora_a(h))
                qk = self._rope(y[:, : (nH + nKV) * D].view(B, nH + nKV, D), cos, sin)
                q, k = qk[:, :nH], qk[:, nH:]
                v = y[:, (nH + nKV) * D:].view(B, nKV, 1, D)
            else:
                q, k, v = self._qkv(L, h, L.qkv.lora_a(h))
                q, k, v = q.view(B, nH, D), k.view(B, nKV, D), v.view(B, nKV, 1, D)
                if L.q_norm is not None:
                    q = self._rms(q, L.q_norm)
                    k = self._rms(k, L.k_norm)
                q = self._rope(q, cos, sin)
                k = self._rope(k, cos, sin)
            kc.index_copy_(2, st.col, k.unsqueeze(2))
            vc.index_copy_(2, st.col, v)
        if support is not None and support.attention:
            return decode_kernels.decode_attention(q.reshape(B, nH * D), kc, vc, st.bias, st.col, plan.scale,
                                                   block_n=block_n)
        # G query heads share one KV head and one mask: treat them as G queries of that head
        o = F.scaled_dot_product_attention(q.view(B, nKV, plan.group, D), kc, vc, attn_mask=st.bias, scale=plan.scale)
        return o.reshape(B, nH * D)

    def _triton_sampler(self, s: SamplingConfig) -> bool:
        """Whether sampling runs through :func:`decode_kernels.sample_tokens` (no top-k/top-p)."""
        return self._fused_glue and not self.greedy and s.top_k == 0 and s.top_p >= 1.0

    def _sample_and_advance(self, st: _State, logits: Tensor, gen) -> None:
        s = self._sampling
        if self._triton_sampler(s):
            # one read of the logits instead of ~8 passes over fp32 copies (0.2 ms at 64 rows), with
            # uniforms drawn in the kernel (Philox keyed by st.seed, counted by row and step)
            stops = st.stop_t if s.min_new_tokens > 0 else None  # only suppression reads them
            nxt, lp = decode_kernels.sample_tokens(logits, None, s.temperature, st.step, s.min_new_tokens, stops,
                                                   lse_after_suppression=self.sampler_logprobs, seed=st.seed)
            self._advance(st, nxt, lp if self.compute_logprobs else None)
            return
        x = logits.float()
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()
        x.div_(s.temperature)
        # The model's distribution at temperature T; sampler_logprobs replaces it by the filtered one.
        lse = torch.logsumexp(x, -1) if self.compute_logprobs and (self.greedy or not self.sampler_logprobs) else None
        if s.min_new_tokens > 0 and st.stop_t is not None:
            sub = x.index_select(1, st.stop_t)
            x.index_copy_(1, st.stop_t, torch.where(st.step < s.min_new_tokens, float("-inf"), sub))
        if self.greedy:
            nxt = x.argmax(-1)
        else:
            filtered = filter_logits(x, s.top_k, s.top_p)
            nxt = sample_from_filtered(filtered, gen)
            if self.sampler_logprobs:  # the distribution the token was drawn from
                x, lse = filtered, torch.logsumexp(filtered, -1)
        self._advance(st, nxt, x.gather(1, nxt[:, None])[:, 0] - lse if self.compute_logprobs else None)

    def _advance(self, st: _State, nxt: Tensor, lp: Optional[Tensor]) -> None:
        """Record the sampled tokens (PAD after a row's stop) and their log-probs; move one column on."""
        fin = st.finished
        nxt = torch.where(fin, self._pad, nxt)
        st.out.index_copy_(1, st.step, nxt[:, None])
        if lp is not None:
            st.lp.index_copy_(1, st.step, lp.masked_fill(fin, 0.0)[:, None])
        st.lengths.add_(~fin)
        if st.stop_t is not None:
            fin.logical_or_((nxt[:, None] == st.stop_t).any(1))
        st.cur_tok.copy_(nxt)
        st.step.add_(1)
        st.pos.add_(1)
        st.col.add_(1)

    def _capture(self, plan: _Plan, st: _State, gen) -> None:
        saved = [t.clone() for t in st.mutable()]
        side = _warmup_stream(plan.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS handles, lazy module state, allocator
                self._decode_step(plan, st, gen)
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(st.mutable(), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        if gen is not None:
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            self._decode_step(plan, st, gen)
        st.graph = graph
        self.num_captures += 1
        for t, s in zip(st.mutable(), saved):  # capture ran nothing, but be explicit
            t.copy_(s)


_WARMUP_STREAMS: dict = {}
_GLUE_WARNED: set = set()


def _warmup_stream(device: torch.device):
    """One side stream per device for pre-capture warm-ups (each new stream gets its own cuBLAS
    workspace, which torch keeps for the life of the process)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _WARMUP_STREAMS[idx]
