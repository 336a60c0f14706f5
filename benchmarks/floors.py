"""The card's floors, measured in the run that reports fractions against them.

Two figures bound every benchmark here from below:

* **copy bandwidth** (bytes/s): one large device-to-device ``dst.copy_(src)``; the bytes counted are
  those read plus those written (2 x the buffer), the same convention as the vendors' STREAM-copy
  figures. A step that must read ``n`` bytes from memory cannot take less than ``n / bandwidth``
  (the read alone is charged at the read + write rate: the copy is the fastest streaming access
  torch offers, and HBM serves reads and writes at about the same rate).
* **dense matmul rate** (FLOP/s): a square ``n x n @ n x n`` product, ``2 n^3`` FLOPs, in the dtype
  the caller's model computes in (default: bf16 on a GPU, fp32 on the CPU).

Both are the best of a few timed repeats after a warm-up (CUDA events on a GPU; ``perf_counter``
around synchronised calls on the CPU). Measuring them in each run (instead of a constant such as
the H100's 3.0 TB/s) keeps "fraction of floor" meaningful on whatever card ran the benchmark.

The helpers below turn counts into floors: :func:`decode_floor_ms` for one decode step (the roofline
``max(bytes / bandwidth, FLOPs / matmul rate)``), :func:`compute_floor_s` for FLOP-bound work,
:func:`decoder_counts` for the parameters and bytes a decode step reads, and
:func:`ppo_iteration_floor` for a whole PPO iteration.

    python benchmarks/floors.py            # prints the floors of this machine's GPU (or CPU)
"""

from __future__ import annotations

import json
import platform
import time
from typing import Callable, Optional

import torch

GiB = 2**30
# (bytes copied, matmul n): the copy must dwarf the caches (50 MB L2 on an H100/H200); the 8192^3 bf16
# product runs at the tensor cores' sustained rate. The CPU sizes keep the smoke tests to a second.
SIZES = {"cuda": (2 * GiB, 8192), "cpu": (128 * 2**20, 1024)}
# bitsandbytes nf4 with double quantization: 4 bits a weight, one 8-bit absmax per 64-weight block
# and one fp32 absmax per 256 blocks (bitsandbytes' Params4bit / QuantState layout).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int, inner: int) -> float:
    """Seconds per call of ``fn``: one warm-up call, then the best of ``repeats`` timings of ``inner`` calls."""
    fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            secs = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            secs = time.perf_counter() - t
        best = min(best, secs / inner)
    return best


def _copy_seconds(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # written: no untouched (zero) pages on the CPU
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), device, repeats, inner=1)


