"""The decode step's glue as Triton kernels: RMSNorm, bias + RoPE + KV-cache write, attention over
the filled cache (or those two as one kernel), SiLU-and-mul, and sampling.

Why
---
At decode batch sizes a 7B step is the weight GEMMs plus ~500 small kernels. On an H200 the small
ones cost ~1.4 ms of a 5.4 ms batch-1 step (docs/results/decode_profile_2026-12-01_h200_*):
- ``torch.rms_norm`` takes 5.6 us a call, 57 calls a step;
- RoPE is three kernels (``x * cos``, ``roll``, ``addcmul``) and the cache write two ``index_copy_``;
- SiLU-and-mul is two kernels;
- masked SDPA reads all cache columns, filled or not;
- sampling makes ~8 passes over fp32 copies of the logits.

Each of these is latency-bound: the launch and one trip to memory set its time, not the bytes. Here
each group is one kernel, or two for the sampler. They are launched inside the captured graph like
any other kernel: the first call compiles, and the engine's warm-up steps make that call before the
capture. Figures: ``benchmarks/decode_kernels.py`` and docs/benchmarks.md.

One file as one idea: the kernels are built together on first use (:func:`_kernels`), and each
public function beside its kernel checks shapes and launches it.

Numerics follow the torch ops they replace, rounding where those round. The engine's tokens and
log-probs therefore do not depend on which path ran, beyond float-contraction differences:

* :func:`rms_norm`: ``torch.rms_norm``, ``x * rsqrt(mean(x^2) + eps) * w`` in fp32 with one rounding
  (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").
* :func:`rope_qkv_cache_write`: rotary embedding (Su et al. 2021, RoFormer) as the engine writes it,
  ``round(x * cos) + roll(x, D/2) * sin_signed``, on q and k; ``sin_signed`` has its first half
  negated, which is HF's ``rotate_half``. Then k and v are stored at one cache column.
* :func:`decode_attention`: ``softmax(q k^T * scale + bias) v`` with an online softmax, as SDPA with
  an additive mask.
* :func:`rope_attention`: the two above as one kernel (the rotated queries stay in registers), for
  fused q/k/v projections without q/k norms.
* :func:`silu_mul`: ``round(silu(g)) * u`` (SwiGLU, Shazeer 2020, "GLU Variants Improve
  Transformer"), as ``act(gate) * up`` computes it in two torch ops.
* :func:`sample_tokens`: the exponential race written as a Gumbel-max, over given uniforms (the
  same ``u`` draws the torch path's token) or over Philox uniforms the kernel computes from a seed.

Each function runs on CUDA tensors, or on CPU tensors through Triton's interpreter; CI uses the
interpreter to test them against the torch ops without a GPU (the interpreter rounds fp32 to bf16
towards zero, so bf16 results there differ from the GPU's by a bf16 step or two).
:func:`available` says whether Triton imports, :func:`self_test` whether the kernels compile and
run on a device. The kernel bodies are in :mod:`rlhf_lit.rollout.triton_kernels`.

Inputs are checked in :mod:`rlhf_lit.rollout.kernel_checks` (which also has
:func:`head_dim_support`, re-exported here), and a bad one raises :class:`ValueError` naming it.
Index values held in device tensors (positions, the cache column, the step) are range-checked too,
except while a CUDA graph is being captured, where reading them is not allowed: the engine's own
warm-up steps, run before the capture with the same tensors, are checked.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from rlhf_lit.rollout.kernel_checks import (
    _attention_launch, _cache, _index, _mask, _rope_inputs, _rows, _same_device, head_dim_support,
)

_TRUE = ("1", "true", "yes", "on", "y")  # what Triton's own knobs read as on
_SELF_TEST: dict = {}


def available() -> bool:
    """Triton imports (it ships with torch's CUDA builds; CPU builds need ``pip install triton``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is on: the kernels run on CPU tensors through Triton's interpreter (tests).

    Triton reads the variable when it is first imported, so it must be set before that."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _kernels(t: Tensor):
    """The jitted kernels (:func:`rlhf_lit.rollout.triton_kernels.build`).

    Raises:
        ValueError: ``t`` is not on CUDA and Triton is not interpreting, or ``TRITON_INTERPRET`` was
            set after Triton was imported (its kernels would not run on the CPU).
    """
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton decode kernels run on CUDA tensors, got {t.device}; on the CPU only "
                         "through Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    from rlhf_lit.rollout.triton_kernels import build

    K = build()
    if t.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(K.rms_norm, InterpretedFunction):
            raise ValueError("TRITON_INTERPRET was set after triton was imported (or after the kernels were "
                             "built): set it before anything imports triton")
    return K


def self_test(device: torch.device) -> Optional[str]:
    """Run every kernel once on small inputs on ``device``: ``None`` if they all compile and run,
    else the error, as text. The result is kept per device.

    The engine's ``kernels="auto"`` uses it to fall back to the torch ops rather than stop a run
    where Triton cannot build for the GPU. Its inputs are fixed ramps: it draws no random numbers,
    so a seeded run samples the same tokens whether or not the test ran before it."""
    key = str(device)
    if key not in _SELF_TEST:
        try:
            dt = torch.bfloat16 if device.type == "cuda" else torch.float32
            ramp = lambda *shape: torch.linspace(-1, 1, math.prod(shape), device=device).to(dt).view(*shape)  # noqa: E731
            x = ramp(2, 64)
            rms_norm(x, torch.ones(64, device=device, dtype=dt), 1e-6)
            silu_mul(x, x)
            y = ramp(2, 4 * 16)
            table = ramp(8, 16)
            cache = torch.zeros(2, 1, 16, 16, device=device, dtype=dt)
            pos = torch.zeros(2, dtype=torch.long, device=device)
            col = torch.zeros(1, dtype=torch.long, device=device)
            rope_qkv_cache_write(y, table, table, pos, col, cache, cache.clone(), 2, 1)
            mask = torch.zeros(2, 1, 1, 16, device=device, dtype=dt)
            decode_attention(y[:, :32], cache, cache.clone(), mask, col, 0.25)
            y32, table32 = ramp(2, 4 * 32), ramp(8, 32)
            cache32 = torch.zeros(2, 1, 16, 32, device=device, dtype=dt)
            rope_attention(y32, table32, table32, pos, col, cache32, cache32.clone(), mask, 0.25, 2, 1)
            sample_tokens(x, torch.full((2, 64), 0.5, device=device), 1.0, col, 0, None, False)
            sample_tokens(x, None, 1.0, col, 0, None, False, seed=col)
            _SELF_TEST[key] = None
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernels here
            _SELF_TEST[key] = f"{type(e).__name__}: {e}"
    return _SELF_TEST[key]


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row, one program per row.

    Args:
        x: ``(B, H)``, rows contiguous.
        weight: ``(H,)``, contiguous.
        eps: added to the mean square, a finite number >= 0.

    Returns:
        ``(B, H)`` in ``x``'s dtype: ``x * rsqrt(mean(x^2, -1) + eps) * weight`` in fp32, one rounding.

    Raises:
        ValueError: ``x`` is not 2-D with contiguous rows, ``weight`` is not a contiguous ``(H,)``,
            or ``eps`` is not a finite number >= 0.
    """
    _rows(x, "x")
    B, H = x.shape
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (H,) or weight.stride(0) != 1 \
            or not weight.is_floating_point():
        got = f"shape {tuple(weight.shape)} strides {weight.stride()}" if isinstance(weight, Tensor) else type(weight)
        raise ValueError(f"weight must be a contiguous floating-point ({H},) tensor for x of {H} columns, got {got}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _same_device(x, weight=weight)
    out = x.new_empty(B, H)
    if B == 0 or H == 0:
        return out
    K = _kernels(x)
    block = K.triton.next_power_of_2(H)
    K.rms_norm[(B,)](x, weight, out, x.stride(0), out.stride(0), H, float(eps), BLOCK=block,
                     num_warps=max(1, min(16, block // 256)))
    return out


def rope_qkv_cache_write(y: Tensor, cos: Tensor, sin_signed: Tensor, pos: Tensor, col: Tensor,
                         k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int,
                         bias: Optional[Tensor] = None) -> None:
    """Rotary embedding of q and k in one fused q/k/v projection output, and the KV-cache write.

    ``y`` holds, per row, ``n_heads`` query heads, then ``n_kv_heads`` key heads, then
    ``n_kv_heads`` value heads, each ``D`` wide. In place: the query heads of ``y`` are rotated;
    the rotated keys and the values are stored at column ``col`` of ``k_cache`` / ``v_cache``.

    Args:
        y: ``(B, (n_heads + 2 * n_kv_heads) * D)``, rows contiguous.
        cos: ``(T, D)`` table indexed by position, last dim contiguous.
        sin_signed: ``(T, D)``, the sine table with its first half negated, strided as ``cos``.
        pos: ``(B,)`` int64, each row's position, in [0, T).
        col: ``(1,)`` int64, the cache column, in [0, L), the same for every row.
        k_cache, v_cache: ``(B, n_kv_heads, L, D)``, equal strides and dtype, last dim contiguous.
        n_heads, n_kv_heads: query and key/value heads.
        bias: ``((n_heads + 2 * n_kv_heads) * D,)`` contiguous, added to ``y`` first (the projection's
            bias, when its GEMM ran without one: cuBLAS's bias epilogue picks slower kernels at decode
            sizes).

    Raises:
        ValueError: any shape, stride, dtype or device above not as described, ``D / 2`` not a power
            of two, or ``pos`` / ``col`` out of range.
    """
    B, half = _rope_inputs(y, cos, sin_signed, pos, col, k_cache, v_cache, n_heads, n_kv_heads, bias)
    if B == 0:
        return
    kernel = _kernels(y).rope_qkv_cache
    kernel[(B, n_heads + 2 * n_kv_heads)](
        y, y if bias is None else bias, cos, sin_signed, pos, col, k_cache, v_cache,
        y.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        N_Q=n_heads, N_KV=n_kv_heads, HALF=half, HAS_BIAS=bias is not None, num_warps=1 if half <= 64 else 2,
    )


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gating: ``round(silu(gate)) * up``, one kernel.

    Args:
        gate, up: ``(B, N)``, rows contiguous (row strides may differ), one dtype and device.

    Returns:
        ``(B, N)`` in ``gate``'s dtype.

    Raises:
        ValueError: shapes, dtypes or devices differ, or rows are not contiguous.
    """
    _rows(gate, "gate")
    _rows(up, "up")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    _same_device(gate, up=up)
    B, N = gate.shape
    out = gate.new_empty(B, N)
    if B == 0 or N == 0:
        return out
    K = _kernels(gate)
    block = 1024
    K.silu_mul[(B, K.triton.cdiv(N, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N,
                                             BLOCK=block, num_warps=4)
    return out


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, bias: Tensor, col: Tensor, scale: float,
                     block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> Tensor:
    """One decode step's attention over a static KV cache, grouped-query, online softmax.

    ``softmax(q k^T * scale + bias) v`` over the cache columns ``0 .. col`` (the columns after the
    one written this step are empty and skipped; ``bias`` masks padding), as
    ``F.scaled_dot_product_attention`` with an additive mask computes it, reading only filled
    columns (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; the
    FlashAttention decode loop, Dao et al. 2022).

    Args:
        q: ``(B, n_heads * D)``, rows contiguous (a row stride larger than ``n_heads * D`` is fine:
            the q columns of a fused q/k/v output), the caches' dtype.
        k_cache, v_cache: ``(B, n_kv_heads, L, D)``, equal strides and dtype, last dim contiguous;
            ``n_heads`` a multiple of ``n_kv_heads``.
        bias: ``(B, 1, 1, L)`` additive mask (0 or a large negative), last dim contiguous.
        col: ``(1,)`` int64, the last filled column, in [0, L).
        scale: multiplies ``q k^T``.
        block_n, num_warps, num_stages: cache columns per loop step, warps per program and software
            pipelining depth (on an H200, ``benchmarks/decode_kernels.py``: 4 warps and 2 stages were
            best of 18 settings; 64 columns at 512 rows, 128 at 1 and 64 rows, which the engine uses).

    Returns:
        ``(B, n_heads * D)`` in ``q``'s dtype; the ``G = n_heads / n_kv_heads`` query heads of KV head
        ``h`` are heads ``h * G .. h * G + G - 1``.

    Raises:
        ValueError: any shape, stride, dtype or device above not as described, ``D`` not a power
            of two of at least 16, or ``col`` out of range.
    """
    _rows(q, "q")
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4:
        raise ValueError("k_cache must be a (batch, KV heads, columns, head dim) tensor")
    B, nkv, L, D = k_cache.shape
    _cache(k_cache, v_cache, (q.shape[0], nkv, L, D))
    if nkv < 1 or not head_dim_support(D).attention or q.shape[1] % (nkv * D) or q.shape[1] == 0:
        raise ValueError(f"q of width {q.shape[1]} must be n_heads * D for a cache of {nkv} KV heads of D={D} "
                         "(n_heads a multiple of the KV heads; D a power of two >= 16)")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype}, the cache {k_cache.dtype}: they must match")
    _mask(bias, "bias", B, L)
    _same_device(q, k_cache=k_cache, v_cache=v_cache, bias=bias, col=col)
    _index(col, "col", 1, L, "the last filled cache column")
    scale = _attention_launch(scale, block_n, num_warps, num_stages)
    G = q.shape[1] // (nkv * D)
    out = q.new_empty(B, G * nkv * D)
    if B == 0:
        return out
    K = _kernels(q)
    K.decode_attention[(B, nkv)](
        q, k_cache, v_cache, bias, col, out,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bias.stride(0), out.stride(0),
        scale, L=L, G=G, G_PAD=max(16, K.triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
        FP32_DOT=q.device.type != "cuda" or q.dtype == torch.float32, DYNAMIC=q.device.type == "cuda",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def rope_attention(y: Tensor, cos: Tensor, sin_signed: Tensor, pos: Tensor, col: Tensor, k_cache: Tensor,
                   v_cache: Tensor, attn_bias: Tensor, scale: float, n_heads: int, n_kv_heads: int,
                   bias: Optional[Tensor] = None, block_n: int = 64, num_warps: int = 4,
                   num_stages: int = 2) -> Tensor:
    """:func:`rope_qkv_cache_write` and :func:`decode_attention` as one kernel: one launch, and the
    rotated queries stay in registers instead of going back to ``y``.

    Each program (one row, one KV head) adds the bias to its query heads, key head and value head,
    rotates the queries and the key (RoPE, the same roundings), stores the key and value at column
    ``col`` of the caches, then attends over columns ``0 .. col`` with an online softmax. The
    results equal the two kernels' up to the fp32 summation order of ``q k^T`` (computed as the sum
    of the two RoPE halves' products).

    Args:
        y, cos, sin_signed, pos, col, k_cache, v_cache, n_heads, n_kv_heads, bias: as for
            :func:`rope_qkv_cache_write` (``y`` is read, not written); ``D / 2 >= 16`` and the caches
            in ``y``'s dtype.
        attn_bias: ``(B, 1, 1, L)`` additive mask, as ``bias`` of :func:`decode_attention`.
        scale, block_n, num_warps, num_stages: as for :func:`decode_attention`.

    Returns:
        ``(B, n_heads * D)`` in ``y``'s dtype, :func:`decode_attention`'s layout.

    Raises:
        ValueError: any input not as the two functions describe, ``D / 2 < 16``, ``n_heads`` not a
            multiple of ``n_kv_heads``, or the caches' dtype not ``y``'s.
    """
    B, half = _rope_inputs(y, cos, sin_signed, pos, col, k_cache, v_cache, n_heads, n_kv_heads, bias)
    if not head_dim_support(2 * half).rope_attention:
        raise ValueError(f"rope_attention needs D / 2 >= 16, got D = {2 * half} (use rope_qkv_cache_write and "
                         "decode_attention)")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    if k_cache.dtype != y.dtype:
        raise ValueError(f"the caches ({k_cache.dtype}) must be in y's dtype ({y.dtype})")
    L = k_cache.shape[2]
    _mask(attn_bias, "attn_bias", B, L)
    _same_device(y, attn_bias=attn_bias)
    scale = _attention_launch(scale, block_n, num_warps, num_stages)
    G = n_heads // n_kv_heads
    out = y.new_empty(B, n_heads * 2 * half)
    if B == 0:
        return out
    K = _kernels(y)
    K.rope_attention[(B, n_kv_heads)](
        y, y if bias is None else bias, cos, sin_signed, pos, col, k_cache, v_cache, attn_bias, out,
        y.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), attn_bias.stride(0),
        out.stride(0), scale, L=L, G=G, G_PAD=max(16, K.triton.next_power_of_2(G)), N_Q=n_heads, N_KV=n_kv_heads,
        HALF=half, BLOCK_N=block_n, HAS_BIAS=bias is not None,
        FP32_DOT=y.device.type != "cuda" or y.dtype == torch.float32, DYNAMIC=y.device.type == "cuda",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


SAMPLE_CHUNK = 4096  # vocabulary entries per program of the sampler's first pass
SAMPLE_LANES = 256  # its columns per sub-block (four sub-blocks share one Philox call per lane)


def sample_tokens(logits: Tensor, u: Optional[Tensor], temperature: float, step: Tensor, min_new_tokens: int,
                  stop_ids: Optional[Tensor], lse_after_suppression: bool,
                  seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One token per row from ``softmax(logits / T)``, and its log-prob, in two kernels.

    The draw is the exponential race of :func:`~rlhf_lit.rollout.sampling.sample_from_filtered`
    written as a Gumbel-max (Gumbel 1954; Maddison et al. 2014, "A* Sampling"): ``argmax_i x_i -
    log(-log u_i)`` equals ``argmax_i p_i / E_i`` with ``E_i = -log u_i``, so the same ``u`` picks
    the same token. The uniforms come from ``u`` or, with ``seed``, from Philox4x32-10 (Salmon et al.
    2011, "Parallel random numbers: as easy as 1, 2, 3") computed in the kernel, so no ``(B, V)``
    tensor of uniforms is written and read: column ``i`` of row ``r`` at step ``s`` takes word
    ``(i mod 4Q) // Q`` of Philox with key ``(seed mod 2**32, seed // 2**32)`` and counter
    ``(Q * (i // 4Q) + i mod Q, r, s, 0)``, ``Q = SAMPLE_LANES``, as a float in [0, 1): the word read
    as an int32 ``w``, ``w`` if ``w >= 0`` else ``-w - 1``, times ``fp32(4.6566127342e-10)`` (2**-31;
    Triton's ``uint_to_uniform_float``). ``tests/test_decode_kernels.py`` has a NumPy reference.
    While ``step < min_new_tokens`` the stop ids cannot be drawn (``-inf``). The log-prob is
    ``x_tok - logsumexp(x)``, over the suppressed logits when ``lse_after_suppression`` (the
    distribution the token was drawn from) else over all of them. The first kernel reduces chunks of
    the vocabulary (max, sum of exp, best key) in one read of the logits (and ``u``); the second
    combines each row's chunks.

    The logits must be finite, which is not checked (it would read them on the host): a row with
    NaN or infinite entries gets a NaN log-prob. A row whose every token is suppressed gets token 0.

    Args:
        logits: ``(B, V)``, rows contiguous, floating point, ``V >= 1``.
        u: ``(B, V)`` float32 uniforms in [0, 1), rows contiguous; or ``None`` with ``seed``.
        temperature: ``T`` in [1e-30, 1e30] (``1 / T`` finite and non-zero in fp32, and ``x / T``
            finite for logits up to ~1e8).
        step: ``(1,)`` int64, the decode step (compared with ``min_new_tokens`` on the device),
            below 2**62; below 2**32 with ``seed`` (it is a Philox counter word).
        min_new_tokens: an integer in [-2**31, 2**31); stop ids are suppressed while ``step`` is
            below it.
        stop_ids: ``(S,)`` contiguous int64 token ids in [0, V), or ``None``.
        lse_after_suppression: a bool, see above.
        seed: ``(1,)`` int64 Philox key, >= 0, when ``u`` is ``None``.

    Returns:
        ``(tokens (B,) int64, logprobs (B,) float32)``.

    Raises:
        ValueError: any input above not as described, or both or neither of ``u`` and ``seed``.
    """
    _rows(logits, "logits")
    if (u is None) == (seed is None):
        raise ValueError("give the uniforms u or a Philox seed, not both and not neither")
    if u is not None:
        _rows(u, "u")
        if u.shape != logits.shape or u.dtype != torch.float32:
            raise ValueError(f"u must be float32 of the logits' shape {tuple(logits.shape)}, got {u.dtype} "
                             f"{tuple(u.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not 1e-30 <= temperature <= 1e30:
        raise ValueError(f"temperature must be a number in [1e-30, 1e30] (1 / T and x / T finite in float32), "
                         f"got {temperature!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
            or not -2 ** 31 <= min_new_tokens < 2 ** 31:
        raise ValueError(f"min_new_tokens must be an integer in [-2**31, 2**31), got {min_new_tokens!r}")
    if not isinstance(lse_after_suppression, bool):
        raise ValueError(f"lse_after_suppression must be a bool, got {lse_after_suppression!r}")
    if stop_ids is not None and not isinstance(stop_ids, Tensor):
        raise ValueError(f"stop_ids must be an int64 tensor or None, got {type(stop_ids).__name__}")
    B, V = logits.shape
    if V < 1:
        raise ValueError("logits must have at least one column (the vocabulary)")
    _same_device(logits, u=u, step=step, seed=seed, **({"stop_ids": stop_ids} if stop_ids is not None else {}))
    _index(step, "step", 1, 2 ** 62 if seed is None else 2 ** 32, "the decode step")
    if seed is not None:
        _index(seed, "seed", 1, 2 ** 63, "the Philox key")
    if stop_ids is not None:
        _index(stop_ids, "stop_ids", stop_ids.numel(), V, "token ids")
    n_stop = 0 if stop_ids is None or min_new_tokens <= 0 else int(stop_ids.numel())
    dev = logits.device
    if B == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.float32, device=dev)
    K = _kernels(logits)
    chunks = K.triton.cdiv(V, SAMPLE_CHUNK)
    m = torch.empty(B, chunks, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    key = torch.empty_like(m)
    idx = torch.empty(B, chunks, dtype=torch.int32, device=dev)
    K.sample_partials[(B, chunks)](
        logits, logits if u is None else u, step if seed is None else seed, stop_ids if n_stop else step, step,
        m, s, key, idx, logits.stride(0), 0 if u is None else u.stride(0), V, 1.0 / temperature,
        int(min_new_tokens), N_STOP=n_stop, CHUNKS=chunks, CHUNK=SAMPLE_CHUNK, Q=SAMPLE_LANES,
        LSE_SUPPRESSED=bool(lse_after_suppression), PHILOX=seed is not None, num_warps=4,
    )
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    K.sample_combine[(B,)](logits, m, s, key, idx, tokens, logprobs, logits.stride(0), 1.0 / temperature,
                           CHUNKS=chunks, C_PAD=K.triton.next_power_of_2(chunks), num_warps=1)
    return tokens, logprobs
