"""StaticCudaGraphGenerate: the eager path on CPU against HF ``generate``; the graph path on GPU."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from rlhf_lit.rollout.cuda_graph import (
    StaticCudaGraphGenerate, UnsupportedModelError, _unwrap, filter_logits, sample_from_logits,
)
from rlhf_lit.rollout import SamplingConfig

PAD = 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These models are tiny: on a busy 2-core machine, intra-op threads cost 100x in barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def tiny_lm(kind="qwen2", hidden=64, heads=4, kv=2, layers=2, vocab=128, seed=0, dtype=torch.float32,
            device="cpu", lora=True, lora_b_std=0.05):
    """A small random decoder with a LoRA adapter (r=4, all projections) whose B is non-zero."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=hidden // heads, **common))
    else:
        raise ValueError(kind)
    model = model.to(device=device, dtype=dtype).eval()
    if not lora:
        return model
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_b_std)
    return pm.eval()


def left_padded(lengths, P, vocab, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(3, vocab, (B, P), generator=g)
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : P - n] = PAD
        mask[b, P - n:] = 1
    return ids.to(device), mask.to(device)


def hf_greedy(model, ids, mask, R, stops=(), min_new=0):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=R, min_new_tokens=min_new,
                           eos_token_id=list(stops) or None, pad_token_id=PAD, repetition_penalty=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out[:, ids.shape[1]:]


def fresh_logprobs(model, ids, mask, resp, temperature):
    """log softmax(logits / T) of ``resp`` from one full forward (what PPO's training pass computes)."""
    resp_mask = torch.ones_like(resp)
    full = torch.cat([ids, resp], 1)
    full_mask = torch.cat([mask, resp_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask).logits.float()
    P = ids.shape[1]
    logits = logits[:, P - 1: -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0]


def assert_greedy_close(model, ids, mask, ours, ref, rel_tol=1e-4):
    """Token-for-token equality, except that a row may diverge where HF's own logits make the two
    candidates a tie within rounding (fp32: a gap under ~1e-5 of the logits' spread, seen on CPU;
    bf16: rounding differs between the two implementations, so ~10%)."""
    if torch.equal(ours, ref):
        return
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    prefix = []
    for b in range(ref.shape[0]):
        diff = (ours[b] != ref[b]).nonzero()
        if len(diff) == 0:
            prefix.append(ref.shape[1])
            continue
        t = int(diff[0])
        prefix.append(t)
        seq = torch.cat([ids[b:b + 1], ref[b:b + 1, :t]], 1)
        m = torch.cat([mask[b:b + 1], torch.ones_like(ref[b:b + 1, :t])], 1)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=m).logits[0, -1].float()
        gap = (logits[ref[b, t]] - logits[ours[b, t]]).abs().item()
        assert gap <= rel_tol * logits.std().item(), (
            f"row {b} diverges at step {t} with a logit gap of {gap:.4f} (std {logits.std().item():.4f})"
        )
    assert sum(prefix) >= 0.5 * ref.numel(), f"matching prefixes too short: {prefix}"


def sampling(R=16, **kw):
    return SamplingConfig(max_new_tokens=R, **kw)


# --------------------------------------------------------------------------------------------
# CPU: the eager path
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_greedy_matches_hf_left_padding_lora(kind):
    model = tiny_lm(kind)
    ids, mask = left_padded([11, 7, 3, 9], 11, 128)
    ref = hf_greedy(model, ids, mask, 24)
    eng = StaticCudaGraphGenerate(greedy=True, prompt_bucket=8)
    out = eng.generate(model, ids, mask, sampling(24), [], PAD)
    assert_greedy_close(model, ids, mask, out, ref)


@pytest.mark.parametrize("lora,norm,fuse_qkv", [("fused", "exact", True), ("fused", "fused", False),
                                                ("module", "fused", True), ("module", "exact", False),
                                                ("merged", "fused", True), ("merged", "exact", False)])
