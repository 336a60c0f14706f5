"""The decode step's Triton kernels against the torch ops they replace, and the engine with them.

Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py before triton is imported). The interpreter rounds fp32 to bf16 towards zero where the
GPU rounds to nearest, so bf16 checks on the CPU allow more bf16 steps than on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlhf_lit.rollout import decode_kernels as dk
from rlhf_lit.rollout.cuda_graph import StaticCudaGraphGenerate

from test_fast_rollout import PAD, fresh_logprobs, left_padded, no_tf32, sampling, tiny_lm  # noqa: F401 (fixture)

CUDA = torch.cuda.is_available()
# the kernels on CUDA are GPU tests (``-m gpu``); on the CPU they run through the interpreter
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


def _tol(dtype, device):
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    # bf16 steps: 1 on the GPU; on the CPU up to 4 (the interpreter truncates at each of up to three roundings)
    return dict(atol=2e-2, rtol=3.2e-2 if device == "cpu" else 8e-3)


def _rope_ref(x, cos, sin_signed):
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H", [200, 64])
def test_rms_norm_matches_torch(device, dtype, H):
    g = torch.Generator().manual_seed(H)
    x = (3 * torch.randn(5, H, generator=g)).to(device, dtype)
    w = torch.randn(H, generator=g).to(device, dtype)
    out = dk.rms_norm(x, w, 1e-6)
    ref = torch.rms_norm(x.double(), (H,), w.double(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, **_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rope_qkv_cache_write_rotates_q_in_place_and_fills_one_cache_column(device, dtype, with_bias):
    g = torch.Generator().manual_seed(1)
    B, nH, nKV, D, T, L = 3, 6, 2, 16, 40, 12
    y = torch.randn(B, (nH + 2 * nKV) * D, generator=g).to(device, dtype)
    bias = torch.randn((nH + 2 * nKV) * D, generator=g).to(device, dtype) if with_bias else None
    cos = torch.randn(T, D, generator=g).to(device, dtype)
    sin = torch.randn(T, D, generator=g).to(device, dtype)
    pos = torch.tensor([3, 17, 39], device=device)
    col = torch.tensor([7], device=device)
    kc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)  # poison: the other columns must not move
    vc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)
    kc0, vc0, y0 = kc.clone(), vc.clone(), y.clone()

    dk.rope_qkv_cache_write(y, cos, sin, pos, col, kc, vc, nH, nKV, bias=bias)

    heads = (y0 + bias if with_bias else y0).view(B, nH + 2 * nKV, D)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    ref_q = _rope_ref(heads[:, :nH], c, s)
    ref_k = _rope_ref(heads[:, nH:nH + nKV], c, s)
    tol = _tol(dtype, device)
    torch.testing.assert_close(y.view(B, nH + 2 * nKV, D)[:, :nH], ref_q, **tol)
    assert torch.equal(y[:, nH * D:], y0[:, nH * D:])  # the k and v columns of y are left as they were
    torch.testing.assert_close(kc[:, :, 7], ref_k, **tol)
    torch.testing.assert_close(vc[:, :, 7], heads[:, nH + nKV:], **tol)
    others = [i for i in range(L) if i != 7]
    assert torch.equal(kc[:, :, others], kc0[:, :, others]) and torch.equal(vc[:, :, others], vc0[:, :, others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch_on_strided_rows(device, dtype):
    g = torch.Generator().manual_seed(2)
    y = (4 * torch.randn(3, 2 * 1500, generator=g)).to(device, dtype)  # gate | up side by side
    gate, up = y[:, :1500], y[:, 1500:]
    out = dk.silu_mul(gate, up)
    ref = F.silu(gate.double()) * up.double()
    torch.testing.assert_close(out.double(), ref, **_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("col", [0, 70, 143])
def test_decode_attention_matches_sdpa_over_the_filled_columns(device, dtype, col):
    """Grouped-query heads, a padding mask, q as the strided columns of a fused q/k/v output, and
    cache columns past ``col`` full of garbage that must not be read."""
    g = torch.Generator().manual_seed(col)
    B, nH, nKV, D, L = 3, 6, 2, 16, 144
    y = torch.randn(B, (nH + 2 * nKV) * D, generator=g).to(device, dtype)
    q = y[:, : nH * D]
    kc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)
    vc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)
    kc[:, :, col + 1:] = float("nan")
    vc[:, :, col + 1:] = float("nan")
    neg = torch.finfo(dtype).min
    bias = torch.full((B, 1, 1, L), neg, dtype=dtype, device=device)
    bias[..., : col + 1] = 0.0
    bias[1, ..., : col // 2] = neg  # a left-padded row
    out = dk.decode_attention(q, kc, vc, bias, torch.tensor([col], device=device), 0.3)
    keep = slice(0, col + 1)
    ref = F.scaled_dot_product_attention(q.double().reshape(B, nKV, nH // nKV, D), kc[:, :, keep].double(),
                                         vc[:, :, keep].double(), attn_mask=bias[..., keep].double(), scale=0.3)
    assert out.shape == (B, nH * D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.reshape(B, nH * D), **_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("col,block_n", [(0, 64), (70, 128), (143, 64), (143, 16)])
def test_rope_attention_is_the_rope_kernel_then_attention(device, dtype, with_bias, col, block_n):
    """The fused kernel against the two it replaces: the same cache columns (bit for bit but for fp32
    FMA contraction on the GPU), ``y`` left as it was, and the attention output of the rotated
    queries (to the summation order) and of SDPA over the filled columns; G = 5 query heads per KV
    head (padded to 16 in the kernel)."""
    g = torch.Generator().manual_seed(col + block_n)
    B, nH, nKV, D, T, L = 3, 10, 2, 32, 150, 144
    y = torch.randn(B, (nH + 2 * nKV) * D, generator=g).to(device, dtype)
    bias = torch.randn((nH + 2 * nKV) * D, generator=g).to(device, dtype) if with_bias else None
    cos = torch.randn(T, D, generator=g).to(device, dtype)
    sin = torch.randn(T, D, generator=g).to(device, dtype)
    pos = torch.tensor([3, 149, col], device=device)
    c = torch.tensor([col], device=device)
    kc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)
    vc = torch.randn(B, nKV, L, D, generator=g).to(device, dtype)
    kc[:, :, col + 1:] = float("nan")  # past the written column: never read
    vc[:, :, col + 1:] = float("nan")
    neg = torch.finfo(dtype).min
    mask = torch.full((B, 1, 1, L), neg, dtype=dtype, device=device)
    mask[..., : col + 1] = 0.0
    mask[1, ..., : col // 2] = neg  # a left-padded row
    y0, kc2, vc2, y2 = y.clone(), kc.clone(), vc.clone(), y.clone()

    out = dk.rope_attention(y, cos, sin, pos, c, kc, vc, mask, 0.3, nH, nKV, bias=bias, block_n=block_n)
    dk.rope_qkv_cache_write(y2, cos, sin, pos, c, kc2, vc2, nH, nKV, bias=bias)
    two = dk.decode_attention(y2[:, : nH * D], kc2, vc2, mask, c, 0.3, block_n=block_n)

    assert torch.equal(y, y0)
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    if dtype == torch.float32 and device == "cuda":  # each kernel may contract x*cos + x'*sin into an FMA
        torch.testing.assert_close(kc.nan_to_num(7.0), kc2.nan_to_num(7.0), atol=1e-6, rtol=1e-6)
    else:  # bf16 rounds x*cos first in both, and the interpreter does not contract
        assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0))
    assert out.shape == (B, nH * D) and out.dtype == dtype
    torch.testing.assert_close(out.double(), two.double(), **_tol(dtype, device))
    keep = slice(0, col + 1)
    ref = F.scaled_dot_product_attention(y2[:, : nH * D].double().reshape(B, nKV, nH // nKV, D),
                                         kc2[:, :, keep].double(), vc2[:, :, keep].double(),
                                         attn_mask=mask[..., keep].double(), scale=0.3)
    torch.testing.assert_close(out.double(), ref.reshape(B, nH * D), **_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_new,after_suppression", [(0, False), (5, True), (5, False), (2, True)])
def test_sample_tokens_draws_the_exponential_race_token_with_its_logprob(device, dtype, min_new, after_suppression):
    """The same uniforms give the token of ``sample_from_filtered`` (argmin p / log u); stop ids are
    suppressed while step < min_new; the log-prob is over the suppressed or the full distribution."""
    from rlhf_lit.rollout.sampling import sample_from_filtered  # noqa: F401 - the reference's formula below

    g = torch.Generator().manual_seed(min_new + 10 * after_suppression)
    B, V, T = 4, 9000, 0.7  # V over two chunks of the first pass, the last one partial
    logits = (3 * torch.randn(B, V, generator=g)).to(device, dtype)
    stops = torch.tensor([5, 8191], device=device)
    logits[:, 5] = 40.0  # would always win if not suppressed
    u = torch.rand(B, V, generator=g).to(device)
    step = torch.tensor([2], device=device)
    tok, lp = dk.sample_tokens(logits, u, T, step, min_new, stops, after_suppression)
    x = logits.double() / T
    xs = x.clone()
    if min_new > 2:
        xs[:, stops] = float("-inf")
    ref = torch.argmin(torch.softmax(xs, -1) / u.double().log(), -1)
    assert torch.equal(tok, ref)
    assert (tok == 5).all() == (min_new <= 2)
    ref_lp = x.gather(1, ref[:, None])[:, 0] - torch.logsumexp(xs if after_suppression else x, -1)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-4, rtol=1e-5)


_M32 = 0xFFFFFFFF


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds (Salmon et al. 2011) on uint64 numpy arrays holding 32-bit words:
    an independent reference for the sampler's uniforms."""
    c = [np.asarray(x, dtype=np.uint64) & _M32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & _M32, p1 & _M32, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & _M32, p0 & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c


def test_philox_reference_gives_random123s_known_answers():
    """The reference against Random123's published test vectors (kat_vectors, philox4x32 10)."""
    for ctr, key, want in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((_M32,) * 4, (_M32, _M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        assert tuple(int(w) for w in _philox4x32_10(*ctr, *key)) == want


def _philox_uniforms(seed: int, step: int, B: int, V: int) -> torch.Tensor:
    """The uniforms ``sample_tokens(seed=...)`` documents, from the reference."""
    Q = dk.SAMPLE_LANES
    i = np.arange(V, dtype=np.uint64)
    ctr = np.uint64(Q) * (i // np.uint64(4 * Q)) + i % np.uint64(Q)
    word = ((i % np.uint64(4 * Q)) // np.uint64(Q)).astype(np.int64)
    u = np.empty((B, V), np.float32)
    for r in range(B):
        words = _philox4x32_10(ctr, r, step, 0, seed & _M32, seed >> 32)
        x = np.choose(word, words).astype(np.uint32).view(np.int32).astype(np.int64)
        x = np.where(x < 0, -x - 1, x)
        u[r] = x.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(u)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_tokens_with_a_seed_draws_with_the_documented_philox_uniforms(device):
    """Seed mode = u mode over the reference's uniforms: the same tokens and log-probs (V spans a
    partial last block and a second chunk; two stop ids suppressed)."""
    B, V, step, seed = 3, dk.SAMPLE_CHUNK + 1100, 5, (7 << 33) + 12345
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, V, generator=g)).to(device)
    stops = torch.tensor([4, V - 2], device=device)
    st = torch.tensor([step], device=device)
    u = _philox_uniforms(seed, step, B, V).to(device)
    a = dk.sample_tokens(logits, None, 0.7, st, 9, stops, True, seed=torch.tensor([seed], device=device))
    b = dk.sample_tokens(logits, u, 0.7, st, 9, stops, True)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    other = dk.sample_tokens(logits, None, 0.7, st, 9, stops, True, seed=torch.tensor([seed + 1], device=device))
    assert not torch.equal(other[0], a[0])  # another key, other draws (3 rows of 5196 columns)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_tokens_with_a_seed_draws_the_softmax(device):
    """Draws from softmax(x / T): Pearson's chi-square against the expected counts stays under its
    99.9% quantile (the seed is fixed, so the result is too). On the GPU 16,384 draws (4,096 rows x 4
    steps) over 8 tokens (7 degrees of freedom: 24.32); through the slow interpreter 192 draws over 4
    tokens (3: 16.27); the log-probs are the softmax's."""
    cuda = device == "cuda"
    x = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 2.5, -2.0, 1.5] if cuda else [0.0, 0.5, 1.0, 1.5], device=device)
    rows, steps, quantile = (4096, 4, 24.32) if cuda else (96, 2, 16.27)
    logits = x.repeat(rows, 1).contiguous()
    counts = torch.zeros(len(x))
    for step in range(steps):
        tok, lp = dk.sample_tokens(logits, None, 0.9, torch.tensor([step], device=device), 0, None, False,
                                   seed=torch.tensor([2024], device=device))
        counts += torch.bincount(tok.cpu(), minlength=len(x)).float()
        torch.testing.assert_close(lp.cpu(), torch.log_softmax(x.cpu() / 0.9, 0)[tok.cpu()], atol=1e-5, rtol=0)
    expected = counts.sum() * torch.softmax(x.cpu() / 0.9, 0)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < quantile, (chi2, counts.tolist(), expected.tolist())


def _rope_args(**over):
    """Valid arguments of rope_qkv_cache_write (B=2, 4 query heads, 1 KV head, D=16), with overrides."""
    args = dict(y=torch.randn(2, 96), cos=torch.randn(8, 16), sin_signed=torch.randn(8, 16),
                pos=torch.tensor([1, 7]), col=torch.tensor([3]), k_cache=torch.zeros(2, 1, 6, 16),
                v_cache=torch.zeros(2, 1, 6, 16), n_heads=4, n_kv_heads=1)
    args.update(over)
    return args


def _rope_attention_args(**over):
    """Valid arguments of rope_attention (B=2, 4 query heads, 2 KV heads, D=32), with overrides."""
    args = dict(y=torch.randn(2, 256), cos=torch.randn(8, 32), sin_signed=torch.randn(8, 32),
                pos=torch.tensor([1, 7]), col=torch.tensor([3]), k_cache=torch.zeros(2, 2, 6, 32),
                v_cache=torch.zeros(2, 2, 6, 32), attn_bias=torch.zeros(2, 1, 1, 6), scale=0.25, n_heads=4,
                n_kv_heads=2)
    args.update(over)
    return args


def _attention_args(**over):
    args = dict(q=torch.randn(2, 64), k_cache=torch.zeros(2, 1, 6, 16), v_cache=torch.zeros(2, 1, 6, 16),
                bias=torch.zeros(2, 1, 1, 6), col=torch.tensor([3]), scale=0.25)
    args.update(over)
    return args


@pytest.mark.parametrize("call,says", [
    (lambda: dk.rms_norm(torch.randn(4, 8).t(), torch.ones(4), 1e-6), "x must be a 2-D floating-point tensor with contiguous, non-overlapping rows"),
    (lambda: dk.rms_norm(torch.randn(4, 64), torch.ones(128)[::2], 1e-6), "weight must be a contiguous floating-point \\(64,\\)"),
    (lambda: dk.rms_norm(torch.randn(4, 64), torch.ones(32), 1e-6), "weight must be a contiguous floating-point \\(64,\\)"),
    (lambda: dk.rms_norm(torch.randn(4, 64), torch.ones(64), None), "eps must be a finite number >= 0, got None"),
    (lambda: dk.silu_mul(torch.randn(4, 8), torch.randn(4, 9)), "gate .* and up .* differ"),
    (lambda: dk.silu_mul(torch.randn(4, 8), torch.randn(4, 8).double()), "gate .* and up .* differ"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(y=torch.randn(2, 100))), "y of width 100 must be"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(k_cache=torch.zeros(2, 2, 6, 16), v_cache=torch.zeros(2, 2, 6, 16))),
     "k_cache must be a floating-point tensor of shape \\(2, 1, 6, 16\\)"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(k_cache=torch.zeros(1, 1, 6, 16))), "k_cache must be a floating-point tensor of shape"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(v_cache=torch.zeros(2, 1, 6, 32))), "v_cache must be a floating-point tensor of shape"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(cos=torch.randn(16), sin_signed=torch.randn(16))),
     "cos must be a floating-point \\(positions, head dim\\) table"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(cos=torch.randn(8, 32)[:, ::2], sin_signed=torch.randn(8, 32)[:, ::2])),
     "cos must be a floating-point \\(positions, head dim\\) table with a contiguous last dim"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(pos=torch.tensor([1, 8]))), "pos holds 1..8: .* must be in \\[0, 8\\)"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(pos=torch.tensor([1.0, 2.0]))), "pos must be a contiguous 1-D int64 tensor of 2"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(pos=torch.tensor([1]))), "pos must be a contiguous 1-D int64 tensor of 2"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(col=3)), "col must be a contiguous 1-D int64 tensor of 1 element"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(col=torch.tensor([6]))), "col holds 6..6: the cache column must be in"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(bias=torch.randn(192)[::2])), "bias must be a contiguous floating-point \\(96,\\)"),
    (lambda: dk.decode_attention(**_attention_args(col=torch.tensor([6]))), "col holds 6..6"),
    (lambda: dk.decode_attention(**_attention_args(v_cache=torch.zeros(2, 1, 5, 16))), "v_cache must be a floating-point tensor of shape"),
    (lambda: dk.decode_attention(**_attention_args(q=torch.randn(2, 64).double())), "q is torch.float64, the cache"),
    (lambda: dk.decode_attention(**_attention_args(q=torch.randn(2, 60))), "q of width 60 must be n_heads \\* D"),
    (lambda: dk.decode_attention(**_attention_args(bias=torch.zeros(2, 1, 1, 5))), "bias must be a floating-point additive mask .* of shape \\(2, 1, 1, 6\\)"),
    (lambda: dk.decode_attention(**_attention_args(k_cache=torch.zeros(2, 1, 6, 12), v_cache=torch.zeros(2, 1, 6, 12),
                                                   q=torch.randn(2, 48))), "D a power of two >= 16"),
    (lambda: dk.sample_tokens(torch.randn(4, 8), torch.rand(4, 8), 0.0, torch.zeros(1).long(), 0, None, False),
     "temperature must be a number in \\[1e-30, 1e30\\] .*got 0.0"),
    (lambda: dk.sample_tokens(torch.randn(4, 8), torch.rand(4, 8), float("inf"), torch.zeros(1).long(), 0, None, False),
     "temperature must be a number in \\[1e-30, 1e30\\] .*got inf"),
    (lambda: dk.sample_tokens(torch.randn(4, 8), torch.rand(4, 8).double(), 1.0, torch.zeros(1).long(), 0, None, False),
     "u must be float32"),
    (lambda: dk.sample_tokens(torch.randn(4, 8), torch.rand(4, 8), 1.0, 0, 0, None, False),
     "step must be a contiguous 1-D int64 tensor of 1 element"),
    (lambda: dk.sample_tokens(torch.randn(4, 0), torch.rand(4, 0), 1.0, torch.zeros(1).long(), 0, None, False),
     "at least one column"),
    (lambda: dk.sample_tokens(torch.randn(4, 8), torch.rand(4, 8), 1.0, torch.zeros(1).long(), 2, torch.tensor([9]), False),
     "stop_ids holds 9..9: token ids must be in \\[0, 8\\)"),
    # what a second trial found: strided index tensors (read as if contiguous), expanded caches,
    # integer data, nonsense launch settings and counts
    (lambda: dk.rope_qkv_cache_write(**_rope_args(pos=torch.tensor([5]).expand(2))), "pos must be a contiguous 1-D int64"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(pos=torch.tensor([1, 10 ** 9, 2, 10 ** 9])[::2])),
     "pos must be a contiguous 1-D int64"),
    (lambda: dk.sample_tokens(torch.randn(2, 100), torch.rand(2, 100), 1.0, torch.zeros(1).long(), 5,
                              torch.tensor([44, 99, 40, 99])[::2], False), "stop_ids must be a contiguous 1-D int64"),
    (lambda: dk.sample_tokens(torch.randn(2, 100), torch.rand(2, 100), 1.0, torch.zeros(1).long(), 5, [1, 2], False),
     "stop_ids must be an int64 tensor or None"),
    (lambda: dk.sample_tokens(torch.randn(2, 100), torch.rand(2, 100), 1.0, torch.zeros(1).long(), 2.5, None, False),
     "min_new_tokens must be an integer"),
    (lambda: dk.sample_tokens(torch.randn(2, 100), torch.rand(2, 100), 1e46, torch.zeros(1).long(), 0, None, False),
     "temperature must be a number in"),
    (lambda: dk.sample_tokens(torch.ones(2, 100, dtype=torch.bool), torch.rand(2, 100), 1.0, torch.zeros(1).long(), 0,
                              None, False), "logits must be a 2-D floating-point tensor"),
    (lambda: dk.rms_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8), 1e-6), "x must be a 2-D floating-point"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(k_cache=torch.zeros(1, 1, 6, 16).expand(2, 1, 6, 16))),
     "k_cache must be a floating-point tensor .* not expanded"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(y=torch.randn(1, 96).expand(2, 96))),
     "y must be a 2-D floating-point tensor with contiguous, non-overlapping rows"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(n_heads=-2, n_kv_heads=5)), "n_heads must be an integer >= 1"),
    (lambda: dk.rope_qkv_cache_write(**_rope_args(n_heads=4.0)), "n_heads must be an integer >= 1"),
    (lambda: dk.decode_attention(**_attention_args(scale=None)), "scale must be a number"),
    (lambda: dk.decode_attention(**_attention_args(scale=float("nan"))), "scale must be finite"),
    (lambda: dk.decode_attention(**_attention_args(), block_n=-64), "block_n must be an integer >= 16"),
    (lambda: dk.decode_attention(**_attention_args(), block_n=48), "block_n must be a power of two"),
    (lambda: dk.decode_attention(**_attention_args(), num_warps=3), "num_warps must be one of 1, 2, 4, 8, 16"),
    (lambda: dk.decode_attention(**_attention_args(k_cache=torch.zeros(2, 0, 6, 16), v_cache=torch.zeros(2, 0, 6, 16))),
     "q of width 64 must be n_heads"),
    (lambda: dk.rope_attention(**_rope_attention_args(n_heads=3, y=torch.randn(2, 224))), "n_heads \\(3\\) must be a multiple of n_kv_heads \\(2\\)"),
    (lambda: dk.rope_attention(**_rope_args(attn_bias=torch.zeros(2, 1, 1, 6), scale=0.25)), "needs D / 2 >= 16, got D = 16"),
    (lambda: dk.rope_attention(**_rope_attention_args(k_cache=torch.zeros(2, 2, 6, 32).double(),
                                                      v_cache=torch.zeros(2, 2, 6, 32).double())), "the caches \\(torch.float64\\) must be in y's dtype"),
    (lambda: dk.rope_attention(**_rope_attention_args(attn_bias=torch.zeros(2, 1, 6))), "attn_bias must be a floating-point additive mask .* of shape \\(2, 1, 1, 6\\)"),
    (lambda: dk.rope_attention(**_rope_attention_args(pos=torch.tensor([1, 8]))), "pos holds 1..8"),
    (lambda: dk.rope_attention(**_rope_attention_args(col=torch.tensor([6]))), "col holds 6..6"),
    (lambda: dk.rope_attention(**_rope_attention_args(block_n=48)), "block_n must be a power of two"),
    (lambda: dk.rope_attention(**_rope_attention_args(scale=float("nan"))), "scale must be finite"),
    (lambda: dk.rope_attention(**_rope_attention_args(y=torch.randn(2, 192))), "y of width 192 must be"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), torch.rand(2, 8), 1.0, torch.zeros(1).long(), 0, None, False,
                              seed=torch.zeros(1).long()), "give the uniforms u or a Philox seed, not both"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, None, False), "not neither"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, None, False,
                              seed=torch.tensor([-1])), "seed holds -1..-1"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, None, False,
                              seed=torch.tensor([1.0])), "seed must be a contiguous 1-D int64"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.tensor([2 ** 32]), 0, None, False,
                              seed=torch.tensor([1])), "step holds 4294967296"),
    # found by a second new-user trial (the Philox sampler)
    (lambda: dk.sample_tokens(torch.tensor([[-1.0, 0.5, 3.0, 2.0]]), None, 1e-39, torch.zeros(1).long(), 0, None, False,
                              seed=torch.tensor([1])), "temperature must be a number in \\[1e-30, 1e30\\]"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, None, "False",
                              seed=torch.tensor([1])), "lse_after_suppression must be a bool, got 'False'"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 2 ** 64, None, False,
                              seed=torch.tensor([1])), "min_new_tokens must be an integer in"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, torch.tensor([99]), False,
                              seed=torch.tensor([1])), "stop_ids holds 99..99: token ids must be in \\[0, 8\\)"),
    (lambda: dk.sample_tokens(torch.randn(2, 8), None, 1.0, torch.zeros(1).long(), 0, torch.tensor([1.5]), False,
                              seed=torch.tensor([1])), "stop_ids must be a contiguous 1-D int64"),
    # found by a new-user trial: inputs that got through and gave wrong results or unclear errors
    (lambda: dk.rope_attention(**_rope_attention_args(attn_bias=torch.ones(2, 1, 1, 6, dtype=torch.bool))),
     "attn_bias must be a floating-point additive mask"),
    (lambda: dk.decode_attention(**_attention_args(bias=torch.zeros(2, 1, 1, 6, dtype=torch.long))),
     "bias must be a floating-point additive mask"),
    (lambda: dk.rope_attention(**_rope_attention_args(k_cache=(kv := torch.zeros(2, 2, 6, 32)), v_cache=kv)),
     "k_cache and v_cache share memory"),
    (lambda: dk.rope_attention(**_rope_attention_args(k_cache=torch.zeros(2, 2, 6, 32).as_strided((2, 2, 6, 32), (32, 32, 32, 1)),
                                                      v_cache=torch.zeros(2, 2, 6, 32).as_strided((2, 2, 6, 32), (32, 32, 32, 1)))),
     "k_cache's elements overlap in memory"),
    (lambda: dk.rope_attention(**_rope_attention_args(block_n=2 ** 40)), "block_n must be a power of two in 16..1024"),
    (lambda: dk.rope_attention(**_rope_attention_args(num_warps=True)), "num_warps must be one of"),
    (lambda: dk.rope_attention(**_rope_attention_args(num_warps=4.0)), "num_warps must be one of"),
    (lambda: dk.rope_attention(**_rope_attention_args(scale=1e300)), "not a finite float32"),
    (lambda: dk.rope_attention(**_rope_attention_args(cos=torch.ones(8, 32, dtype=torch.long))),
     "cos must be a floating-point"),
    (lambda: dk.rope_attention(**_rope_attention_args(sin_signed=torch.randn(8, 32).double())), "must have one dtype"),
    (lambda: dk.rope_attention(**_rope_attention_args(bias=torch.ones(256, dtype=torch.long))),
     "bias must be a contiguous floating-point"),
    (lambda: dk.rope_attention(**_rope_attention_args(pos=torch.tensor([[1], [7]]))), "pos must be a contiguous 1-D"),
    (lambda: dk.rope_attention(**_rope_attention_args(col=torch.tensor(3))), "col must be a contiguous 1-D"),
    (lambda: dk.rope_attention(**_rope_attention_args(y=torch.randn(2, 256).double())), "caches \\(torch.float32\\) must be in y's dtype"),
])
def test_bad_inputs_are_named(call, says):
    with pytest.raises(ValueError, match=says):
        call()


