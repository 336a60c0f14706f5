"""Issue 18, items 1-3: model and adapter paths, adapters of another model, tokenizer/config
disagreements. Each error names the option, the path and what is wrong, before the base loads."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from helpers import TARGETS, build_tokenizer, fast_args, policy, run_cli, tiny_qwen2
from rlhf_lit.errors import ConfigError, InputFileError, MissingPathError
from rlhf_lit.paths import check_adapter_path, check_model_path

pytestmark = pytest.mark.usefixtures("forbid_network")


@pytest.fixture
def online(monkeypatch):
    """The Hub switched on (so a lookup would be tried), with every lookup and connection counted;
    forbid_network still makes them fail."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    calls = []
    lookup, connect = socket.getaddrinfo, socket.socket.connect
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (calls.append(host), lookup(host, *a, **k))[1])
    monkeypatch.setattr(socket.socket, "connect", lambda s, addr: (calls.append(addr), connect(s, addr))[1])
    return calls


# --------------------------------------------------------------------------------------- item 1
def test_missing_local_looking_adapter_fails_at_once_without_network(tmp_path, monkeypatch, online):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()  # social-sim's adapters folder: "loras/cluster13" is a path here
    for name in ("loras/cluster13", "./cluster13", "../x/cluster13", "outputs/run/adapter"):
        t0 = time.perf_counter()
        with pytest.raises(MissingPathError) as e:
            check_adapter_path(name)
        msg = str(e.value)
        assert f"model.policy.sft_adapter={name!r}" in msg and "no such folder" in msg and str(tmp_path) in msg, msg
        assert time.perf_counter() - t0 < 1
    assert online == [], f"network attempted: {online}"


def test_hub_shaped_adapter_is_not_looked_up_offline(tmp_path, monkeypatch, online):
    import huggingface_hub.constants as hf_constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    name = "Qwen/Qwen2.5-7B-Instruct-lora-finetuned-13-no-focal"  # the README's, before it is unpacked
    with pytest.raises(MissingPathError, match="HF_HUB_OFFLINE") as e:
        check_adapter_path(name)
    assert name in str(e.value) and online == []
    # online, one lookup and no retries: a clear error in well under the 36 s of five retries
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(MissingPathError, match="could not be asked"):
        check_adapter_path(name)
    assert time.perf_counter() - t0 < 10