def test_greedy_matches_hf_all_modes(lora, norm, fuse_qkv):
    model = tiny_lm("qwen2", seed=3)
    ids, mask = left_padded([5, 13, 9], 13, 128, seed=4)
    ref = hf_greedy(model, ids, mask, 20)
    eng = StaticCudaGraphGenerate(greedy=True, lora=lora, norm=norm, fuse_qkv=fuse_qkv)
    out = eng.generate(model, ids, mask, sampling(20), [], PAD)
    assert (eng._plan.layers[0].fqkv is not None) == (fuse_qkv and lora in ("fused", "merged"))
    assert_greedy_close(model, ids, mask, out, ref)


def test_merged_lora_decodes_without_lora_gemms_and_sees_updates():
    """lora="merged": every projection reads W + s * B @ A (no LoRA GEMM in the step), recomputed at
    every call, so in-place adapter updates are seen; the same tokens and log-probs as "fused"."""
    model = tiny_lm("qwen2", seed=14, lora_b_std=0.1)
    ids, mask = left_padded([8, 6, 11], 11, 128)
    merged = StaticCudaGraphGenerate(greedy=True, lora="merged", compute_logprobs=True)
    fused = StaticCudaGraphGenerate(greedy=True, lora="fused", compute_logprobs=True)
    for step in range(2):
        a = merged.generate(model, ids, mask, sampling(16), [], PAD)
        b = fused.generate(model, ids, mask, sampling(16), [], PAD)
        assert torch.equal(a, b)
        torch.testing.assert_close(merged.last_logprobs, fused.last_logprobs, atol=1e-5, rtol=0)
        with torch.no_grad():  # an optimizer step's worth of change in place
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    assert merged.num_setups == 1  # one plan; the merged copies were recomputed, not re-planned
    L = merged._plan.layers[0]
    assert L.fqkv.Wm is not None and L.qkv.lora_a(torch.zeros(1, L.fqkv.W.shape[1])) is None
    assert all(p.Wm is not None and not p.lora_on_the_side for p in (L.o, L.gate, L.up, L.down))
    assert not torch.equal(L.gate.Wm, L.gate.base.weight)  # the adapter is in the merged copy
    assert_greedy_close(model, ids, mask, merged.generate(model, ids, mask, sampling(16), [], PAD),
                        hf_greedy(model, ids, mask, 16))


def test_prefill_in_row_chunks_changes_nothing():
    model = tiny_lm()
    ids, mask = left_padded([5, 3, 7, 2, 6], P=8, vocab=128)
    whole = StaticCudaGraphGenerate(use_cuda_graph=False, greedy=True, compute_logprobs=True, prefill_rows=64)
    chunked = StaticCudaGraphGenerate(use_cuda_graph=False, greedy=True, compute_logprobs=True, prefill_rows=2)
    a = whole.generate(model, ids, mask, sampling(R=10), [], PAD)
    b = chunked.generate(model, ids, mask, sampling(R=10), [], PAD)
    assert torch.equal(a, b)
    torch.testing.assert_close(whole.last_logprobs, chunked.last_logprobs, atol=1e-5, rtol=1e-5)


def test_adapter_matters_and_disable_adapter_replans():
    model = tiny_lm("qwen2", lora_b_std=0.2)
    ids, mask = left_padded([8, 5], 8, 128)
    eng = StaticCudaGraphGenerate(greedy=True)
    with_adapter = eng.generate(model, ids, mask, sampling(16), [], PAD)
    with model.disable_adapter():
        ref_off = hf_greedy(model, ids, mask, 16)
        without = eng.generate(model, ids, mask, sampling(16), [], PAD)
        assert_greedy_close(model, ids, mask, without, ref_off)
    assert not torch.equal(with_adapter, without)
    assert torch.equal(eng.generate(model, ids, mask, sampling(16), [], PAD), with_adapter)


def test_stop_writes_pad_after_eos():
    model = tiny_lm("qwen2", seed=5)
    ids, mask = left_padded([6, 10, 4, 8], 10, 128, seed=6)
    free = hf_greedy(model, ids, mask, 24)
    stops = [int(free[0, 5]), int(free[2, 2])]
    ref = hf_greedy(model, ids, mask, 24, stops=stops)
    out = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(24), stops, PAD)
    assert_greedy_close(model, ids, mask, out, ref)
    for row in out:
        hit = torch.isin(row, torch.tensor(stops)).nonzero()
        if len(hit):
            assert (row[int(hit[0]) + 1:] == PAD).all()
    # all rows stopping early shortens the output like HF
    stop_all = sorted({int(t) for t in free[:, 0]})
    ref = hf_greedy(model, ids, mask, 24, stops=stop_all)
    out = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(24), stop_all, PAD)
    assert out.shape[1] == 1 and torch.equal(out, ref)  # one step: no room for ties


