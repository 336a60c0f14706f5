"""The Triton source of the decode step's kernels (:mod:`rlhf_lit.rollout.decode_kernels` checks
inputs, launches them and documents each; this file holds only the kernel bodies).

:func:`build` defines them on first use: importing this module never imports Triton. Triton picks
compiled or interpreted (``TRITON_INTERPRET``) when it is imported and when a kernel is defined,
so tests set the variable before either happens.
"""

from __future__ import annotations

from types import SimpleNamespace

_BUILT: list = []


def build() -> SimpleNamespace:
    """The jitted kernels and the ``triton`` module, defined once per process."""
    if _BUILT:
        return _BUILT[0]
    import triton
    import triton.language as tl

    # helpers shared by the kernels below (inlined by Triton)
    @triton.jit
    def _biased(x, b):
        # the projection's bias, rounded in as torch's ``y + b`` rounds
        return (x.to(tl.float32) + b.to(tl.float32)).to(x.dtype)

    @triton.jit
    def _rope_pair(x1, x2, c1, c2, s1, s2):
        # RoPE on the two halves, in fp32; ``round(x * cos)`` first, as the torch path's separate
        # multiply rounds it
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        o1 = (f1 * c1).to(x1.dtype).to(tl.float32) + f2 * s1
        o2 = (f2 * c2).to(x1.dtype).to(tl.float32) + f1 * s2
        return o1, o2

    @triton.jit
    def _softmax_step(s, nm, bias, m_i, l_i):
        # one block of an online softmax: scores s (queries, columns), nm the filled columns; returns
        # the block's weights, the rescale of what came before, and the new running max and sum
        s = tl.where(nm[None, :], s + bias[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    # Triton resolves a kernel's callees through the module's globals, not this closure
    globals().update(_biased=_biased, _rope_pair=_rope_pair, _softmax_step=_softmax_step)

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
        if HAS_BIAS:
            x1 = _biased(x1, tl.load(bias_ptr + h * (2 * HALF) + d))
            x2 = _biased(x2, tl.load(bias_ptr + h * (2 * HALF) + HALF + d))
        col = tl.load(col_ptr)
        if h < N_Q + N_KV:
            p = tl.load(pos_ptr + b)
            c1 = tl.load(cos_ptr + p * stride_t + d).to(tl.float32)
            c2 = tl.load(cos_ptr + p * stride_t + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + p * stride_t + d).to(tl.float32)
            s2 = tl.load(sin_ptr + p * stride_t + HALF + d).to(tl.float32)
            o1, o2 = _rope_pair(x1, x2, c1, c2, s1, s2)
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
                                FP32_DOT: tl.constexpr, DYNAMIC: tl.constexpr):
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
        # DYNAMIC: stop after the filled columns. Else (the interpreter, which cannot loop to a loaded
        # bound) the blocks past them are masked out whole, which changes nothing.
        for start in range(0, n_cols if DYNAMIC else L, BLOCK_N):
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
            p, alpha, m_new, l_i = _softmax_step(s, nm, bias, m_i, l_i)
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
    def rope_attention_kernel(y_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, col_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,
                              stride_y, stride_t, stride_cb, stride_ch, stride_cl, stride_mask, stride_ob, scale,
                              L: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, N_Q: tl.constexpr,
                              N_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                              FP32_DOT: tl.constexpr, DYNAMIC: tl.constexpr):
        # One program per (row, KV head): bias and RoPE on its G query heads (kept in registers) and
        # its key head, the key and value stored at the cache column, then attention over the filled
        # columns. Head vectors are handled as two halves, as RoPE pairs them.
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, G_PAD)
        gm = g < G
        d = tl.arange(0, HALF)
        p = tl.load(pos_ptr + b)
        c1 = tl.load(cos_ptr + p * stride_t + d).to(tl.float32)
        c2 = tl.load(cos_ptr + p * stride_t + HALF + d).to(tl.float32)
        s1 = tl.load(sin_ptr + p * stride_t + d).to(tl.float32)
        s2 = tl.load(sin_ptr + p * stride_t + HALF + d).to(tl.float32)
        row = y_ptr + b * stride_y
        qh = (h * G + g)[:, None] * (2 * HALF)
        x1 = tl.load(row + qh + d[None, :], mask=gm[:, None], other=0.0)
        x2 = tl.load(row + qh + HALF + d[None, :], mask=gm[:, None], other=0.0)
        kh = (N_Q + h) * (2 * HALF)
        vh = (N_Q + N_KV + h) * (2 * HALF)
        k1 = tl.load(row + kh + d)
        k2 = tl.load(row + kh + HALF + d)
        v1 = tl.load(row + vh + d)
        v2 = tl.load(row + vh + HALF + d)
        if HAS_BIAS:
            x1 = _biased(x1, tl.load(bias_ptr + qh + d[None, :], mask=gm[:, None], other=0.0))
            x2 = _biased(x2, tl.load(bias_ptr + qh + HALF + d[None, :], mask=gm[:, None], other=0.0))
            k1 = _biased(k1, tl.load(bias_ptr + kh + d))
            k2 = _biased(k2, tl.load(bias_ptr + kh + HALF + d))
            v1 = _biased(v1, tl.load(bias_ptr + vh + d))
            v2 = _biased(v2, tl.load(bias_ptr + vh + HALF + d))
        q1, q2 = _rope_pair(x1, x2, c1[None, :], c2[None, :], s1[None, :], s2[None, :])
        q1 = q1.to(k_ptr.dtype.element_ty)
        q2 = q2.to(k_ptr.dtype.element_ty)
        e1, e2 = _rope_pair(k1, k2, c1, c2, s1, s2)
        col = tl.load(col_ptr)
        kv = b * stride_cb + h * stride_ch
        tl.store(k_ptr + kv + col * stride_cl + d, e1.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + kv + col * stride_cl + HALF + d, e2.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + kv + col * stride_cl + d, v1.to(v_ptr.dtype.element_ty))
        tl.store(v_ptr + kv + col * stride_cl + HALF + d, v2.to(v_ptr.dtype.element_ty))
        tl.debug_barrier()  # the column just stored is read back below by other threads of this program
        if FP32_DOT:
            q1 = q1.to(tl.float32)
            q2 = q2.to(tl.float32)
        n_cols = col + 1
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
        acc1 = tl.zeros((G_PAD, HALF), tl.float32)
        acc2 = tl.zeros((G_PAD, HALF), tl.float32)
        for start in range(0, n_cols if DYNAMIC else L, BLOCK_N):  # DYNAMIC: as in decode_attention
            n = start + tl.arange(0, BLOCK_N)
            nm = n < n_cols
            ka = tl.load(k_ptr + kv + n[:, None] * stride_cl + d[None, :], mask=nm[:, None], other=0.0)
            kb = tl.load(k_ptr + kv + n[:, None] * stride_cl + HALF + d[None, :], mask=nm[:, None], other=0.0)
            if FP32_DOT:
                s = (tl.dot(q1, tl.trans(ka.to(tl.float32)), input_precision="ieee")
                     + tl.dot(q2, tl.trans(kb.to(tl.float32)), input_precision="ieee")) * scale
            else:
                s = (tl.dot(q1, tl.trans(ka)) + tl.dot(q2, tl.trans(kb))) * scale
            bias = tl.load(mask_ptr + b * stride_mask + n, mask=nm, other=0.0).to(tl.float32)
            pr, alpha, m_new, l_i = _softmax_step(s, nm, bias, m_i, l_i)
            va = tl.load(v_ptr + kv + n[:, None] * stride_cl + d[None, :], mask=nm[:, None], other=0.0)
            vb = tl.load(v_ptr + kv + n[:, None] * stride_cl + HALF + d[None, :], mask=nm[:, None], other=0.0)
            if FP32_DOT:
                acc1 = acc1 * alpha[:, None] + tl.dot(pr, va.to(tl.float32), input_precision="ieee")
                acc2 = acc2 * alpha[:, None] + tl.dot(pr, vb.to(tl.float32), input_precision="ieee")
            else:
                acc1 = acc1 * alpha[:, None] + tl.dot(pr.to(va.dtype), va)
                acc2 = acc2 * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
            m_i = m_new
        out = o_ptr + b * stride_ob + (h * G + g)[:, None] * (2 * HALF) + d[None, :]
        tl.store(out, (acc1 / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])
        tl.store(out + HALF, (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=gm[:, None])

    @triton.jit
    def sample_partials_kernel(logits_ptr, u_ptr, seed_ptr, stop_ptr, step_ptr, m_ptr, s_ptr, key_ptr, idx_ptr,
                               stride_l, stride_u, V, inv_t, min_new, N_STOP: tl.constexpr, CHUNKS: tl.constexpr,
                               CHUNK: tl.constexpr, Q: tl.constexpr, LSE_SUPPRESSED: tl.constexpr,
                               PHILOX: tl.constexpr):
        # One program per (row, chunk of the vocabulary): the chunk's running max and sum of exp (for
        # the log-normalizer) and its best exponential-race key with that key's index. The chunk is
        # read in blocks of 4 Q columns, as four sub-blocks of Q: with PHILOX, one Philox4x32-10 call
        # per lane gives the four sub-blocks' uniforms (counter: block start / 4 + lane, row, step, 0).
        row = tl.program_id(0)
        c = tl.program_id(1)
        step = tl.load(step_ptr)
        suppress = step < min_new
        t = tl.arange(0, Q)
        m_run = tl.full((Q,), float("-inf"), tl.float32)
        s_run = tl.zeros((Q,), tl.float32)
        best = tl.full((Q,), float("-inf"), tl.float32)
        best_i = tl.zeros((Q,), tl.int32)
        if PHILOX:
            seed = tl.load(seed_ptr)
            zero = tl.zeros((Q,), tl.uint32)
            c1 = zero + row.to(tl.uint32)
            c2 = zero + step.to(tl.uint32)
        for off in range(0, CHUNK, 4 * Q):
            base = c * CHUNK + off
            if PHILOX:
                r0, r1, r2, r3 = tl.philox(seed, (base // 4 + t).to(tl.uint32), c1, c2, zero)
            for j in tl.static_range(4):
                idx = base + j * Q + t
                msk = idx < V
                x = tl.load(logits_ptr + row * stride_l + idx, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
                xs = x
                for k in tl.static_range(N_STOP):
                    xs = tl.where(suppress & (idx == tl.load(stop_ptr + k)), float("-inf"), xs)
                if LSE_SUPPRESSED:
                    xl = xs
                else:
                    xl = x
                m_new = tl.maximum(m_run, xl)
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_run = s_run * tl.exp(m_run - safe) + tl.exp(xl - safe)
                m_run = m_new
                if PHILOX:
                    r = r0 if j == 0 else (r1 if j == 1 else (r2 if j == 2 else r3))
                    u = tl.random.uint_to_uniform_float(r)
                else:
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

    _BUILT.append(SimpleNamespace(triton=triton, rms_norm=rms_norm_kernel, rope_qkv_cache=rope_qkv_cache_kernel,
                                  silu_mul=silu_mul_kernel, decode_attention=decode_attention_kernel,
                                  rope_attention=rope_attention_kernel,
                                  sample_partials=sample_partials_kernel, sample_combine=sample_combine_kernel))
    return _BUILT[0]