def test_adapter_folder_problems_are_named(assets, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((Path(assets["sft"]) / "adapter_config.json").read_text())
    with pytest.raises(MissingPathError, match=r"no_weights.*has adapter_config.json but no adapter_model.safetensors"):
        check_adapter_path(str(no_weights))

    truncated = tmp_path / "truncated"
    shutil.copytree(assets["sft"], truncated)
    st = truncated / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(InputFileError, match=r"model.policy.policy_adapter=.*adapter_model.safetensors is damaged"):
        check_adapter_path(str(truncated), "policy_adapter")

    broken = tmp_path / "broken"
    shutil.copytree(assets["sft"], broken)
    (broken / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}\n')
    with pytest.raises(InputFileError) as e:
        check_adapter_path(str(broken))
    assert f"{broken / 'adapter_config.json'}:3:" in str(e.value) and "not valid JSON" in str(e.value)


def test_base_model_problems_are_named(tmp_path, monkeypatch, online):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingPathError, match=r"model.policy.base_model='models/qwen/weights': no such folder"):
        check_model_path("models/qwen/weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match=r"model.policy.base_model='empty' has no config.json"):
        check_model_path("empty")
    assert online == []


def test_cli_names_the_base_model_before_loading_anything(tmp_path, monkeypatch):
    import rlhf_lit.stages.base as stage_base

    monkeypatch.setattr(stage_base, "PolicyModel", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(MissingPathError, match="model.policy.base_model='./no-such-base'"):
        run_cli("fit", *fast_args(tmp_path / "run", "--model.policy.base_model=./no-such-base",
                                  "--model.policy.sft_adapter=null"))


def test_adapter_load_error_keeps_its_message(assets, tmp_path):
    """The old wrapper rebuilt the exception with one argument (JSONDecodeError needs three)."""
    odd = tmp_path / "odd"
    shutil.copytree(assets["sft"], odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["r"] = 8  # the saved tensors have rank 4: peft fails on the shapes
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model.policy.sft_adapter=.*could not be loaded on base_model"):
        policy(assets, sft_adapter=str(odd))


# --------------------------------------------------------------------------------------- item 2
def _adapter_of(layers: int, root, base_dir) -> str:
    """A q/v LoRA saved from a ``layers``-layer Qwen2 of the demo base's width."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    cfg = tiny_qwen2().config
    cfg.num_hidden_layers = layers
    cfg.layer_types = ["full_attention"] * layers
    model = Qwen2ForCausalLM(cfg)
    other = root / f"base{layers}"
    model.save_pretrained(other)
    model = Qwen2ForCausalLM.from_pretrained(other)  # the adapter records the base it was trained on
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = root / f"lora{layers}"
    pm.save_pretrained(out)
    return str(out)


def test_adapter_of_another_model_is_refused_naming_both(assets, tmp_path):
    deeper = _adapter_of(4, tmp_path, assets["base"])
    with pytest.raises(ConfigError) as e:
        policy(assets, sft_adapter=deeper)
    msg = str(e.value)
    print("\n4-layer adapter on the 2-layer base:", msg)
    assert f"model.policy.sft_adapter={deeper!r} does not fit base_model={assets['base']!r}" in msg
    assert "have no module in the base" in msg and "layers.2" in msg and str(tmp_path / "base4") in msg


def test_adapter_that_covers_part_of_the_base_is_refused(assets, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets["base"])
    base.config.num_hidden_layers = 1
    base.config.layer_types = base.config.layer_types[:1]
    base.model.layers = base.model.layers[:1]
    out = tmp_path / "one_layer"
    get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(out)
    with pytest.raises(ConfigError, match="are not in it"):
        policy(assets, sft_adapter=str(out))


# --------------------------------------------------------------------------------------- item 3
def test_policy_config_pad_is_reconciled_with_a_log_line(assets, tmp_path, caplog):
    from rlhf_lit.tokenizer import reconcile_special_tokens

    model = tiny_qwen2()
    model.config.pad_token_id = 7  # a word of the tokenizer, not its PAD (250)
    with caplog.at_level(logging.INFO, logger="rlhf_lit"):
        reconcile_special_tokens(build_tokenizer(), model.config, "model.policy (base_model='x')")
    assert model.config.pad_token_id == 250
    assert "pad_token_id 7" in caplog.text and "250 ('<|endoftext|>')" in caplog.text

    small = tiny_qwen2()
    with pytest.raises(ConfigError, match="the tokenizer has 300 tokens but the model's embedding 256 rows"):
        reconcile_special_tokens(build_tokenizer(n_words=297), small.config, "model.policy (base_model='x')")


def test_reward_model_pad_disagreement_no_longer_depends_on_the_batch(tmp_path, caplog):
    """A causal-LM reward model finds each row's last token by config.pad_token_id: when it is not
    the tokenizer's PAD, a short response's score changes with the longest one in its batch."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from rlhf_lit.rewards import RewardModel

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=7, eos_token_id=252)
    torch.manual_seed(0)
    folder = tmp_path / "rm"
    Qwen2ForSequenceClassification(cfg).save_pretrained(folder)
    tok.padding_side = "right"
    tok.save_pretrained(folder)
    rm = RewardModel(str(folder), label=0, input="response")
    with caplog.at_level(logging.WARNING, logger="rlhf_lit"):
        rm.setup("cpu")
    alone = rm(["p"], [" w10 w11"]).scores
    batched = rm(["p", "p"], [" w10 w11", " w12 w13 w14 w15 w16 w17 w18 w19"]).scores
    assert "pad_token_id 7" in caplog.text and "RewardModel 'reward_model'" in caplog.text
    torch.testing.assert_close(batched[0], alone[0])


def test_a_damaged_base_model_folder_is_named(assets, tmp_path):
    """Cut-short weights and a config.json that is not JSON: the option, the folder and the cause."""
    broken = tmp_path / "base"
    shutil.copytree(assets["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"model\.policy\.base_model='.*base' could not be loaded from .*"
                                          r"complete weights"):
        policy(assets, base_model=str(broken))
    shutil.copy(Path(assets["base"]) / "model.safetensors", weights)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.policy\.base_model='.*base'"):
        policy(assets, base_model=str(broken))