def test_min_new_tokens_suppresses_stop():
    model = tiny_lm("qwen2", seed=7)
    ids, mask = left_padded([9, 6, 9], 9, 128, seed=8)
    free = hf_greedy(model, ids, mask, 20)
    stops = [int(free[0, 0]), int(free[1, 1])]
    ref = hf_greedy(model, ids, mask, 20, stops=stops, min_new=5)
    out = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(20, min_new_tokens=5), stops, PAD)
    assert_greedy_close(model, ids, mask, out, ref)
    assert not torch.isin(out[:, :5], torch.tensor(stops)).any()
    # fixed length: min_new_tokens == max_new_tokens never stops
    out = StaticCudaGraphGenerate().generate(model, ids, mask, sampling(12, min_new_tokens=12), stops, PAD)
    assert out.shape == (3, 12) and not torch.isin(out[:, :11], torch.tensor(stops)).any()


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_lm("qwen2", seed=9)
    ids, mask = left_padded([7, 3, 5], 7, 128, seed=10)
    greedy = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(16), [], PAD)
    top1 = StaticCudaGraphGenerate(seed=1).generate(model, ids, mask, sampling(16, top_k=1, temperature=0.7), [], PAD)
    topp = StaticCudaGraphGenerate(seed=2).generate(model, ids, mask, sampling(16, top_p=1e-6), [], PAD)
    assert torch.equal(top1, greedy) and torch.equal(topp, greedy)


def test_filters_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 300) * 3
    for k, p in [(0, 0.9), (20, 1.0), (50, 0.7), (5, 0.3), (0, 1.0)]:
        ref = scores.clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(filter_logits(scores, k, p), ref)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (6, 0.7)])
def test_sampler_follows_the_filtered_softmax(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 16, generator=g) * 1.5
    N = 200_000
    out = sample_from_logits(scores.expand(N, 16), top_k, top_p, generator=g)
    ref = scores.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    probs = torch.softmax(ref, -1)[0]
    freq = torch.bincount(out, minlength=16).float() / N
    assert (freq[probs == 0] == 0).all()
    assert (freq - probs).abs().max() < 0.006  # ~5 standard errors at p = 0.25


def test_engine_sampling_follows_the_model():
    model = tiny_lm("qwen2", seed=11, hidden=32, vocab=16)
    N = 4000
    ids = torch.randint(3, 16, (1, 6)).expand(N, 6).contiguous()
    mask = torch.ones_like(ids)
    T = 0.5
    out = StaticCudaGraphGenerate(seed=0).generate(model, ids, mask, sampling(1, temperature=T), [], PAD)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] / T, -1)
    freq = torch.bincount(out[:, 0], minlength=16).float() / N
    assert (freq - probs).abs().max() < 0.04


def test_seed_reproducible():
    model = tiny_lm("qwen2", seed=12)
    ids, mask = left_padded([6, 4], 6, 128)
    a = StaticCudaGraphGenerate(seed=3).generate(model, ids, mask, sampling(16), [], PAD)
    b = StaticCudaGraphGenerate(seed=3).generate(model, ids, mask, sampling(16), [], PAD)
    c = StaticCudaGraphGenerate(seed=4).generate(model, ids, mask, sampling(16), [], PAD)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_logprobs_match_a_fresh_forward_cpu():
    model = tiny_lm("qwen2", seed=13)
    ids, mask = left_padded([9, 5, 7], 9, 128)
    eng = StaticCudaGraphGenerate(compute_logprobs=True, seed=0)
    resp = eng.generate(model, ids, mask, sampling(16, temperature=0.7, min_new_tokens=16), [1], PAD)
    ref = fresh_logprobs(model, ids, mask, resp, 0.7)
    torch.testing.assert_close(eng.last_logprobs, ref, atol=1e-4, rtol=0)


