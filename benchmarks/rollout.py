"""Rollout throughput: StaticCudaGraphGenerate beside HF ``generate`` on a 7B-shaped policy.

Builds a randomly initialised model of the exact Qwen2.5-7B-Instruct shape directly on the GPU in
bf16, adds a peft LoRA (r=16, all seven projections, B initialised non-zero so it matters), and
times fixed-length sampling (``min_new_tokens = max_new_tokens = 128``) for several batch sizes,
in bf16 and in nf4 (bitsandbytes 4-bit, double quant, bf16 compute; the random model is saved to
local disk and reloaded through ``from_pretrained`` so the real quantized load path is used).

Each configuration: one full-length warm-up run (it includes the graph capture), then the best of
``--repeats`` timed runs. tokens/s = batch * new tokens / wall time of one ``generate`` call (prefill
included). ms/step for the fast path is the decode loop alone (CUDA events around the replays),
for HF it is wall time / new tokens.

Floor of one decode step (``benchmarks/floors.py``): the card's copy bandwidth and bf16 matmul rate
are measured at the start of the run (a 2 GiB device-to-device copy, bytes read + written; an
8192^3 bf16 matmul; best of 5 each) and the floor is the larger of

* bandwidth: (weight bytes + KV-cache bytes) / copy bandwidth. Weight bytes: every parameter except
  the input embedding table, LoRA included as stored. KV-cache bytes: batch x layers x 2 x kv_heads
  x head_dim x mean cache length x dtype bytes, the mean cache length being the filled length
  averaged over the decode steps, prompt_len + new_tokens / 2 (the engine itself reads its whole
  static cache, rounded up to a multiple of 16 columns: that excess is part of what the floor
  measures against);
* compute: 2 x parameters read x batch FLOPs / matmul rate (attention's own FLOPs left out: < 1%).

Fraction of floor = floor / measured ms per step. At batch 512 the 7B step is compute-bound.

    PYTHONPATH=. python benchmarks/rollout.py --json out.json          # the full run (~5 min, H100)
    PYTHONPATH=. python benchmarks/rollout.py --batches 1,64,512 --hf-batches 1,64 --json out.json
    PYTHONPATH=. python benchmarks/rollout.py --tiny --batches 1,4     # smoke test, CPU is fine
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from floors import decode_bounds_ms, decoder_counts, describe, kv_cache_bytes, measure_floors  # noqa: E402

from rlhf_lit.rollout.cuda_graph import StaticCudaGraphGenerate  # noqa: E402
from rlhf_lit.rollout import HFGenerate, SamplingConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, STOPS = 151643, [151645, 151643]


def qwen7b_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=152064, tie_word_embeddings=False)
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)


def build_bf16(cfg, device):
    from transformers import Qwen2ForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def add_lora(model, r=16, seed=0):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return pm.eval()


def step_floor(counts: dict, model, batch: int, args, floors: dict) -> dict:
    """The floor of one decode step at ``batch`` rows (see the module docstring): weights + KV-cache
    bytes at the measured bandwidth against 2 x parameters x batch FLOPs at the measured matmul rate."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache_len = args.prompt_len + args.new_tokens / 2
    kv = kv_cache_bytes(batch, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cache_len,
                        model.get_input_embeddings().weight.element_size())  # the cache is in the activation dtype
    flops = 2 * counts["params"] * batch
    bw_ms, flop_ms = decode_bounds_ms(counts["weight_bytes"], kv, flops, floors)
    return {"floor_ms": max(bw_ms, flop_ms), "bandwidth_floor_ms": bw_ms, "compute_floor_ms": flop_ms,
            "bound": "bandwidth" if bw_ms >= flop_ms else "compute", "weight_bytes": counts["weight_bytes"],
            "kv_bytes": kv, "mean_cache_len": cache_len, "flops": flops}