def test_sample_tokens_takes_the_whole_documented_ranges():
    """The largest seed, and a step past 2**32 with given uniforms (only Philox counts with it)."""
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    tok, _ = dk.sample_tokens(logits, None, 1.0, torch.zeros(1).long(), 0, None, False, seed=torch.tensor([2 ** 63 - 1]))
    assert tok.shape == (1,)
    tok, lp = dk.sample_tokens(logits, torch.full((1, 3), 0.5), 1.0, torch.tensor([2 ** 40]), 0, None, False)
    assert int(tok) == 1 and float(lp) == pytest.approx(float(torch.log_softmax(logits, 1)[0, 1]), abs=1e-6)


def test_empty_batches_return_empty_results():
    assert dk.rms_norm(torch.randn(0, 8), torch.ones(8), 1e-6).shape == (0, 8)
    assert dk.silu_mul(torch.randn(0, 8), torch.randn(0, 8)).shape == (0, 8)
    assert dk.decode_attention(**_attention_args(q=torch.randn(0, 64), k_cache=torch.zeros(0, 1, 6, 16),
                                                 v_cache=torch.zeros(0, 1, 6, 16), bias=torch.zeros(0, 1, 1, 6))).shape \
        == (0, 64)
    dk.rope_qkv_cache_write(**_rope_args(y=torch.randn(0, 96), pos=torch.zeros(0, dtype=torch.long),
                                         k_cache=torch.zeros(0, 1, 6, 16), v_cache=torch.zeros(0, 1, 6, 16)))
    tok, lp = dk.sample_tokens(torch.randn(0, 8), torch.rand(0, 8), 1.0, torch.zeros(1).long(), 0, None, False)
    assert tok.shape == lp.shape == (0,)
    assert dk.rope_attention(**_rope_attention_args(y=torch.randn(0, 256), pos=torch.zeros(0, dtype=torch.long),
                                                    k_cache=torch.zeros(0, 2, 6, 32), v_cache=torch.zeros(0, 2, 6, 32),
                                                    attn_bias=torch.zeros(0, 1, 1, 6))).shape == (0, 128)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="run on CUDA tensors, got cpu"):
        dk.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    model = tiny_lm(seed=3)
    ids, mask = left_padded([3, 5], 5, 128)
    with pytest.raises(ValueError, match="kernels='triton' runs on CUDA"):
        StaticCudaGraphGenerate(greedy=True, kernels="triton").generate(model, ids, mask, sampling(2), [], PAD)
    with pytest.raises(ValueError, match="kernels must be"):
        StaticCudaGraphGenerate(kernels="cuda")
    for bad in (-1, "64", None, True, 1.5):
        with pytest.raises(ValueError, match="gate_up_rows must be an integer >= 0"):
            StaticCudaGraphGenerate(gate_up_rows=bad)


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("", False)])
def test_interpreter_switch_reads_what_triton_reads(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert dk.interpreting() is on


def test_auto_falls_back_to_the_torch_ops_with_a_warning_when_the_kernels_do_not_run(monkeypatch, caplog):
    """kernels="auto" asks decode_kernels.self_test; a failure there is a warning and the torch glue."""
    import rlhf_lit.rollout.cuda_graph as cg

    monkeypatch.setattr(dk, "_SELF_TEST", {})
    rng = torch.random.get_rng_state()
    assert dk.self_test(torch.device("cpu")) is None  # they do run here, through the interpreter
    # and it drew no random numbers: a seeded run that follows it samples what it would have
    assert torch.equal(torch.random.get_rng_state(), rng)
    monkeypatch.setattr(cg.decode_kernels, "self_test", lambda dev: "CompilationError: no sm_42 backend")
    monkeypatch.setattr(cg, "_GLUE_WARNED", set())
    with caplog.at_level("WARNING", logger="rlhf_lit.rollout.cuda_graph"):
        assert StaticCudaGraphGenerate._kernels_run(torch.device("cpu")) is False
        assert StaticCudaGraphGenerate._kernels_run(torch.device("cpu")) is False
    warned = [r.getMessage() for r in caplog.records if "decoding with the torch ops" in r.getMessage()]
    assert len(warned) == 1 and "no sm_42 backend" in warned[0]


def _count_kernel_calls(monkeypatch) -> dict:
    """Count the engine's calls of each decode kernel (the kernels still run)."""
    import rlhf_lit.rollout.cuda_graph as cg

    calls = {}
    for name in ("rms_norm", "rope_qkv_cache_write", "decode_attention", "rope_attention", "silu_mul", "sample_tokens"):
        real = getattr(dk, name)
        calls[name] = 0

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(cg.decode_kernels, name, counted)
    return calls


@pytest.mark.parametrize("lora,gate_up_rows,heads", [("fused", 0, 4), ("merged", 0, 4), ("merged", 8, 4),
                                                     ("fused", 0, 2), ("merged", 8, 2)])
def test_engine_with_triton_kernels_decodes_what_the_torch_path_decodes(lora, gate_up_rows, heads, monkeypatch):
    """fp32 on the CPU (interpreter): the same greedy tokens, log-probs to fp32 rounding; q/k/v
    biases non-zero (the fused path adds them in the RoPE kernel). Head dim 16 runs the RoPE and
    attention kernels one after the other; head dim 32, the fused ``rope_attention``."""
    model = tiny_lm("qwen2", seed=7, lora_b_std=0.1, heads=heads, kv=heads // 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.base_layer.bias"):
                p.normal_(0, 0.5)
    ids, mask = left_padded([5, 11, 8], 11, 128, seed=2)
    outs = {}
    calls = _count_kernel_calls(monkeypatch)
    for kernels in ("torch", "triton"):
        eng = StaticCudaGraphGenerate(greedy=True, compute_logprobs=True, lora=lora, kernels=kernels,
                                      gate_up_rows=gate_up_rows)
        outs[kernels] = (eng.generate(model, ids, mask, sampling(14), [], PAD), eng.last_logprobs)
        assert eng._fused_glue == (kernels == "triton")
        if kernels == "torch":
            assert not any(calls.values())
    steps, layers = 13, 2  # decode steps after the prompt pass's token; tiny_lm's layers
    fused = heads == 2
    assert calls == {"rms_norm": steps * (2 * layers + 1), "rope_qkv_cache_write": 0 if fused else steps * layers,
                     "decode_attention": 0 if fused else steps * layers, "rope_attention": steps * layers if fused else 0,
                     "silu_mul": steps * layers, "sample_tokens": 0}
    assert torch.equal(outs["torch"][0], outs["triton"][0])
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], atol=1e-5, rtol=0)


