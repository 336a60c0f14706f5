"""The exported adapter loads the way social-sim loads persona adapters, and generates."""

import json

import pytest
import torch

from rlhf_lit.demo_assets import ensure_demo_assets
from rlhf_lit.export import export_adapter, export_for_social_sim


def test_social_sim_loads_the_exported_adapter_beside_another(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = ensure_demo_assets()
    base = AutoModelForCausalLM.from_pretrained(assets.base_dir, dtype=torch.float32)
    torch.manual_seed(0)
    trained = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), adapter_name="policy")
    run_adapter = export_adapter(trained, "policy", tmp_path / "run" / "adapter", base_model="builtin:demo")
    target = export_for_social_sim(run_adapter, tmp_path / "loras", cluster=13, suffix="-rlhf-tox")
    assert target.name == "Qwen2.5-7B-Instruct-lora-finetuned-13-no-focal-rlhf-tox"
    cfg = json.loads((target / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(assets.base_dir) and not cfg.get("modules_to_save")

    # social-sim: one base, a PeftModel that already holds another persona, then load_adapter(path, name)
    fresh = AutoModelForCausalLM.from_pretrained(assets.base_dir, dtype=torch.float32)
    sim = PeftModel.from_pretrained(fresh, assets.sft_adapter_dir, adapter_name="cluster_12")
    sim.load_adapter(str(target), adapter_name="cluster_13")
    sim.set_adapter("cluster_13")
    tok = AutoTokenizer.from_pretrained(assets.base_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Thoughts on the transit vote?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = sim.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = trained.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert torch.equal(out, ref)  # the same weights as the trained adapter


def test_social_sim_export_rejects_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        export_for_social_sim(tmp_path, tmp_path / "loras", cluster=13)
