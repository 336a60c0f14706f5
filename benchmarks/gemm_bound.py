"""The PPO iteration's weight GEMMs alone, timed through cuBLAS at the model's own shapes.

``floors.py`` bounds an iteration by its FLOPs at the card's best matmul rate (an 8192^3 product).
The model's GEMMs are smaller and oddly shaped (3,584 x 512 for k and v, 152,064 rows for the LM
head), and run slower than that. This script times every weight GEMM one PPO iteration of
``benchmarks/ppo_iteration.py``'s workload runs (Qwen2.5-7B's shape; 64 prompts x 64 tokens, 128 new
tokens; 4 epochs x 4 minibatches of 16 rows; gradient checkpointing) with ``torch.nn.functional.linear``
(forward, ``x W^T``) and ``torch.mm`` (input gradient, ``dY W``) on random bf16 data, and sums them:

* experience: the policy's and the reference's forwards over 64 x 192 tokens, 32 rows per forward
  (``UpdateStep.no_grad_micro_batch``); the LM head over the 64 x 128 response positions;
* update, per optimizer step (16 of them): the forward, its recomputation (``--no-recompute``: none)
  and the input-gradient backward over 16 x 192 tokens; the head forward and backward over 16 x 128;
* rollout: the prompt pass (64 x 64 tokens) and 127 decode steps of 64 rows (every weight GEMM at
  M = 64; the head at 64 rows).

Left out, so the sum is a lower bound on the iteration: LoRA's GEMMs, attention, norms, activations,
sampling, the reward, the optimizer and every launch gap. The base weights are frozen, so there are
no weight-gradient GEMMs. If this sum alone is over a time target, no change outside the GEMM
kernels themselves (or a smaller workload) meets that target. Each shape is timed as CUDA-graph
replays (decode-size GEMMs are shorter than their host launches).

On CUDA it also times the decode step's GEMMs (M = 1 and 64) in the layouts the engine could keep
a merged weight in (``decode_layouts``).

    python benchmarks/gemm_bound.py --json out.json     # GPU: ~1 min
    python benchmarks/gemm_bound.py --tiny               # smoke test, CPU is fine
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floors import _best_seconds, describe, measure_floors  # noqa: E402

QWEN25_7B = dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, layers=28, vocab=152064)
TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=2, vocab=256)


def layer_weights(s: dict) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of one decoder layer's projections."""
    h, i, d = s["hidden"], s["intermediate"], s["head_dim"]
    return [("q", h, s["heads"] * d), ("k", h, s["kv_heads"] * d), ("v", h, s["kv_heads"] * d),
            ("o", s["heads"] * d, h), ("gate", h, i), ("up", h, i), ("down", i, h)]