def prompts(batch, P, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 151643), (batch, P), generator=g)
    lens = torch.randint(max(1, P - 16), P + 1, (batch,), generator=g)
    mask = (torch.arange(P)[None] >= (P - lens)[:, None]).long()
    ids[mask == 0] = PAD
    return ids.to(device), mask.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(engine, model, ids, mask, sampling, repeats, device):
    """Warm-up (full length) + best of ``repeats``; returns (seconds, tokens, stats of the best run)."""
    out = engine.generate(model, ids, mask, sampling, STOPS, PAD)
    sync(device)
    best, stats = float("inf"), {}
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(model, ids, mask, sampling, STOPS, PAD)
        sync(device)
        dt = time.perf_counter() - t0
        if dt < best:
            best, stats = dt, dict(getattr(engine, "last_stats", {}) or {})
    return best, out.numel(), stats


def run_config(label, model, engine_name, batch, args, device, floor, results, **engine_kw):
    P, R = args.prompt_len, args.new_tokens
    sampling = SamplingConfig(max_new_tokens=R, min_new_tokens=R, temperature=0.7)
    ids, mask = prompts(batch, P, model.config.vocab_size if hasattr(model, "config") else 152064, device)
    engine = StaticCudaGraphGenerate(**engine_kw) if engine_name.startswith("fast") else HFGenerate()
    row = {"precision": label, "engine": engine_name, "batch": batch, "prompt_len": P, "new_tokens": R}
    try:
        secs, ntok, stats = time_engine(engine, model, ids, mask, sampling, args.repeats, device)
        row.update(seconds=secs, tokens=ntok, tok_per_s=ntok / secs)
        if stats.get("decode_steps"):
            row["ms_per_step"] = stats["decode_ms"] / stats["decode_steps"]
            row["prefill_ms"] = stats["prefill_ms"]
        else:
            row["ms_per_step"] = 1e3 * secs / R
        row.update(floor)
        row["fraction_of_floor"] = floor["floor_ms"] / row["ms_per_step"]
    except Exception as e:  # keep going: one failing configuration must not cost the others
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if hasattr(engine, "release"):
            engine.release()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["rows"].append(row)
    print(json.dumps(row), flush=True)
    return row


def _fresh_logprobs(model, ids, mask, resp, T):
    P = ids.shape[1]
    out = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], 8):
            full = torch.cat([ids[s:s + 8], resp[s:s + 8]], 1)
            fmask = torch.cat([mask[s:s + 8], torch.ones_like(resp[s:s + 8])], 1)
            logits = model(input_ids=full, attention_mask=fmask).logits[:, P - 1:-1].float() / T
            out.append(torch.log_softmax(logits, -1).gather(-1, resp[s:s + 8, :, None])[..., 0])
            del logits
    return torch.cat(out)


def _diff_stats(lp_sampler, lp_fresh):
    d = lp_fresh - lp_sampler
    return {"mean_abs_logprob_diff": d.abs().mean().item(), "max_abs_logprob_diff": d.abs().max().item(),
            "ratio_mean": torch.exp(d).mean().item(), "ratio_std": torch.exp(d).std().item()}


