"""Both rollout engines record the log-prob each token was sampled with: the training forward's
log-prob when nothing filters the distribution, the filtered distribution's under top-k / top-p."""

from __future__ import annotations

import pytest
import torch

from rlhf_lit.algos.logprobs import logprobs_from_logits
from rlhf_lit.algos.responses import truncate_after_stop
from rlhf_lit.rollout import HFGenerate, SamplingConfig
from rlhf_lit.rollout.cuda_graph import StaticCudaGraphGenerate
from rlhf_lit.rollout.sampling import filter_logits
from rlhf_lit.testing.tokenizers import build_chatml_tokenizer


@pytest.fixture(scope="module")
def lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = build_chatml_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    return Qwen2ForCausalLM(cfg).eval(), tok


def forward_logits(model, ids, mask, responses):
    full = torch.cat([ids, responses.response_ids], 1)
    am = torch.cat([mask, responses.response_mask.long()], 1)
    with torch.no_grad():
        return model(input_ids=full, attention_mask=am).logits[:, ids.shape[1] - 1:-1].float()


@pytest.mark.parametrize("engine", [HFGenerate, lambda: StaticCudaGraphGenerate(sampler_logprobs=True)],
                         ids=["hf", "cuda_graph_eager"])
def test_sampler_logprobs_without_and_with_filters(lm, engine):
    model, tok = lm
    eng = engine()
    ids = torch.randint(10, len(tok) - 5, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    stops, pad = [tok.eos_token_id], tok.pad_token_id

    s = SamplingConfig(max_new_tokens=10, temperature=0.7)
    responses = truncate_after_stop(eng.generate(model, ids, mask, s, stops, pad), stops, pad)
    lp, m = eng.last_sampler_logprobs, responses.response_mask
    assert lp.shape == responses.response_ids.shape and torch.all(lp[~m] == 0)
    logits = forward_logits(model, ids, mask, responses)
    torch.testing.assert_close(lp[m], logprobs_from_logits(logits, responses.response_ids, 0.7)[m],
                               atol=1e-4, rtol=1e-4)

    s = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=5)
    responses = truncate_after_stop(eng.generate(model, ids, mask, s, stops, pad), stops, pad)
    lp, m = eng.last_sampler_logprobs, responses.response_mask
    logits = forward_logits(model, ids, mask, responses)
    filtered = torch.log_softmax(filter_logits(logits / 0.7, 5, 1.0), -1)
    want = filtered.gather(-1, responses.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp[m], want[m], atol=1e-4, rtol=1e-4)
    # the trainer's distribution is wider: the sampled tokens were likelier under the sampler
    assert (lp[m] >= logprobs_from_logits(logits, responses.response_ids, 0.7)[m] - 1e-5).all()