def test_inplace_lora_update_is_seen():
    model = tiny_lm("qwen2", seed=14, lora_b_std=0.1)
    ids, mask = left_padded([8, 6], 8, 128)
    eng = StaticCudaGraphGenerate(greedy=True)
    before = eng.generate(model, ids, mask, sampling(16), [], PAD)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.add_(torch.randn_like(p) * 0.3)
    after = eng.generate(model, ids, mask, sampling(16), [], PAD)
    assert eng.num_setups == 1
    assert not torch.equal(before, after)
    assert_greedy_close(model, ids, mask, after, hf_greedy(model, ids, mask, 16))


def test_fused_qkv_reads_the_model_weights_without_a_copy():
    model = tiny_lm("qwen2", seed=16, lora_b_std=0.1)
    ids, mask = left_padded([8, 6], 8, 128)
    eng = StaticCudaGraphGenerate(greedy=True)
    eng.generate(model, ids, mask, sampling(12), [], PAD)
    fq = eng._plan.layers[0].fqkv
    attn = _unwrap(model).model.layers[0].self_attn
    qkv = [getattr(attn, n).base_layer for n in ("q_proj", "k_proj", "v_proj")]
    rows = [0, qkv[0].weight.shape[0], qkv[0].weight.shape[0] + qkv[1].weight.shape[0]]
    assert [lin.weight.data_ptr() for lin in qkv] == [fq.W[r].data_ptr() for r in rows]  # views, no copy
    assert [lin.bias.data_ptr() for lin in qkv] == [fq.b[r].data_ptr() for r in rows]
    eng.release()
    eng.generate(model, ids, mask, sampling(12), [], PAD)
    assert eng._plan.layers[0].fqkv.W is fq.W  # a new plan finds the buffer: nothing moved again
    with torch.no_grad():
        qkv[1].weight.add_(torch.randn_like(qkv[1].weight) * 0.5)  # in place: the fused GEMM sees it
    assert_greedy_close(model, ids, mask, eng.generate(model, ids, mask, sampling(12), [], PAD),
                        hf_greedy(model, ids, mask, 12))
    qkv[2].weight = torch.nn.Parameter(qkv[2].weight.detach() * 1.5)  # replaced: a new plan moves them again
    out = eng.generate(model, ids, mask, sampling(12), [], PAD)
    assert eng._plan.layers[0].fqkv.W is not fq.W
    assert_greedy_close(model, ids, mask, out, hf_greedy(model, ids, mask, 12))


def test_static_state_reused_per_bucket_and_released():
    model = tiny_lm("qwen2", seed=15)
    eng = StaticCudaGraphGenerate(greedy=True, prompt_bucket=16)
    for lengths, P in [([5, 9], 9), ([12, 3], 12), ([16, 1], 16)]:
        ids, mask = left_padded(lengths, P, 128)
        out = eng.generate(model, ids, mask, sampling(8), [], PAD)
        assert_greedy_close(model, ids, mask, out, hf_greedy(model, ids, mask, 8))
    assert eng.num_setups == 1
    ids, mask = left_padded([17, 3], 17, 128)
    eng.generate(model, ids, mask, sampling(8), [], PAD)
    assert eng.num_setups == 2
    eng.release()
    assert eng._state is None and eng._plan is None


def test_training_mode_restored():
    model = tiny_lm("qwen2").train()
    ids, mask = left_padded([4, 2], 4, 128)
    StaticCudaGraphGenerate().generate(model, ids, mask, sampling(4), [], PAD)
    assert model.training


def test_make_engine_passes_the_configured_decode_kernels(caplog):
    """``model.rollout_kernels`` reaches the CUDA-graph engine (built, not run: no GPU needed), and
    is refused with the HF engine, which has no glue kernels."""
    from rlhf_lit.rollout.auto import FallbackEngine, make_engine

    cuda = torch.device("cuda")
    eng = make_engine("cuda_graph", cuda, "torch")
    assert isinstance(eng, StaticCudaGraphGenerate) and eng.kernels == "torch" and eng.lora_mode == "fused"
    eng = make_engine("cuda_graph_merged", cuda, "triton")
    assert eng.kernels == "triton" and eng.lora_mode == "merged"
    eng = make_engine("auto", cuda)
    assert isinstance(eng, FallbackEngine) and eng.active.kernels == "auto"
    with caplog.at_level("WARNING", logger="rlhf_lit.rollout.auto"):
        assert make_engine("auto", torch.device("cpu"), "torch").name == "HFGenerate"  # auto on the CPU
    assert "model.rollout_kernels='torch' has no effect here" in caplog.text
    with pytest.raises(ValueError, match="model.rollout_kernels='triton' chooses the cuda_graph engines"):
        make_engine("hf", cuda, "triton")
    with pytest.raises(ValueError, match="model.rollout_kernels='fast': expected 'auto', 'triton' or 'torch'"):
        make_engine("cuda_graph", cuda, "fast")