def test_engine_with_the_fused_sampler_is_seeded_and_its_logprobs_are_the_models(monkeypatch):
    """Seeded sampling with min_new_tokens suppressing two stop ids: the same seed draws the same
    tokens, another seed others; the log-probs are the model's at temperature T, over all tokens or,
    with ``sampler_logprobs``, over those the draw allowed. (The Triton sampler computes its own
    Philox uniforms, so it draws other tokens than the torch path.)"""
    model = tiny_lm("qwen2", seed=5)
    ids, mask = left_padded([5, 9, 3, 7], 10, 128)
    calls = _count_kernel_calls(monkeypatch)
    T, stops = 0.8, [7, 9]
    for sampler_logprobs in (False, True):
        def run(seed):
            eng = StaticCudaGraphGenerate(seed=seed, compute_logprobs=True, sampler_logprobs=sampler_logprobs,
                                          kernels="triton")
            out = eng.generate(model, ids, mask, sampling(6, min_new_tokens=6, temperature=T), stops, PAD)
            return out, eng.last_logprobs
        a, lp = run(11)
        if not sampler_logprobs:  # (the interpreter is slow: the seed checks once)
            b, c = run(11)[0], run(12)[0]
            assert torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.isin(a, torch.tensor(stops)).any()
        full = torch.cat([ids, a], 1)
        with torch.no_grad():
            full_mask = torch.cat([mask, torch.ones_like(a)], 1)
            logits = model(input_ids=full, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1] / T
        if sampler_logprobs:
            logits[..., stops] = float("-inf")
        ref = torch.log_softmax(logits.float(), -1).gather(-1, a[..., None])[..., 0]
        torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    assert calls["sample_tokens"] == 4 * 6  # the prompt pass's token and 5 decode steps, per run


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,lora,gate_up_rows,heads", [(torch.float32, "fused", 0, 4), (torch.bfloat16, "fused", 0, 4),
                                                           (torch.bfloat16, "merged", 4, 4), (torch.float32, "fused", 0, 2),
                                                           (torch.bfloat16, "merged", 4, 2)])
