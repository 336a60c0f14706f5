"""benchmarks/floors.py: the roofline arithmetic the benchmarks report fractions against, and a
small measurement on the CPU (the GPU figures come from the benchmarks' own runs)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def floors_mod():
    """``benchmarks/floors.py`` (a script folder, not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location("floors", ROOT / "benchmarks" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# issue 20's H200 figures: 4.0 TB/s copy (read + written), ~790 TFLOP/s bf16
H200 = {"copy_bandwidth_Bps": 4.0e12, "matmul_flops_per_s": 790e12}


def test_decode_floor_is_the_larger_of_the_bandwidth_and_compute_bounds(floors_mod):
    f = floors_mod
    # batch 64 on the 7B shape: 14.30 GB of weights, ~7.07e9 parameters -> bandwidth-bound, 3.575 ms
    bw, fl = f.decode_bounds_ms(14.30e9, 0, 2 * 7.07e9 * 64, H200)
    assert bw == pytest.approx(3.575)
    assert fl == pytest.approx(1e3 * 2 * 7.07e9 * 64 / 790e12)
    assert f.decode_floor_ms(14.30e9, 0, 2 * 7.07e9 * 64, H200) == pytest.approx(3.575)
    # batch 512: the FLOPs dominate (9.2 ms) over weights + KV (about 4.5 ms)
    kv = f.kv_cache_bytes(512, 28, 4, 128, 64 + 128 / 2, 2)
    assert kv == 512 * 28 * 2 * 4 * 128 * 128 * 2
    big = f.decode_floor_ms(14.30e9, kv, 2 * 7.07e9 * 512, H200)
    assert big == pytest.approx(1e3 * 2 * 7.07e9 * 512 / 790e12)
    assert big > 1e3 * (14.30e9 + kv) / 4.0e12
    # KV-cache bytes count in the bandwidth bound
    assert f.decode_floor_ms(14.30e9, 4.0e9, 0, H200) == pytest.approx(1e3 * 18.30e9 / 4.0e12)
    # units: seconds from FLOPs
    assert f.compute_floor_s(790e12, H200) == pytest.approx(1.0)


def test_ppo_iteration_floor_reproduces_the_issue_accounting(floors_mod):
    # issue 20: ~1.4e10 forward FLOP per token over 64 x 192 tokens, two experience forwards, four
    # epochs -> ~3.1 s with recomputation and ~2.2 s without at 790 TFLOP/s, plus ~0.46 s of decode
    kw = dict(params=7.07e9, weight_bytes=14.30e9, batch=64, prompt_len=64, new_tokens=128, layers=28,
              kv_heads=4, head_dim=128, dtype_bytes=2, epochs=4, floors=H200)
    on = floors_mod.ppo_iteration_floor(recompute=True, **kw)
    off = floors_mod.ppo_iteration_floor(recompute=False, **kw)
    assert on["tokens"] == 64 * 192
    assert on["experience_s"] + on["update_s"] == pytest.approx(3.1, rel=0.02)
    assert off["experience_s"] + off["update_s"] == pytest.approx(2.2, rel=0.02)
    assert on["update_s"] / off["update_s"] == pytest.approx(1.5)
    assert on["decode_s"] == pytest.approx(0.46, rel=0.05)  # 127 steps, KV reads included
    assert on["decode_step_ms"] > 14.30e9 / 4.0e12 * 1e3
    assert on["total_s"] == pytest.approx(on["experience_s"] + on["update_s"] + on["prefill_s"] + on["decode_s"])


def test_measure_floors_on_the_cpu(floors_mod):
    f = floors_mod.measure_floors("cpu", copy_bytes=16 * 2**20, matmul_n=256, repeats=2)
    assert f["copy_bytes"] == 16 * 2**20 and f["matmul_n"] == 256 and f["matmul_dtype"] == "float32"
    # a CPU copies somewhere between 100 MB/s and 10 TB/s, and multiplies at 100 MFLOP/s to 100 TFLOP/s
    assert 1e8 < f["copy_bandwidth_Bps"] < 1e13
    assert 1e8 < f["matmul_flops_per_s"] < 1e14
    assert f["device"].startswith("cpu")
    assert "cpu" in floors_mod.describe(f)
    with pytest.raises(ValueError, match="repeats"):
        floors_mod.measure_floors("cpu", copy_bytes=1024, matmul_n=8, repeats=0)
    with pytest.raises(ValueError, match="copy_bytes"):
        floors_mod.measure_floors("cpu", copy_bytes=0, matmul_n=8)


def test_decoder_counts_skip_the_input_embedding(floors_mod):
    class Tiny(torch.nn.Module):  # the two methods decoder_counts uses, as a causal LM has them
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            self.layer = torch.nn.Linear(32, 64)
            self.lm_head = torch.nn.Linear(64, 100, bias=False, dtype=torch.bfloat16)

        def get_input_embeddings(self):
            return self.embed

    c = floors_mod.decoder_counts(Tiny())
    assert c["params"] == 32 * 64 + 64 + 64 * 100
    assert c["weight_bytes"] == 4 * (32 * 64 + 64) + 2 * 64 * 100  # as stored: fp32 layer, bf16 head


def test_gemm_bound_counts_every_weight_gemm_of_the_iteration_once():
    """benchmarks/gemm_bound.py's accounting, with a timer that returns each GEMM's FLOPs: the sums
    must equal the iteration's weight-GEMM FLOPs counted by hand (7B shape, the PPO workload)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("gemm_bound", ROOT / "benchmarks" / "gemm_bound.py")
        gb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gb)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    s = gb.QWEN25_7B
    flops = lambda kind, m, k_in, n_out: 2.0 * m * k_in * n_out  # noqa: E731
    layer = sum(2.0 * k_in * n_out for _, k_in, n_out in gb.layer_weights(s)) * s["layers"]  # per token
    head = 2.0 * s["hidden"] * s["vocab"]  # per row
    assert layer == pytest.approx(2 * 6.53e9, rel=0.01)  # the decoder layers' ~6.53e9 weights
    with_rc = gb.iteration_gemms(flops, s, recompute=True)
    without = gb.iteration_gemms(flops, s, recompute=False)
    seq, tokens = 64 + 128, 64 * (64 + 128)
    assert with_rc["experience_s"] == pytest.approx(2 * (tokens * layer + 64 * 128 * head))
    step = 16 * seq * layer  # one pass over a micro-batch of 16 rows
    assert with_rc["optimizer_steps"] == 16
    assert with_rc["update_s"] == pytest.approx(16 * (3 * step + 2 * 16 * 128 * head))  # fwd, recompute, bwd
    assert without["update_s"] == pytest.approx(16 * (2 * step + 2 * 16 * 128 * head))
    assert with_rc["prefill_s"] == pytest.approx(64 * 64 * layer + 64 * head)
    assert with_rc["decode_s"] == pytest.approx(127 * 64 * (layer + head))