def _matmul_seconds(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty_like(a)
    # several products per timing on a GPU: one 8192^3 bf16 product is ~1.4 ms, close to the events' resolution
    return _best_seconds(lambda: torch.mm(a, b, out=c), device, repeats, inner=10 if device.type == "cuda" else 1)


def measure_floors(device, dtype: Optional[torch.dtype] = None, *, copy_bytes: Optional[int] = None,
                   matmul_n: Optional[int] = None, repeats: int = 5) -> dict:
    """Measure the copy bandwidth and the dense matmul rate of ``device``.

    Args:
        device: a ``torch.device`` or its name (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        dtype: the matmul's dtype; ``None``: bf16 on CUDA, fp32 on the CPU (the benchmarks' compute dtypes).
        copy_bytes: size of the copied buffer in bytes (default 2 GiB on CUDA, capped at a quarter of
            the free memory; 128 MiB on the CPU).
        matmul_n: side of the square matmul (default 8192 on CUDA, 1024 on the CPU).
        repeats: timed repeats after one warm-up; the best one is reported.

    Returns:
        ``{"device", "copy_bandwidth_Bps" (bytes read + written per second), "copy_bytes",
        "matmul_flops_per_s" (2 n^3 / seconds), "matmul_n", "matmul_dtype", "repeats", "method"}``.

    Raises:
        ValueError: a size or ``repeats`` below 1.
        RuntimeError: CUDA asked for but not available (from torch).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = dtype or (torch.bfloat16 if kind == "cuda" else torch.float32)
    if copy_bytes is None:
        copy_bytes = SIZES[kind][0]
        if kind == "cuda":  # src + dst and the matmul's operands must fit beside what the caller holds
            copy_bytes = min(copy_bytes, torch.cuda.mem_get_info(device)[0] // 4)
    matmul_n = SIZES[kind][1] if matmul_n is None else matmul_n
    if copy_bytes < 1 or matmul_n < 1 or repeats < 1:
        raise ValueError(f"copy_bytes, matmul_n and repeats must be >= 1, got {copy_bytes}, {matmul_n}, {repeats}")

    copy_s = _copy_seconds(device, copy_bytes, repeats)
    mm_s = _matmul_seconds(device, matmul_n, dtype, repeats)
    if kind == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": _device_name(device),
        "copy_bandwidth_Bps": 2 * copy_bytes / copy_s,
        "copy_bytes": copy_bytes,
        "matmul_flops_per_s": 2 * matmul_n**3 / mm_s,
        "matmul_n": matmul_n,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "method": ("copy: best of repeats of dst.copy_(src), bytes read + written; matmul: best of repeats of "
                   "torch.mm(n x n, n x n), 2 n^3 FLOPs; one warm-up each; "
                   + ("CUDA events" if kind == "cuda" else "perf_counter")),
    }


# ------------------------------------------------------------------------------------------------
# Counts -> floors (pure arithmetic)
# ------------------------------------------------------------------------------------------------
def kv_cache_bytes(batch: int, layers: int, kv_heads: int, head_dim: int, cache_len: float, dtype_bytes: int) -> float:
    """Bytes of keys and values one decode step attends over:
    ``batch x layers x 2 (K and V) x kv_heads x head_dim x cache_len x dtype_bytes``."""
    return batch * layers * 2 * kv_heads * head_dim * cache_len * dtype_bytes


def decode_bounds_ms(weight_bytes: float, kv_bytes: float, flops: float, floors: dict) -> tuple[float, float]:
    """(bandwidth bound, compute bound) of one decode step in milliseconds.

    bandwidth bound = ``(weight_bytes + kv_bytes) / copy_bandwidth_Bps``: a decode step reads every
    weight once and the KV cache it attends over; compute bound = ``flops / matmul_flops_per_s``
    (``flops`` ~ 2 x parameters read x batch: one multiply-add per weight per sequence). This is the
    roofline model (Williams, Waterman and Patterson, "Roofline", CACM 2009) with the measured figures.
    """
    return (1e3 * (weight_bytes + kv_bytes) / floors["copy_bandwidth_Bps"],
            1e3 * flops / floors["matmul_flops_per_s"])


def decode_floor_ms(weight_bytes: float, kv_bytes: float, flops: float, floors: dict) -> float:
    """The floor of one decode step in milliseconds: ``max`` of the two bounds of :func:`decode_bounds_ms`.

    Args: bytes of weights read, bytes of KV cache read, FLOPs of the step, and a :func:`measure_floors` dict.
    """
    return max(decode_bounds_ms(weight_bytes, kv_bytes, flops, floors))


def compute_floor_s(flops: float, floors: dict) -> float:
    """Seconds that ``flops`` floating-point operations take at the measured matmul rate at best."""
    return flops / floors["matmul_flops_per_s"]


def decoder_counts(model) -> dict:
    """Parameters and bytes one decode step of ``model`` reads: every parameter except the input
    embedding table (a row gather), the LM head and any LoRA factors included.

    Returns ``{"params": logical parameter count (a bitsandbytes 4-bit weight counts its unpacked
    shape), "weight_bytes": bytes as stored (4-bit weights with their quantization state)}``.
    """
    emb = model.get_input_embeddings().weight
    params, nbytes = 0, 0
    for p in model.parameters():
        if p is emb:
            continue
        nbytes += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is None:
            params += p.numel()
            continue
        params += int(torch.Size(qs.shape).numel())
        for t in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None)):
            if isinstance(t, torch.Tensor):
                nbytes += t.numel() * t.element_size()
    return {"params": params, "weight_bytes": nbytes}


def shape_counts(config, lora_r: int, lora_targets, dtype_bytes: int) -> dict:
    """:func:`decoder_counts` of a causal LM of ``config``'s shape with a LoRA of rank ``lora_r`` on the
    projections named in ``lora_targets``, counted on a meta-device model (no memory, no weights).

    LoRA adds ``r x (in + out)`` parameters per adapted projection, counted at ``dtype_bytes`` (the
    rollout engine reads copies in the compute dtype). ``weight_bytes["nf4"]`` stores the decoder
    layers' projection weights at :data:`NF4_BYTES_PER_PARAM`; the LM head, norms and biases stay at
    ``dtype_bytes``, as bitsandbytes loads them.

    Returns ``{"params", "lora_params", "dtype_bytes", "weight_bytes": {"bf16", "nf4"}}`` (params:
    every parameter but the input embedding, LoRA included).
    """
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = set(lora_targets)
    lora_params = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    emb = model.get_input_embeddings().weight
    projections = other = 0
    for name, p in model.named_parameters():
        if p is emb:
            continue
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            projections += p.numel()
        else:
            other += p.numel()
    rest = (other + lora_params) * dtype_bytes
    return {"params": projections + other + lora_params, "lora_params": lora_params, "dtype_bytes": dtype_bytes,
            "weight_bytes": {"bf16": projections * dtype_bytes + rest,
                             "nf4": projections * NF4_BYTES_PER_PARAM + rest}}


def ppo_iteration_floor(*, params: int, weight_bytes: float, batch: int, prompt_len: int, new_tokens: int,
                        layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, epochs: int,
                        recompute: bool, floors: dict, experience_forwards: int = 2) -> dict:
    """The compute floor of one PPO iteration of a LoRA policy, in seconds, by phase.

    Counted (the policy only; issue 20's accounting):

    * forward FLOPs per token = ``2 x params`` (``params``: every parameter but the input
      embedding: the decoder layers, the final norm, the LM head and the LoRA factors; attention's
      own ``O(sequence)`` FLOPs are left out, under 1% at 192 tokens);
    * experience: ``experience_forwards`` (2: the reference's and the policy + values') forwards over
      ``batch x (prompt_len + new_tokens)`` tokens;
    * update: per epoch, one forward and one input-gradient backward (~ one forward's FLOPs: the
      base weights are frozen, so no weight-gradient GEMMs; LoRA's are negligible), plus one more
      forward when activations are recomputed (gradient checkpointing);
    * prefill: a forward over ``batch x prompt_len`` tokens, or one read of the weights if longer;
    * decode: ``new_tokens - 1`` steps (the prefill samples the first token), each at
      :func:`decode_floor_ms` with ``batch`` rows, ``2 x params x batch`` FLOPs and a KV cache of the
      mean filled length over the steps, ``prompt_len + new_tokens / 2``.

    Left out: the reward model's forward and the optimizer (both well under 1% on the 7B workload).

    Returns ``{"forward_flops_per_token", "experience_s", "update_s", "prefill_s", "decode_s",
    "decode_step_ms", "total_s", ...the counts used}``.
    """
    fwd = 2.0 * params
    tokens = batch * (prompt_len + new_tokens)
    passes = 3 if recompute else 2
    kv = kv_cache_bytes(batch, layers, kv_heads, head_dim, prompt_len + new_tokens / 2, dtype_bytes)
    step_ms = decode_floor_ms(weight_bytes, kv, fwd * batch, floors)
    out = {
        "forward_flops_per_token": fwd,
        "tokens": tokens,
        "experience_s": compute_floor_s(experience_forwards * fwd * tokens, floors),
        "update_s": compute_floor_s(epochs * passes * fwd * tokens, floors),
        "prefill_s": max(compute_floor_s(fwd * batch * prompt_len, floors),
                         weight_bytes / floors["copy_bandwidth_Bps"]),
        "decode_step_ms": step_ms,
        "decode_s": (new_tokens - 1) * step_ms / 1e3,
        "params": params, "weight_bytes": weight_bytes, "kv_bytes_mean": kv, "recompute": recompute,
        "epochs": epochs, "experience_forwards": experience_forwards,
    }
    out["total_s"] = out["experience_s"] + out["update_s"] + out["prefill_s"] + out["decode_s"]
    return out


def describe(floors: dict) -> str:
    """One line: ``<device>: copy X GB/s (read + written), <dtype> matmul Y TFLOP/s``."""
    return (f"{floors['device']}: copy {floors['copy_bandwidth_Bps'] / 1e9:,.0f} GB/s (read + written, "
            f"{floors['copy_bytes'] / GiB:.3g} GiB buffer), {floors['matmul_dtype']} matmul "
            f"{floors['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (n = {floors['matmul_n']})")


if __name__ == "__main__":
    f = measure_floors("cuda" if torch.cuda.is_available() else "cpu")
    print(describe(f))
    print(json.dumps(f, indent=1))