def test_graph_with_triton_kernels_on_gpu(dtype, lora, gate_up_rows, heads):
    """The captured graph with the Triton kernels against the torch path's graph: the same greedy
    tokens in fp32; in bf16 the log-probs of the torch path's tokens within bf16 rounding, and the
    kernels really ran (``auto`` picks them on CUDA). Head dim 32 (``heads=2``) runs ``rope_attention``."""
    model = tiny_lm("qwen2", seed=9, dtype=dtype, device="cuda", lora_b_std=0.1, heads=heads, kv=heads // 2)
    ids, mask = left_padded([5, 11, 8, 2], 11, 128, device="cuda", seed=3)
    torch_eng = StaticCudaGraphGenerate(greedy=True, compute_logprobs=True, lora=lora, kernels="torch")
    auto_eng = StaticCudaGraphGenerate(greedy=True, compute_logprobs=True, lora=lora, gate_up_rows=gate_up_rows)
    a = torch_eng.generate(model, ids, mask, sampling(24), [], PAD)
    b = auto_eng.generate(model, ids, mask, sampling(24), [], PAD)
    assert auto_eng._fused_glue and not torch_eng._fused_glue
    assert auto_eng.num_captures == 1
    if dtype == torch.float32:
        assert torch.equal(a, b)
        torch.testing.assert_close(auto_eng.last_logprobs, torch_eng.last_logprobs, atol=1e-4, rtol=0)
    else:
        same = (a == b).all(1)  # rows agree until a near-tie flips a token; most rows agree throughout
        assert same.float().mean() >= 0.5
        torch.testing.assert_close(auto_eng.last_logprobs[same], torch_eng.last_logprobs[same], atol=0.05, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_with_the_fused_sampler_on_gpu_is_seeded_and_its_logprobs_are_the_models(no_tf32):
    """In the captured graph (fp32 without TF32): the same seed draws the same tokens, another seed
    others, the stop ids are not drawn before min_new_tokens, and the log-probs are a fresh
    forward's (to ``test_gpu_logprobs_match_a_fresh_forward``'s 1e-3)."""
    model = tiny_lm("qwen2", seed=4, device="cuda")
    ids, mask = left_padded([5, 9, 3, 7], 10, 128, device="cuda")
    outs = {}
    for seed in (3, 3, 4):
        eng = StaticCudaGraphGenerate(seed=seed, compute_logprobs=True)
        out = eng.generate(model, ids, mask, sampling(20, min_new_tokens=20), [7, 9], PAD)
        assert eng._fused_glue and eng.num_captures == 1
        outs.setdefault(seed, []).append((out, eng.last_logprobs))
    (a, lp), (b, _) = outs[3]
    assert torch.equal(a, b) and not torch.equal(a, outs[4][0][0])
    assert not torch.isin(a, torch.tensor([7, 9], device="cuda")).any()
    torch.testing.assert_close(lp, fresh_logprobs(model, ids, mask, a, 1.0), atol=1e-3, rtol=0)