def test_unsupported_architecture_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    ids, mask = left_padded([4], 4, 64)
    with pytest.raises(UnsupportedModelError, match="HFGenerate"):
        StaticCudaGraphGenerate().generate(model, ids, mask, sampling(4), [], PAD)
    assert issubclass(UnsupportedModelError, NotImplementedError)


# --------------------------------------------------------------------------------------------
# GPU: the graph path
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def gpu_lm(dtype, seed=0, **kw):
    return tiny_lm("qwen2", hidden=256, heads=8, kv=2, layers=3, vocab=512, seed=seed, dtype=dtype,
                   device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_greedy_matches_hf_fp32(no_tf32):
    model = gpu_lm(torch.float32)
    ids, mask = left_padded([20, 7, 13, 1, 17, 20], 20, 512, device="cuda")
    ref = hf_greedy(model, ids, mask, 32)
    eng = StaticCudaGraphGenerate(greedy=True)
    out = eng.generate(model, ids, mask, sampling(32), [], PAD)
    assert_greedy_close(model, ids, mask, out, ref)
    assert eng.num_captures == 1
    ids2, mask2 = left_padded([3, 19, 11, 8, 20, 2], 20, 512, device="cuda", seed=5)
    out2 = eng.generate(model, ids2, mask2, sampling(32), [], PAD)
    assert_greedy_close(model, ids2, mask2, out2, hf_greedy(model, ids2, mask2, 32))
    assert eng.num_captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lora,norm", [("fused", "fused"), ("module", "exact"), ("merged", "fused")])
def test_gpu_greedy_matches_hf_bf16(lora, norm):
    model = gpu_lm(torch.bfloat16)
    ids, mask = left_padded([20, 7, 13, 1, 17, 20, 5, 9], 20, 512, device="cuda")
    ref = hf_greedy(model, ids, mask, 32)
    out = StaticCudaGraphGenerate(greedy=True, lora=lora, norm=norm).generate(model, ids, mask, sampling(32), [], PAD)
    assert_greedy_close(model, ids, mask, out, ref, rel_tol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,lora", [(torch.float32, "fused"), (torch.bfloat16, "fused"), (torch.bfloat16, "merged")])
def test_gpu_logprobs_match_a_fresh_forward(dtype, lora, no_tf32):
    model = gpu_lm(dtype, seed=2)
    ids, mask = left_padded([20, 7, 13, 1, 17, 20, 5, 9], 20, 512, device="cuda")
    T = 0.7
    eng = StaticCudaGraphGenerate(compute_logprobs=True, lora=lora)
    resp = eng.generate(model, ids, mask, sampling(32, temperature=T, min_new_tokens=32), [1], PAD)
    ref = fresh_logprobs(model, ids, mask, resp, T)
    diff = (eng.last_logprobs - ref).abs()
    print(f"{dtype} lora={lora}: |engine - fresh forward| log-prob mean {diff.mean():.2e} max {diff.max():.2e}; "
          f"ratio mean {torch.exp(ref - eng.last_logprobs).mean():.5f}")
    if dtype == torch.float32:
        assert diff.max() < 1e-3
    else:
        assert diff.mean() < 0.02 and diff.max() < 0.15
        assert abs(torch.exp(ref - eng.last_logprobs).mean().item() - 1) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_sees_updated_adapter_weights(no_tf32):
    model = gpu_lm(torch.float32, seed=3, lora_b_std=0.1)
    ids, mask = left_padded([20, 7, 13, 1], 20, 512, device="cuda")
    eng = StaticCudaGraphGenerate(greedy=True)
    before = eng.generate(model, ids, mask, sampling(24), [], PAD)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.add_(torch.randn_like(p) * 0.3)
    after = eng.generate(model, ids, mask, sampling(24), [], PAD)
    assert eng.num_captures == 1
    assert not torch.equal(before, after)
    assert_greedy_close(model, ids, mask, after, hf_greedy(model, ids, mask, 24))
    with torch.no_grad():  # copy_ of new values into the live tensors, too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    again = eng.generate(model, ids, mask, sampling(24), [], PAD)
    assert eng.num_captures == 1
    assert_greedy_close(model, ids, mask, again, hf_greedy(model, ids, mask, 24))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_stop_min_new_and_early_exit(no_tf32):
    model = gpu_lm(torch.float32, seed=4)
    ids, mask = left_padded([20, 7, 13, 1], 20, 512, device="cuda")
    free = hf_greedy(model, ids, mask, 40)
    stops = sorted({int(t) for t in free[:, 3]} | {int(free[0, 1])})
    eng = StaticCudaGraphGenerate(greedy=True, check_every=4)
    for min_new in (0, 2):
        ref = hf_greedy(model, ids, mask, 40, stops=stops, min_new=min_new)
        out = eng.generate(model, ids, mask, sampling(40, min_new_tokens=min_new), stops, PAD)
        assert_greedy_close(model, ids, mask, out, ref)
        assert out.shape[1] < 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_top_k_top_p_and_seed_in_graph(no_tf32):
    # fp32: bf16 logits tie exactly often enough that top-k=1 keeps two tokens (as in HF)
    model = gpu_lm(torch.float32, seed=5)
    ids, mask = left_padded([20, 7, 13, 1], 20, 512, device="cuda")
    greedy = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(24), [], PAD)
    top1 = StaticCudaGraphGenerate().generate(model, ids, mask, sampling(24, top_k=1), [], PAD)
    assert torch.equal(top1, greedy)
    model = gpu_lm(torch.bfloat16, seed=5)
    out = StaticCudaGraphGenerate().generate(model, ids, mask, sampling(24, top_k=50, top_p=0.9), [], PAD)
    assert out.shape == (4, 24) and int(out.min()) >= 0 and int(out.max()) < 512
    a = StaticCudaGraphGenerate(seed=7).generate(model, ids, mask, sampling(24), [], PAD)
    b = StaticCudaGraphGenerate(seed=7).generate(model, ids, mask, sampling(24), [], PAD)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_release_frees_memory():
    model = gpu_lm(torch.bfloat16, seed=6)
    ids, mask = left_padded([20] * 32, 20, 512, device="cuda")
    eng = StaticCudaGraphGenerate()
    eng.generate(model, ids, mask, sampling(200), [], PAD)  # first cycle: cuBLAS workspaces etc.
    eng.release()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    eng.generate(model, ids, mask, sampling(200), [], PAD)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    eng.release()
    torch.cuda.synchronize()
    freed = torch.cuda.memory_allocated() - base
    print(f"engine state: {held / 2**20:.1f} MiB while held, {freed / 2**20:.2f} MiB after release()")
    assert held > 0 and freed < 0.1 * held, (held, freed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_nf4_greedy_close_to_hf(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_lm("qwen2", hidden=256, heads=8, kv=2, layers=3, vocab=512, lora=False, dtype=torch.bfloat16)
    base.save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    for B in (1, 6):
        ids, mask = left_padded([20, 7, 13, 1, 17, 20][:B], 20, 512, device="cuda")
        ref = hf_greedy(model, ids, mask, 24)
        out = StaticCudaGraphGenerate(greedy=True).generate(model, ids, mask, sampling(24), [], PAD)
        assert_greedy_close(model, ids, mask, out, ref, rel_tol=0.1)
        merged = StaticCudaGraphGenerate(greedy=True, lora="merged")  # nf4 dequantized into the merged copy
        out = merged.generate(model, ids, mask, sampling(24), [], PAD)
        assert merged._plan.layers[0].q.Wm is not None and merged._plan.layers[0].q.Wm.dtype == torch.bfloat16
        assert_greedy_close(model, ids, mask, out, ref, rel_tol=0.1)