class GemmTimer:
    """Seconds of one ``(M, in) x (in, out)`` forward or ``(M, out) x (out, in)`` input-gradient GEMM,
    measured once per shape (best of 3 timings of 5 products, random bf16 operands)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.cache = device, dtype, {}

    def __call__(self, kind: str, m: int, k_in: int, n_out: int) -> float:
        key = (kind, m, k_in, n_out)
        if key not in self.cache:
            g = torch.Generator(device="cpu").manual_seed(len(self.cache))
            w = torch.randn(n_out, k_in, generator=g).to(self.device, self.dtype)
            if kind == "fwd":
                x = torch.randn(m, k_in, generator=g).to(self.device, self.dtype)
                fn = lambda: F.linear(x, w)  # noqa: E731
            else:
                dy = torch.randn(m, n_out, generator=g).to(self.device, self.dtype)
                fn = lambda: torch.mm(dy, w)  # noqa: E731
            self.cache[key] = graph_seconds(fn, self.device)
            del w
        return self.cache[key]


def graph_seconds(fn, device: torch.device, inner: int = 5) -> float:
    """Seconds per call of ``fn``; on CUDA ``inner`` calls captured in one CUDA graph and replayed (a
    decode-size GEMM of ~10 us is shorter than the host's launch of it: timed eagerly, the host is
    what gets measured)."""
    if device.type != "cuda":
        return _best_seconds(fn, device, repeats=3, inner=inner)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # warm-up: cuBLAS picks and loads its kernel outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return _best_seconds(graph.replay, device, repeats=5, inner=4) / inner


def model_pass(t: GemmTimer, s: dict, tokens: int, head_rows: int, kind: str, per_call_rows: int) -> float:
    """Seconds of one pass (``kind``: fwd or bwd) of every weight GEMM over ``tokens`` rows, issued
    ``per_call_rows`` rows at a time; the LM head over ``head_rows`` rows."""
    secs = 0.0
    calls, rest = divmod(tokens, per_call_rows)
    for m, n in ((per_call_rows, calls), (rest, 1 if rest else 0)):
        if n:
            secs += n * s["layers"] * sum(t(kind, m, k_in, n_out) for _, k_in, n_out in layer_weights(s))
    if head_rows:
        secs += t(kind, head_rows, s["hidden"], s["vocab"])
    return secs


def iteration_gemms(t: GemmTimer, s: dict, *, batch=64, prompt_len=64, new_tokens=128, epochs=4, minibatches=4,
                    micro_batch=16, no_grad_rows=32, recompute=True) -> dict:
    """Seconds of the iteration's weight GEMMs, by phase (see the module docstring)."""
    seq = prompt_len + new_tokens
    experience = 2 * model_pass(t, s, batch * seq, batch * new_tokens, "fwd", no_grad_rows * seq)
    steps = epochs * minibatches * (batch // minibatches // micro_batch)
    m = micro_batch * seq
    per_step = (2 if recompute else 1) * model_pass(t, s, m, 0, "fwd", m) + model_pass(t, s, m, 0, "bwd", m)
    per_step += t("fwd", micro_batch * new_tokens, s["hidden"], s["vocab"])
    per_step += t("bwd", micro_batch * new_tokens, s["hidden"], s["vocab"])
    prefill = model_pass(t, s, batch * prompt_len, batch, "fwd", batch * prompt_len)
    decode_step = model_pass(t, s, batch, batch, "fwd", batch)
    out = {"experience_s": experience, "update_s": steps * per_step, "optimizer_steps": steps,
           "prefill_s": prefill, "decode_step_ms": 1e3 * decode_step,
           "decode_s": (new_tokens - 1) * decode_step, "recompute": recompute}
    out["total_s"] = out["experience_s"] + out["update_s"] + out["prefill_s"] + out["decode_s"]
    return out


def decode_layouts(s: dict, device: torch.device, dtype: torch.dtype, floors: dict) -> dict:
    """Decode-step GEMMs (M = 1 and 64) in the layouts the engine could store a merged weight in:
    ``x W^T`` with ``W`` (out, in) as nn.Linear keeps it, ``x Wt`` with ``Wt`` (in, out) contiguous,
    and ``res += x W^T`` (beta = 1, as the residual adds do); fraction of the copy bandwidth."""
    h, i = s["hidden"], s["intermediate"]
    q_out = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    shapes = {"qkv": (h, q_out), "o": (s["heads"] * s["head_dim"], h), "gate+up": (h, 2 * i), "gate": (h, i),
              "down": (i, h)}
    out = {}
    g = torch.Generator(device="cpu").manual_seed(7)
    for m in (1, 64):
        for name, (k_in, n_out) in shapes.items():
            w = torch.randn(n_out, k_in, generator=g).to(device, dtype)
            wt = w.t().contiguous()
            x = torch.randn(m, k_in, generator=g).to(device, dtype)
            res = torch.randn(m, n_out, generator=g).to(device, dtype)
            row = {}
            for layout, fn in (("x W^T", lambda: F.linear(x, w)), ("x Wt", lambda: torch.mm(x, wt)),
                               ("res += x W^T", lambda: res.addmm_(x, w.t()))):
                secs = graph_seconds(fn, device, inner=20)
                row[layout] = {"us": 1e6 * secs, "fraction_of_copy": w.numel() * w.element_size()
                               / floors["copy_bandwidth_Bps"] / secs}
            out[f"M={m} {name}"] = row
            print(f"  decode GEMM M={m} {name:8s} ({n_out}x{k_in}): " + ", ".join(
                f"{k} {v['us']:.1f} us ({v['fraction_of_copy']:.2f})" for k, v in row.items()), flush=True)
            del w, wt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    floors = measure_floors(device, dtype)
    print(f"floors: {describe(floors)}", flush=True)
    s = TINY if args.tiny else QWEN25_7B
    t = GemmTimer(device, dtype)
    res = {"floors": floors, "shape": s, "device": floors["device"], "torch": torch.__version__}
    for recompute in (True, False):
        r = iteration_gemms(t, s, recompute=recompute)
        res["recompute" if recompute else "no_recompute"] = r
        print(f"{'with' if recompute else 'without'} recomputation: weight GEMMs of one iteration "
              f"{r['total_s']:.3f} s = experience {r['experience_s']:.3f} + update {r['update_s']:.3f} "
              f"({r['optimizer_steps']} steps) + prefill {r['prefill_s']:.3f} + decode {r['decode_s']:.3f} "
              f"({r['decode_step_ms']:.2f} ms/step at 64 rows)", flush=True)
    # achieved rate on the update's largest shapes, against the 8192^3 rate
    h, i = s["hidden"], s["intermediate"]
    m = 16 * 192 if not args.tiny else 64
    for name, k_in, n_out in (("gate/up fwd", h, i), ("down fwd", i, h), ("q fwd", h, h)):
        secs = t("fwd", m, k_in, n_out)
        rate = 2 * m * k_in * n_out / secs
        res.setdefault("rates", {})[name] = rate
        print(f"  {name} at M={m}: {rate / 1e12:.0f} TFLOP/s "
              f"({rate / floors['matmul_flops_per_s']:.2f} of the 8192^3 rate)", flush=True)
    if device.type == "cuda" and not args.tiny:
        res["decode_layouts"] = decode_layouts(s, device, dtype, floors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
