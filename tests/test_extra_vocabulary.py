"""SFT adapters trained with added tokens: embeddings of another vocabulary size, and their tokenizer.

An SFT run that adds tokens resizes the embedding table and saves it with the adapter (as the whole
table, or as ``modules_to_save`` copies) next to its tokenizer. Checked here: the base is resized to
fit and the adapter loads as PEFT loads it onto a resized base, added tokens included; the adapter's
tokenizer is the one used (CLI link and module); a PPO run trains and exports plain LoRA; and the
mismatches that cannot work are named before any training.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_lit.model import REFERENCE
from rlhf_lit.paths import tokenizer_path
from rlhf_lit.algos.rollout_batch import ResponseBatch

from helpers import (  # the fixture ``assets`` is in conftest.py
    TEMPERATURE, VOCAB, batch, build_tokenizer, fast_args, hf_logprobs, masked_max_diff, policy, run_cli,
    write_adapter,
)

ADDED = [f"<tag{i}>" for i in range(8)]  # 253 tokens + 8 = 261 > the base's 256 rows
ROWS = 264


def write_grown_adapter(base_dir, out_dir, seed: int, modules_to_save=None, rows: int = ROWS) -> None:
    tok = build_tokenizer()
    tok.add_tokens(ADDED)
    write_adapter(base_dir, out_dir, seed, modules_to_save=modules_to_save, rows=rows, tokenizer=tok)


@pytest.fixture(scope="module")
def grown(assets):
    root = assets["root"]
    write_grown_adapter(assets["base"], root / "grown", seed=3)
    write_grown_adapter(assets["base"], root / "grown_mts", seed=4, modules_to_save=["embed_tokens", "lm_head"])
    return {"table": str(root / "grown"), "mts": str(root / "grown_mts")}


def peft_reference(base_dir, adapter_dir):
    """The adapter as PEFT loads it onto a base resized by hand: the independent reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(ROWS, mean_resizing=False)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("kind", ["table", "mts"])
def test_grown_adapter_loads_with_its_added_tokens(assets, grown, kind):
    pm = policy(assets, sft_adapter=grown[kind])
    emb = pm.peft.get_base_model().get_input_embeddings()
    assert emb.weight.shape[0] == ROWS
    q, qm, r, rm = batch(8)
    n = r[:, ::2].numel()
    r[:, ::2] = (VOCAB + torch.arange(n) % (ROWS - VOCAB)).reshape(r[:, ::2].shape)  # rows the base did not have
    b = (q, qm, r, rm)
    pm.eval()
    with torch.no_grad(), pm.role(REFERENCE):
        ref_lp = pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs
    want = hf_logprobs(peft_reference(assets["base"], grown[kind]), *b)
    assert masked_max_diff(ref_lp, want, rm.float()) < 1e-5
    # The policy starts as the same adapter.
    with torch.no_grad():
        assert masked_max_diff(pm(ResponseBatch(*b), TEMPERATURE, values=False).logprobs, want, rm.float()) < 1e-5


def test_the_adapters_tokenizer_is_used(assets, grown):
    assert tokenizer_path(assets["base"], grown["table"]) == grown["table"]
    assert tokenizer_path(assets["base"], assets["sft"]) == assets["base"]  # no tokenizer in that folder
    assert tokenizer_path("builtin:demo", "builtin:demo-sft") == "builtin:demo"


def test_fit_with_a_grown_adapter_trains_and_exports_plain_lora(assets, grown, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    cli = run_cli("fit", *fast_args(run_dir, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                                    "--trainer.limit_val_batches=0", "--model.policy.dtype=float32",
                                    f"--model.policy.base_model={assets['base']}",
                                    f"--model.policy.sft_adapter={grown['table']}",
                                    f"--data.prompt_file={assets['prompts']}", "--data.val_fraction=0",
                                    "--data.test_fraction=0", "--model.extra_stop_tokens=[]"))
    assert cli.datamodule.tokenizer_name == grown["table"]
    assert len(cli.model.tokenizer) == len(cli.datamodule.tokenizer) == 253 + len(ADDED)
    assert cli.model.model.peft.get_base_model().get_input_embeddings().weight.shape[0] == ROWS
    exported = load_file(next(run_dir.rglob("adapter_model.safetensors")))
    assert exported and all("lora_" in k for k in exported)


def test_a_tokenizer_larger_than_the_embedding_is_named(assets, tmp_path):
    from rlhf_lit.stages import PPOModule
    from rlhf_lit.model import PolicyConfig

    # Added tokens, but the adapter kept no embeddings: sampled ids would run past the table.
    write_grown_adapter(assets["base"], tmp_path / "no_table", seed=5)
    for f in tmp_path.joinpath("no_table").glob("adapter_model.safetensors"):
        from safetensors.torch import load_file, save_file

        save_file({k: v for k, v in load_file(f).items() if "lora_" in k}, f)
    module = PPOModule(policy=PolicyConfig(base_model=assets["base"], sft_adapter=str(tmp_path / "no_table"),
                                           dtype="float32"), rollout_batch_size=4)
    with pytest.raises(ValueError, match="has 261 tokens but the model's embedding 256 rows"):
        module.configure_model()


def test_adapters_of_two_vocabularies_are_named(assets, grown, tmp_path):
    write_grown_adapter(assets["base"], tmp_path / "wider", seed=6, rows=ROWS + 8)
    with pytest.raises(ValueError, match="different vocabulary sizes") as e:
        policy(assets, sft_adapter=grown["table"], policy_adapter=str(tmp_path / "wider"))
    assert str(ROWS) in str(e.value) and str(ROWS + 8) in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grown_adapter_on_an_nf4_base_samples_with_the_fast_engine(assets, grown):
    pytest.importorskip("bitsandbytes")
    from rlhf_lit.rollout.cuda_graph import StaticCudaGraphGenerate
    from rlhf_lit.rollout import SamplingConfig

    from rlhf_lit.model import PolicyConfig, PolicyModel

    pm = PolicyModel(PolicyConfig(base_model=assets["base"], sft_adapter=grown["table"], quantization="nf4",
                                  dtype="bfloat16"), torch.device("cuda"))
    assert pm.peft.get_base_model().get_input_embeddings().weight.shape[0] == ROWS
    q, qm, _, _ = (t.cuda() for t in batch(9))
    sampling = SamplingConfig(max_new_tokens=8, min_new_tokens=8, temperature=1.0)
    pm.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        r = StaticCudaGraphGenerate().generate(pm.peft, q, qm, sampling, [252], 250)
        lp = pm(ResponseBatch(q, qm, r, torch.ones_like(r, dtype=torch.bool)), 1.0, values=False).logprobs
    assert r.shape == (q.shape[0], 8) and int(r.max()) < ROWS
    assert torch.isfinite(lp).all()
