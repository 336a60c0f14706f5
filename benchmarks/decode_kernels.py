"""The decode step's Triton kernels against the torch ops they replace, at Qwen2.5-7B's shapes.

Each variant runs once per layer over 28 layers' own buffers (so weights-free inputs such as the KV
cache are not served from L2 across repeats), captured in one CUDA graph and replayed; the figure is
microseconds per layer. Batches 1, 64 and 512; cache of 192 columns with 128 filled (the middle of a
64 + 128-token rollout). The attention kernel is also swept over its block and launch settings, and
the fused ``rope_attention`` is timed against the RoPE kernel followed by the attention kernel. The
sampler row is the engine's (Philox uniforms drawn in the kernel); a second figure times it over
``torch.rand`` uniforms, as the engine sampled before.

    python benchmarks/decode_kernels.py --json out.json     # GPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_bound import graph_seconds  # noqa: E402

from rlhf_lit.rollout import decode_kernels as dk  # noqa: E402

H, I, NH, NKV, D, LAYERS, CACHE, FILLED, VOCAB = 3584, 18944, 28, 4, 128, 28, 192, 128, 152064


def per_layer_us(fns, device) -> float:
    return 1e6 * graph_seconds(lambda: [f() for f in fns], device, inner=3) / len(fns)


def bench(batch: int, device: torch.device, dt=torch.bfloat16) -> dict:
    g = torch.Generator(device="cpu").manual_seed(batch)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dt)  # noqa: E731
    col = torch.tensor([FILLED - 1], device=device)
    pos = torch.full((batch,), FILLED - 1, device=device)
    cos, sin = rnd(CACHE, D), rnd(CACHE, D)
    bias = torch.zeros(batch, 1, 1, CACHE, dtype=dt, device=device)
    bias[..., FILLED:] = torch.finfo(dt).min
    layers = []
    for _ in range(LAYERS):
        layers.append(dict(x=rnd(batch, H), w=rnd(H), y=rnd(batch, (NH + 2 * NKV) * D), qkv_b=rnd((NH + 2 * NKV) * D),
                           k=rnd(batch, NKV, CACHE, D), v=rnd(batch, NKV, CACHE, D), gu=rnd(batch, 2 * I)))
    out = {}

    def row(name, torch_fns, triton_fns):
        t, k = per_layer_us(torch_fns, device), per_layer_us(triton_fns, device)
        out[name] = {"torch_us": t, "triton_us": k}
        print(f"batch {batch:4d} {name:28s} torch {t:7.1f} us   triton {k:7.1f} us", flush=True)

    row("rms_norm", [lambda L=L: torch.rms_norm(L["x"], (H,), L["w"], 1e-6) for L in layers],
        [lambda L=L: dk.rms_norm(L["x"], L["w"], 1e-6) for L in layers])

    def torch_rope(L):
        y = L["y"] + L["qkv_b"]
        qk = y[:, : (NH + NKV) * D].view(batch, NH + NKV, D)
        c, s = cos.index_select(0, pos).unsqueeze(1), sin.index_select(0, pos).unsqueeze(1)
        r = torch.addcmul(qk * c, qk.roll(D // 2, -1), s)
        L["k"].index_copy_(2, col, r[:, NH:].unsqueeze(2))
        L["v"].index_copy_(2, col, y[:, (NH + NKV) * D:].view(batch, NKV, 1, D))
    row("bias + rope + cache write", [lambda L=L: torch_rope(L) for L in layers],
        [lambda L=L: dk.rope_qkv_cache_write(L["y"], cos, sin, pos, col, L["k"], L["v"], NH, NKV, bias=L["qkv_b"])
         for L in layers])
    row("silu_mul", [lambda L=L: F.silu(L["gu"][:, :I]) * L["gu"][:, I:] for L in layers],
        [lambda L=L: dk.silu_mul(L["gu"][:, :I], L["gu"][:, I:]) for L in layers])
    q = lambda L: L["y"][:, : NH * D]  # noqa: E731
    sdpa = [lambda L=L: F.scaled_dot_product_attention(q(L).view(batch, NKV, NH // NKV, D), L["k"], L["v"],
                                                       attn_mask=bias, scale=D ** -0.5) for L in layers]
    row("attention", sdpa, [lambda L=L: dk.decode_attention(q(L), L["k"], L["v"], bias, col, D ** -0.5)
                            for L in layers])
    sweep = {}
    for bn in (32, 64, 128):
        for nw in (4, 8):
            for ns in (1, 2, 3):
                us = per_layer_us([lambda L=L: dk.decode_attention(q(L), L["k"], L["v"], bias, col, D ** -0.5,
                                                                   block_n=bn, num_warps=nw, num_stages=ns)
                                   for L in layers], device)
                sweep[f"block_n={bn},num_warps={nw},num_stages={ns}"] = us
    best = min(sweep, key=sweep.get)
    print(f"batch {batch:4d} attention sweep: best {best} {sweep[best]:.1f} us; "
          + ", ".join(f"{k.replace('block_n=', 'n').replace('num_warps=', 'w').replace('num_stages=', 's')} "
                      f"{v:.1f}" for k, v in sweep.items()), flush=True)
    out["attention_sweep"] = sweep
    bn = 128 if batch <= 64 else 64  # the engine's choice

    def two_kernels(L):
        dk.rope_qkv_cache_write(L["y"], cos, sin, pos, col, L["k"], L["v"], NH, NKV, bias=L["qkv_b"])
        return dk.decode_attention(q(L), L["k"], L["v"], bias, col, D ** -0.5, block_n=bn)
    two = per_layer_us([lambda L=L: two_kernels(L) for L in layers], device)
    one = per_layer_us([lambda L=L: dk.rope_attention(L["y"], cos, sin, pos, col, L["k"], L["v"], bias, D ** -0.5, NH,
                                                      NKV, bias=L["qkv_b"], block_n=bn) for L in layers], device)
    out["rope_attention"] = {"two_kernels_us": two, "fused_us": one, "block_n": bn}
    print(f"batch {batch:4d} bias + rope + cache write + attention: two kernels {two:.1f} us, one kernel {one:.1f} us "
          f"(block_n {bn})", flush=True)
    logits = rnd(batch, VOCAB)
    u = torch.rand(batch, VOCAB, device=device)
    step = torch.zeros(1, dtype=torch.long, device=device)
    stops = torch.tensor([VOCAB - 5], device=device)

    def torch_sample():
        x = logits.float().div_(0.7)
        lse = torch.logsumexp(x, -1)
        tok = torch.argmin(torch.softmax(x, -1).div_(u.log()), -1)
        return x.gather(1, tok[:, None])[:, 0] - lse
    seed = torch.tensor([7], device=device)
    row("sampling (one step)", [torch_sample], [lambda: dk.sample_tokens(logits, None, 0.7, step, 0, stops, True,
                                                                        seed=seed)])
    given = per_layer_us([lambda: dk.sample_tokens(logits, torch.rand(batch, VOCAB, device=device), 0.7, step, 0,
                                                   stops, True)], device)
    out["sampling_given_uniforms_us"] = given
    print(f"batch {batch:4d} sampling over torch.rand uniforms (the earlier engine's): {given:.1f} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,512")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_kernels.py times CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "batches": {b: bench(int(b), device) for b in args.batches.split(",")}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