def ratio_check(model, batch, args, device, results):
    """log-probs the sampler computed vs a fresh full forward (what PPO's first minibatch computes),
    for the engine (default and peft-module/exact-norm modes) and for HF generate's own logits:
    in bf16 every decode path differs from the full forward by rounding; HF's is the yardstick."""
    from transformers import GenerationConfig

    P, R, T = args.prompt_len, args.new_tokens, 0.7
    ids, mask = prompts(batch, P, 152064, device, seed=3)
    sampling = SamplingConfig(max_new_tokens=R, min_new_tokens=R, temperature=T)
    res = {"batch": batch}
    for name, kw in [("fast", {}), ("fast[lora=merged]", dict(lora="merged")),
                     ("fast[lora=module,norm=exact,fuse_qkv=False]", dict(lora="module", norm="exact", fuse_qkv=False))]:
        eng = StaticCudaGraphGenerate(compute_logprobs=True, **kw)
        resp = eng.generate(model, ids, mask, sampling, STOPS, PAD)
        res[name] = _diff_stats(eng.last_logprobs, _fresh_logprobs(model, ids, mask, resp, T))
        eng.release()
    cfg = GenerationConfig(do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=R, min_new_tokens=R,
                           eos_token_id=STOPS, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    resp = g.sequences[:, P:]
    lp = torch.stack([torch.log_softmax(l.float() / T, -1).gather(-1, resp[:, t:t + 1])[:, 0]
                      for t, l in enumerate(g.logits)], 1)
    del g
    res["hf"] = _diff_stats(lp, _fresh_logprobs(model, ids, mask, resp, T))
    results["ratio_check"] = res
    print("ratio check:", json.dumps(res), flush=True)


def _kernel_totals(prof):
    tot = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t and not e.key.startswith("aten::") and not e.key.startswith("cuda"):
            tot[e.key] = (tot.get(e.key, (0, 0.0))[0] + e.count, tot.get(e.key, (0, 0.0))[1] + t)
    return tot


def profile_decode(model, batch, args, device, path, steps=8, lora="fused", **engine_kw):
    """Per-step device time of the decode graph by kernel: a profile of prefill + ``steps`` replays
    minus a profile of the prefill alone (CUPTI sees the kernels inside graph replays); ``lora`` and
    ``engine_kw`` configure the engine."""
    from torch.profiler import ProfilerActivity, profile

    P = args.prompt_len
    ids, mask = prompts(batch, P, 152064, device, seed=5)
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    eng = StaticCudaGraphGenerate(lora=lora, **engine_kw)
    full = SamplingConfig(max_new_tokens=steps + 1, min_new_tokens=steps + 1, temperature=0.7)
    one = SamplingConfig(max_new_tokens=1, min_new_tokens=1, temperature=0.7)
    eng.generate(model, ids, mask, one, STOPS, PAD)
    with profile(activities=acts) as p1:
        eng.generate(model, ids, mask, one, STOPS, PAD)
        sync(device)
    eng.generate(model, ids, mask, full, STOPS, PAD)
    sync(device)
    with profile(activities=acts) as p2:
        eng.generate(model, ids, mask, full, STOPS, PAD)
        sync(device)
    stats = dict(eng.last_stats)
    eng.release()
    a, b = _kernel_totals(p1), _kernel_totals(p2)
    rows = []
    for k, (n, t) in b.items():
        n0, t0 = a.get(k, (0, 0.0))
        if n - n0 > 0:
            rows.append(((t - t0) / steps, (n - n0) / steps, k))
    rows.sort(reverse=True)
    per_step = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows)
    wall = stats["decode_ms"] / max(stats["decode_steps"], 1) * 1e3
    with open(path, "w") as f:
        f.write(f"decode graph, lora={lora} {engine_kw}, batch {batch}: {launches:.0f} kernels/step, summed kernel time {per_step:.0f} us/step, "
                f"replay wall time {wall:.0f} us/step\n\n")
        f.write(f"{'us/step':>9} {'calls/step':>10}  kernel\n")
        for t, n, k in rows:
            f.write(f"{t:9.1f} {n:10.1f}  {k[:150]}\n")
    print(f"profile -> {path} (lora={lora}, batch {batch}): {launches:.0f} kernels/step, {per_step / 1e3:.2f} ms kernel time/step, "
          f"{wall / 1e3:.2f} ms wall/step", flush=True)


