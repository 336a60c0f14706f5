"""The decode step's glue as Triton kernels: RMSNorm, bias + RoPE + KV-cache write, attention over
the filled cache, SiLU-and-mul, and sampling.

Why
---
At decode batch sizes a 7B step is the weight GEMMs plus ~500 small kernels. On an H200 the small
ones cost ~1.4 ms of a 5.4 ms batch-1 step (docs/results/decode_profile_2026-12-01_h200_*):
- ``torch.rms_norm`` takes 5.6 us per row, 57 times a step;
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
* :func:`silu_mul`: ``round(silu(g)) * u`` (SwiGLU, Shazeer 2020, "GLU Variants Improve
  Transformer"), as ``act(gate) * up`` computes it in two torch ops.
* :func:`sample_tokens`: the exponential race written as a Gumbel-max over the same uniforms. The
  same seed draws the same tokens.

Each function runs on CUDA tensors, or on CPU tensors through Triton's interpreter; CI uses the
interpreter to test them against the torch ops without a GPU. :func:`available` says whether Triton
imports.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import Tensor

_BUILT: list = []


def available() -> bool:
    """Triton imports (it ships with torch's CUDA builds; CPU builds need ``pip install triton``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: the kernels run on CPU tensors through Triton's interpreter (tests).

    Triton reads the variable when it is first imported, so it must be set before that."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels(t: Tensor):
    """The jitted kernels, built on first use.

    Raises:
        ValueError: ``t`` is not on CUDA and Triton is not interpreting.
    """
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton decode kernels run on CUDA tensors, got {t.device}; on the CPU only "
                         "through Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    if _BUILT:
        return _BUILT[0]
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def rope_qkv_cache_kernel(y_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, col_ptr, k_ptr, v_ptr,
                              stride_y, stride_t, stride_cb, stride_ch, stride_cl,
                              N_Q: tl.constexpr, N_KV: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        src = y_ptr + b * stride_y + h * (2 * HALF)
        x1 = tl.load(src + d)
        x2 = tl.load(src + HALF + d)
        if HAS_BIAS:  # the projection's bias, rounded in as torch's ``y + b`` rounds
            x1 = (x1.to(tl.float32) + tl.load(bias_ptr + h * (2 * HALF) + d).to(tl.float32)).to(x1.dtype)
            x2 = (x2.to(tl.float32) + tl.load(bias_ptr + h * (2 * HALF) + HALF + d).to(tl.float32)).to(x2.dtype)
        col = tl.load(col_ptr)
        if h < N_Q + N_KV:
            p = tl.load(pos_ptr + b)
            c1 = tl.load(cos_ptr + p * stride_t + d).to(tl.float32)
            c2 = tl.load(cos_ptr + p * stride_t + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + p * stride_t + d).to(tl.float32)
            s2 = tl.load(sin_ptr + p * stride_t + HALF + d).to(tl.float32)
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            # round(x * cos) first, as the torch path's separate multiply does
            o1 = (f1 * c1).to(x1.dtype).to(tl.float32) + f2 * s1
            o2 = (f2 * c2).to(x1.dtype).to(tl.float32) + f1 * s2
            if h < N_Q:
                tl.store(src + d, o1.to(x1.dtype))
                tl.store(src + HALF + d, o2.to(x1.dtype))
            else:
                dst = k_ptr + b * stride_cb + (h - N_Q) * stride_ch + col * stride_cl
                tl.store(dst + d, o1.to(k_ptr.dtype.element_ty))
                tl.store(dst + HALF + d, o2.to(k_ptr.dtype.element_ty))
        else:
            dst = v_ptr + b * stride_cb + (h - N_Q - N_KV) * stride_ch + col * stride_cl
            tl.store(dst + d, x1.to(v_ptr.dtype.element_ty))
            tl.store(dst + HALF + d, x2.to(v_ptr.dtype.element_ty))

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, stride_out, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + row * stride_g + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (s * u).to(out_ptr.dtype.element_ty), mask=m)


    @triton.jit
    def decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, col_ptr, o_ptr,
                                stride_qb, stride_cb, stride_ch, stride_cl, stride_bias, stride_ob, scale,
                                L: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                                FP32_DOT: tl.constexpr):
        # one program per (row, KV head): its G query heads against the filled cache columns
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        gm = g < G
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
        if FP32_DOT:  # fp32 models, and the interpreter (its bf16 dot products are wrong): fp32 products
            q = q.to(tl.float32)
        n_cols = tl.load(col_ptr) + 1  # columns past the one written this step are empty: masked, not read
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        kv = b * stride_cb + h * stride_ch
        for start in range(0, L, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nm = n < n_cols
            k = tl.load(k_ptr + kv + n[:, None] * stride_cl + d[None, :], mask=nm[:, None], other=0.0)
            if FP32_DOT:
                k = k.to(tl.float32)
            if FP32_DOT:  # fp32 operands: full precision, not Triton's default tf32
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            bias = tl.load(bias_ptr + b * stride_bias + n, mask=nm, other=0.0).to(tl.float32)
            s = tl.where(nm[None, :], s + bias[None, :], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv + n[:, None] * stride_cl + d[None, :], mask=nm[:, None], other=0.0)
            if FP32_DOT:
                v = v.to(tl.float32)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + (h * G + g)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None])

    @triton.jit
    def sample_partials_kernel(logits_ptr, u_ptr, stop_ptr, step_ptr, m_ptr, s_ptr, key_ptr, idx_ptr,
                               stride_l, stride_u, V, inv_t, min_new, N_STOP: tl.constexpr, CHUNKS: tl.constexpr,
                               CHUNK: tl.constexpr, BLOCK: tl.constexpr, LSE_SUPPRESSED: tl.constexpr):
        # one program per (row, chunk of the vocabulary): the chunk's running max and sum of exp (for the
        # log-normalizer) and its best exponential-race key with that key's index
        row = tl.program_id(0)
        c = tl.program_id(1)
        suppress = tl.load(step_ptr) < min_new
        m_run = tl.full((BLOCK,), float("-inf"), tl.float32)
        s_run = tl.zeros((BLOCK,), tl.float32)
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        best_i = tl.zeros((BLOCK,), tl.int32)
        for off in range(0, CHUNK, BLOCK):
            idx = c * CHUNK + off + tl.arange(0, BLOCK)
            msk = idx < V
            x = tl.load(logits_ptr + row * stride_l + idx, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
            xs = x
            for j in tl.static_range(N_STOP):
                xs = tl.where(suppress & (idx == tl.load(stop_ptr + j)), float("-inf"), xs)
            if LSE_SUPPRESSED:
                xl = xs
            else:
                xl = x
            m_new = tl.maximum(m_run, xl)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp(m_run - safe) + tl.exp(xl - safe)
            m_run = m_new
            u = tl.load(u_ptr + row * stride_u + idx, mask=msk, other=0.5)
            key = tl.where(msk, xs - tl.log(-tl.log(u)), float("-inf"))
            better = key > best
            best = tl.where(better, key, best)
            best_i = tl.where(better, idx, best_i)
        m = tl.max(m_run, 0)
        safe_m = tl.where(m == float("-inf"), 0.0, m)
        out = row * CHUNKS + c
        tl.store(m_ptr + out, m)
        tl.store(s_ptr + out, tl.sum(s_run * tl.exp(m_run - safe_m), 0))
        k = tl.max(best, 0)
        tl.store(key_ptr + out, k)
        tl.store(idx_ptr + out, tl.min(tl.where(best == k, best_i, 2147483647), 0))

    @triton.jit
    def sample_combine_kernel(logits_ptr, m_ptr, s_ptr, key_ptr, idx_ptr, tok_ptr, lp_ptr, stride_l, inv_t,
                              CHUNKS: tl.constexpr, C_PAD: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, C_PAD)
        cm = c < CHUNKS
        m = tl.load(m_ptr + row * CHUNKS + c, mask=cm, other=float("-inf"))
        s = tl.load(s_ptr + row * CHUNKS + c, mask=cm, other=0.0)
        key = tl.load(key_ptr + row * CHUNKS + c, mask=cm, other=float("-inf"))
        idx = tl.load(idx_ptr + row * CHUNKS + c, mask=cm, other=2147483647)
        mm = tl.max(m, 0)
        lse = mm + tl.log(tl.sum(tl.where(cm, s * tl.exp(m - mm), 0.0), 0))
        kmax = tl.max(key, 0)
        tok = tl.min(tl.where(key == kmax, idx, 2147483647), 0)
        x_tok = tl.load(logits_ptr + row * stride_l + tok).to(tl.float32) * inv_t
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(lp_ptr + row, x_tok - lse)

    _BUILT.append(SimpleNamespace(sample_partials=sample_partials_kernel, sample_combine=sample_combine_kernel,
                                  triton=triton, rms_norm=rms_norm_kernel, rope_qkv_cache=rope_qkv_cache_kernel,
                                  silu_mul=silu_mul_kernel, decode_attention=decode_attention_kernel))
    return _BUILT[0]


def _rows(x: Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row, one program per row.

    Args:
        x: ``(B, H)``, rows contiguous.
        weight: ``(H,)``.
        eps: added to the mean square.

    Returns:
        ``(B, H)`` in ``x``'s dtype: ``x * rsqrt(mean(x^2, -1) + eps) * weight`` in fp32, one rounding.

    Raises:
        ValueError: ``x`` is not 2-D with contiguous rows.
    """
    _rows(x, "x")
    K = _kernels(x)
    B, H = x.shape
    out = x.new_empty(B, H)
    block = K.triton.next_power_of_2(H)
    K.rms_norm[(B,)](x, weight, out, x.stride(0), out.stride(0), H, float(eps), BLOCK=block,
                     num_warps=max(1, min(16, block // 256)))
    return out


def rope_qkv_cache_write(y: Tensor, cos: Tensor, sin_signed: Tensor, pos: Tensor, col: Tensor,
                         k_cache: Tensor, v_cache: Tensor, n_heads: int, n_kv_heads: int,
                         bias: Tensor | None = None) -> None:
    """Rotary embedding of q and k in one fused q/k/v projection output, and the KV-cache write.

    ``y`` holds, per row, ``n_heads`` query heads, then ``n_kv_heads`` key heads, then
    ``n_kv_heads`` value heads, each ``D`` wide. In place: the query heads of ``y`` are rotated;
    the rotated keys and the values are stored at column ``col`` of ``k_cache`` / ``v_cache``.

    Args:
        y: ``(B, (n_heads + 2 * n_kv_heads) * D)``, rows contiguous.
        cos: ``(T, D)`` table indexed by position.
        sin_signed: ``(T, D)``, the sine table with its first half negated.
        pos: ``(B,)`` int64 position of each row's token.
        col: ``(1,)`` int64 cache column, the same for every row.
        k_cache, v_cache: ``(B, n_kv_heads, L, D)``, equal strides, last dim contiguous.
        n_heads, n_kv_heads: query and key/value heads.
        bias: ``((n_heads + 2 * n_kv_heads) * D,)``, added to ``y`` first (the projection's bias, when
            its GEMM ran without one: cuBLAS's bias epilogue picks slower kernels at decode sizes).

    Raises:
        ValueError: bad shapes, or ``D`` not an even power of two.
    """
    _rows(y, "y")
    B, width = y.shape
    D = cos.shape[-1]
    half = D // 2
    if width != (n_heads + 2 * n_kv_heads) * D or half < 1 or half & (half - 1):
        raise ValueError(f"y of width {width} is not (n_heads + 2 * n_kv_heads) * D with D={D} a power of two "
                         f"({n_heads} + 2 * {n_kv_heads} heads)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or cos.stride() != sin_signed.stride():
        raise ValueError("k_cache and v_cache need equal strides with a contiguous last dim; cos and sin too")
    kernel = _kernels(y).rope_qkv_cache
    if bias is not None and (bias.shape != (width,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous of shape ({width},), got {tuple(bias.shape)}")
    kernel[(B, n_heads + 2 * n_kv_heads)](
        y, y if bias is None else bias, cos, sin_signed, pos, col, k_cache, v_cache,
        y.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        N_Q=n_heads, N_KV=n_kv_heads, HALF=half, HAS_BIAS=bias is not None, num_warps=1 if half <= 64 else 2,
    )


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's gating: ``round(silu(gate)) * up``, one kernel.

    Args:
        gate, up: ``(B, N)``, rows contiguous (row strides may differ).

    Returns:
        ``(B, N)`` in ``gate``'s dtype.

    Raises:
        ValueError: shapes differ or rows are not contiguous.
    """
    _rows(gate, "gate")
    _rows(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    K = _kernels(gate)
    triton, kernel = K.triton, K.silu_mul
    B, N = gate.shape
    out = gate.new_empty(B, N)
    block = 1024
    kernel[(B, triton.cdiv(N, block))](gate, up, out, gate.stride(0), up.stride(0),
            out.stride(0), N, BLOCK=block, num_warps=4)
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
            the q columns of a fused q/k/v output).
        k_cache, v_cache: ``(B, n_kv_heads, L, D)``, equal strides, last dim contiguous.
        bias: ``(B, 1, 1, L)`` additive mask (0 or a large negative), last dim contiguous.
        col: ``(1,)`` int64, the last filled column.
        scale: multiplies ``q k^T``.
        block_n, num_warps, num_stages: cache columns per loop step, warps per program and software
            pipelining depth (the defaults were the best of 18 settings on an H200 at 64 and 512 rows,
            ``benchmarks/decode_kernels.py``).

    Returns:
        ``(B, n_heads * D)`` in ``q``'s dtype; the ``G = n_heads / n_kv_heads`` query heads of KV head
        ``h`` are heads ``h * G .. h * G + G - 1``.

    Raises:
        ValueError: bad shapes or strides, or ``D`` not a power of two of at least 16.
    """
    _rows(q, "q")
    B, nkv, L, D = k_cache.shape
    if q.shape[0] != B or q.shape[1] % (nkv * D) or D < 16 or D & (D - 1):
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {nkv} KV heads of D={D} "
                         "(D a power of two >= 16)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or bias.shape != (B, 1, 1, L) \
            or bias.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need equal strides with a contiguous last dim, and bias the "
                         f"shape ({B}, 1, 1, {L}); got bias {tuple(bias.shape)}")
    K = _kernels(q)
    G = q.shape[1] // (nkv * D)
    out = q.new_empty(B, G * nkv * D)
    K.decode_attention[(B, nkv)](
        q, k_cache, v_cache, bias, col, out,
        q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bias.stride(0), out.stride(0),
        float(scale), L=L, G=G, G_PAD=max(16, K.triton.next_power_of_2(G)), D=D, BLOCK_N=block_n,
        FP32_DOT=q.device.type != "cuda" or q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return out


SAMPLE_CHUNK = 4096  # vocabulary entries per program of the sampler's first pass


def sample_tokens(logits: Tensor, u: Tensor, temperature: float, step: Tensor, min_new_tokens: int,
                  stop_ids: Tensor | None, lse_after_suppression: bool) -> tuple[Tensor, Tensor]:
    """One token per row from ``softmax(logits / T)``, and its log-prob, in two kernels.

    The draw is the exponential race of :func:`~rlhf_lit.rollout.sampling.sample_from_filtered`
    written as a Gumbel-max (Gumbel 1954; Maddison et al. 2014, "A* Sampling"): ``argmax_i x_i -
    log(-log u_i)`` equals ``argmax_i p_i / E_i`` with ``E_i = -log u_i``, so the same ``u`` picks
    the same token. While ``step < min_new_tokens`` the stop ids cannot be drawn (``-inf``). The
    log-prob is ``x_tok - logsumexp(x)``, over the suppressed logits when
    ``lse_after_suppression`` (the distribution the token was drawn from) else over all of them.
    The first kernel reduces chunks of the vocabulary (max, sum of exp, best key) in one read of the
    logits and ``u``; the second combines each row's chunks.

    Args:
        logits: ``(B, V)``, rows contiguous, any float dtype.
        u: ``(B, V)`` float32 uniforms in [0, 1).
        temperature: ``T > 0``.
        step: ``(1,)`` int64, the decode step (compared with ``min_new_tokens`` on the device).
        min_new_tokens: stop ids are suppressed while ``step`` is below it.
        stop_ids: ``(S,)`` int64 or ``None``.
        lse_after_suppression: see above.

    Returns:
        ``(tokens (B,) int64, logprobs (B,) float32)``.

    Raises:
        ValueError: shapes differ, rows are not contiguous, or ``temperature <= 0``.
    """
    _rows(logits, "logits")
    _rows(u, "u")
    if u.shape != logits.shape or u.dtype != torch.float32 or not temperature > 0:
        raise ValueError(f"u must be float32 of the logits' shape {tuple(logits.shape)} (got {u.dtype} "
                         f"{tuple(u.shape)}) and the temperature > 0 (got {temperature})")
    K = _kernels(logits)
    B, V = logits.shape
    chunks = K.triton.cdiv(V, SAMPLE_CHUNK)
    dev = logits.device
    m = torch.empty(B, chunks, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    key = torch.empty_like(m)
    idx = torch.empty(B, chunks, dtype=torch.int32, device=dev)
    n_stop = 0 if stop_ids is None or min_new_tokens <= 0 else int(stop_ids.numel())
    K.sample_partials[(B, chunks)](
        logits, u, stop_ids if n_stop else step, step, m, s, key, idx, logits.stride(0), u.stride(0), V,
        1.0 / temperature, int(min_new_tokens), N_STOP=n_stop, CHUNKS=chunks, CHUNK=SAMPLE_CHUNK, BLOCK=1024,
        LSE_SUPPRESSED=bool(lse_after_suppression), num_warps=4,
    )
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    K.sample_combine[(B,)](logits, m, s, key, idx, tokens, logprobs, logits.stride(0), 1.0 / temperature,
                           CHUNKS=chunks, C_PAD=K.triton.next_power_of_2(chunks), num_warps=1)
    return tokens, logprobs