def print_table(results):
    rows = results["rows"]
    print(f"\nfloors: {describe(results['floors'])}")
    print("\n| precision | engine | batch | tokens/s | ms/step | floor ms | bound | fraction of floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['precision']} | {r['engine']} | {r['batch']} | error: {r['error'][:80]} | | | | |")
            continue
        print(f"| {r['precision']} | {r['engine']} | {r['batch']} | {r['tok_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
              f"{r['floor_ms']:.2f} | {r['bound']} | {r['fraction_of_floor']:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--hf-batches", default="1,64", help="HF generate is slow: a subset of --batches")
    ap.add_argument("--precisions", default="bf16,nf4")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", action="store_true", help="also time lora/norm variants at the largest batch (bf16)")
    ap.add_argument("--merged", action="store_true",
                    help="also time lora=merged (model.rollout_engine: cuda_graph_merged) at every batch and precision")
    ap.add_argument("--ratio-check", action="store_true", help="engine log-probs vs a fresh forward (bf16)")
    ap.add_argument("--profile", default="", help="write kernel tables of bf16 decode at the smallest and largest batch here "
                         "(<stem>_<lora>_bs<batch>.txt; with --merged for both LoRA modes)")
    ap.add_argument("--kernels", default="auto",
                    help="the engine's glue kernels, comma-separated runs of: auto, triton, torch")
    ap.add_argument("--gate-up-rows", default="512",
                    help="lora=merged runs: gate and up as one GEMM up to this many rows (comma-separated runs)")
    ap.add_argument("--profile-batches", default="", help="batches to profile (default: smallest and largest)")
    ap.add_argument("--save-dir", default="/tmp/rand_qwen7b")
    ap.add_argument("--json", default="")
    ap.add_argument("--tiny", action="store_true", help="a small model of the same family (smoke test)")
    args = ap.parse_args()
    kernel_modes = args.kernels.split(",")
    bad = [k for k in kernel_modes if k not in ("auto", "triton", "torch")]
    if bad:
        ap.error(f"--kernels {args.kernels}: expected a comma-separated list of auto, triton, torch (got {bad})")
    try:
        gate_up_rows = [int(x) for x in args.gate_up_rows.split(",")]
    except ValueError:
        ap.error(f"--gate-up-rows {args.gate_up_rows}: expected comma-separated integers >= 0")
    if any(g < 0 for g in gate_up_rows):
        ap.error(f"--gate-up-rows {args.gate_up_rows}: expected comma-separated integers >= 0")
    try:
        profile_batches = [int(x) for x in args.profile_batches.split(",")] if args.profile_batches else []
        batch_list = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches} / --profile-batches {args.profile_batches}: expected comma-separated "
                 "batch sizes")
    if any(b < 1 for b in profile_batches + batch_list):
        ap.error("--batches and --profile-batches: batch sizes must be >= 1")
    if profile_batches and not args.profile:
        ap.error("--profile-batches needs --profile (where the kernel tables go)")
    from rlhf_lit.rollout import decode_kernels

    if "triton" in kernel_modes and not torch.cuda.is_available() and not decode_kernels.interpreting():
        ap.error("--kernels triton needs a CUDA GPU (or TRITON_INTERPRET=1: Triton's interpreter, slow)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    precisions = args.precisions.split(",")
    import peft
    import transformers

    try:
        import bitsandbytes as bnb

        bnb_version = bnb.__version__
    except Exception:
        bnb_version = None
    results = {
        "date": _dt.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb_version},
        "rows": [],
    }
    # before any model is built: the whole card is free for the 2 GiB copy
    results["floors"] = floors = measure_floors(device, torch.bfloat16)
    results["copy_bandwidth_Bps"] = floors["copy_bandwidth_Bps"]  # the key earlier JSON files had (then a constant)
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
    print(f"floors: {describe(floors)}", flush=True)
    cfg = qwen7b_config(args.tiny)
    t0 = time.perf_counter()

    model = build_bf16(cfg, device)
    sync(device)
    print(f"built bf16 model in {time.perf_counter() - t0:.1f} s", flush=True)
    if "nf4" in precisions and device.type == "cuda":
        t1 = time.perf_counter()
        model.save_pretrained(args.save_dir)
        print(f"saved to {args.save_dir} in {time.perf_counter() - t1:.1f} s", flush=True)
    if "bf16" in precisions:
        pm = add_lora(model)
        counts = results["counts_bf16"] = decoder_counts(pm)
        floor = {b: step_floor(counts, pm, b, args, floors) for b in batches}
        print(f"bf16 + LoRA: {counts['weight_bytes'] / 1e9:.2f} GB of weights read per step, "
              f"{counts['params']:,} parameters; floor per step: " + ", ".join(
                  f"batch {b} {f['floor_ms']:.2f} ms ({f['bound']})" for b, f in floor.items()), flush=True)
        for b in batches:
            for kern in kernel_modes:
                tag = f"kernels={kern}" if len(kernel_modes) > 1 else ""
                run_config("bf16", pm, f"fast[{tag}]" if tag else "fast", b, args, device, floor[b], results,
                           kernels=kern)
                if args.merged:
                    for gu in gate_up_rows:
                        t = ",".join(x for x in (tag, f"gate_up_rows={gu}" if gu else "") if x)
                        run_config("bf16", pm, f"fast[lora=merged{',' + t if t else ''}]", b, args, device, floor[b],
                                   results, lora="merged", kernels=kern, gate_up_rows=gu)
            if b in hf_batches:
                run_config("bf16", pm, "hf", b, args, device, floor[b], results)
        if args.variants:
            b = max(batches)
            run_config("bf16", pm, "fast[fuse_qkv=False]", b, args, device, floor[b], results, fuse_qkv=False)
            run_config("bf16", pm, "fast[lora=module,norm=exact,fuse_qkv=False]", b, args, device, floor[b], results,
                       lora="module", norm="exact", fuse_qkv=False)
        if args.ratio_check:
            try:
                ratio_check(pm, 16, args, device, results)
            except Exception:
                traceback.print_exc()
        if args.profile:
            pb = profile_batches or sorted({min(batches), max(batches)})
            for b in pb:
                for lora in ("fused", "merged") if args.merged else ("fused",):
                    for kern in kernel_modes:
                        try:
                            path = Path(args.profile)
                            kt = f"_{kern}" if len(kernel_modes) > 1 else ""
                            path = path.with_name(f"{path.stem}_{lora}{kt}_bs{b}{path.suffix or '.txt'}")
                            gu = max(gate_up_rows) if lora == "merged" else 0
                            profile_decode(pm, b, args, device, str(path), lora=lora, kernels=kern, gate_up_rows=gu)
                        except Exception:
                            traceback.print_exc()
        del pm
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if "nf4" in precisions and device.type == "cuda":
        try:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            t1 = time.perf_counter()
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(args.save_dir, quantization_config=q, dtype=torch.bfloat16,
                                                         device_map={"": 0})
            print(f"loaded nf4 in {time.perf_counter() - t1:.1f} s; "
                  f"{torch.cuda.memory_allocated() / 1e9:.2f} GB allocated", flush=True)
            pm = add_lora(model.eval())
            counts = results["counts_nf4"] = decoder_counts(pm)
            floor = {b: step_floor(counts, pm, b, args, floors) for b in batches}
            print(f"nf4 + LoRA: {counts['weight_bytes'] / 1e9:.2f} GB of weights read per step, "
                  f"{counts['params']:,} parameters; floor per step: " + ", ".join(
                      f"batch {b} {f['floor_ms']:.2f} ms ({f['bound']})" for b, f in floor.items()), flush=True)
            for b in batches:
                run_config("nf4", pm, "fast", b, args, device, floor[b], results)
                if args.merged:  # the 4-bit weights dequantized into the merged copy once per call
                    run_config("nf4", pm, "fast[lora=merged]", b, args, device, floor[b], results, lora="merged")
                if b in hf_batches:
                    run_config("nf4", pm, "hf", b, args, device, floor[b], results)
        except Exception:
            traceback.print_exc()
    results["total_seconds"] = time.perf_counter() - t0
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
