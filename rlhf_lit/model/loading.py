"""Loading the base model and the adapters onto it: one base copy, named adapters, dropout off.

- With an SFT adapter (our case), it is loaded twice on the same base weights: ``reference``
  (frozen) and ``policy`` (trainable, initialised from it). Without one, a fresh LoRA is the policy
  and the reference is the base with adapters disabled.
- ``critic: adapter`` adds a third adapter ``critic`` (from the SFT adapter, else a fresh LoRA).
- An adapter trained with added tokens carries embeddings of another row count: the base's table
  is resized to fit before the adapter loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhf_lit.model.config import CRITIC, POLICY, REFERENCE, PolicyConfig
from rlhf_lit.errors import ConfigError
from rlhf_lit.paths import check_adapter_path, check_model_path, resolve_model_path

log = logging.getLogger(__name__)


def torch_dtype(config: PolicyConfig, device: torch.device) -> torch.dtype:
    """The base weights' dtype: ``config.dtype``, where ``auto`` is bf16 on a GPU and fp32 on the CPU."""
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def lora_compute_dtype(config: PolicyConfig, device: torch.device) -> Optional[torch.dtype]:
    """The half-precision dtype LoRA products run in (bf16 under nf4), or None in fp32."""
    if config.quantization == "nf4":
        return torch.bfloat16  # the 4-bit layers' compute dtype
    dtype = torch_dtype(config, device)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """``auto`` -> ``flash_attention_2`` on CUDA when ``flash_attn`` is importable, else ``sdpa``."""
    if name != "auto":
        return name
    import importlib.util

    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def load_base(config: PolicyConfig, device: torch.device):
    """The base causal LM on ``device`` (nf4 quantized, or in ``config.dtype``).

    Raises:
        ValueError: nf4 without a CUDA device.
        ConfigError: naming ``model.policy.base_model``, when it loads neither as a folder nor as a
            Hub id, or the folder is damaged (cut-short weights, a bad config.json, weights of
            other shapes than its config says).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config.base_model)
    kwargs = dict(
        dtype=torch_dtype(config, device),
        trust_remote_code=config.trust_remote_code,
        revision=config.revision,
    )
    if config.attn_implementation:
        kwargs["attn_implementation"] = resolve_attn_implementation(config.attn_implementation, device)
    if config.quantization == "nf4":
        if device.type != "cuda":
            raise ValueError("model.policy.quantization=nf4 needs a CUDA GPU (bitsandbytes); use 'none' on the CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        # Quantized weights are placed at load time; Lightning must not move them afterwards.
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001  (filtered: only the folder's own problems are re-worded)
        # A damaged or mismatched folder (cut-short weights, a config.json that is not JSON or that
        # disagrees with the weights) is the user's input: name the option, the folder and the cause.
        damaged = isinstance(e, (OSError, ValueError, KeyError)) or "safetensors" in type(e).__module__ or (
            isinstance(e, RuntimeError) and ("size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e)))
        if not damaged:
            raise
        raise ConfigError(
            f"model.policy.base_model={config.base_model!r} could not be loaded from {str(path)!r} (a folder "
            f"with config.json and complete weights, or a Hub id; offline machines need a local folder): "
            f"{type(e).__name__}: {str(e)[:600]}"
        ) from e
    if config.quantization == "none":
        model.to(device)
    model.config.use_cache = True
    return model


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the decoder layers, inputs requiring grad."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers; the old name is deprecated
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def adapter_embedding_rows(adapter_dir: str, embedding_name: str) -> Optional[int]:
    """Rows of the input-embedding weights an adapter folder carries (``modules_to_save`` copies, or
    the whole table peft saves after a vocabulary resize), read from the file header; None if none.

    Raises:
        ValueError: the folder's embedding tensors disagree on the row count.
    """
    folder = Path(adapter_dir).expanduser()
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    elif binary.is_file():
        shapes = {k: list(v.shape) for k, v in torch.load(binary, map_location="meta", weights_only=True).items()}
    else:
        return None  # a Hub id: peft fetches it, and reports a mismatch itself
    rows = {shape[0] for k, shape in shapes.items() if f"{embedding_name}." in k and "lora_" not in k}
    if len(rows) > 1:
        raise ValueError(f"{adapter_dir}: its {embedding_name} tensors disagree on the vocabulary size ({sorted(rows)})")
    return rows.pop() if rows else None


def fit_vocabulary(base, config: PolicyConfig) -> None:
    """Resize the base's token embeddings (and untied LM head) to the rows the adapters carry.

    An SFT run that added tokens (or resized Qwen's padded 152,064-row table to the tokenizer's
    length) saves embeddings of another size; peft cannot load them into the base as it is. The
    rows' values come from the adapter when it loads.

    Raises:
        ValueError: ``sft_adapter`` and ``policy_adapter`` carry different vocabulary sizes.
    """
    emb = base.get_input_embeddings()
    name = next(n for n, m in base.named_modules() if m is emb)
    found = {}
    for option in ("sft_adapter", "policy_adapter"):
        value = getattr(config, option)
        if value is not None:
            rows = adapter_embedding_rows(resolve_model_path(value), name)
            if rows is not None:
                found[option] = rows
    if len(set(found.values())) > 1:
        raise ValueError(f"model.policy.sft_adapter and model.policy.policy_adapter carry embeddings of different "
                         f"vocabulary sizes ({found}); they must come from one tokenizer")
    if not found:
        return
    rows, have = next(iter(found.values())), emb.weight.shape[0]
    if rows != have:
        log.info("resizing the base vocabulary from %d to %d rows to fit the adapter's embeddings", have, rows)
        base.resize_token_embeddings(rows, mean_resizing=False)


def load_peft_model(config: PolicyConfig, device: torch.device):
    """The peft model: base + ``reference`` (frozen) + ``policy`` (+ ``critic``), policy active, the
    trained adapters' LoRA weights (and nothing else) requiring grad.

    Raises:
        FileNotFoundError: a missing adapter folder (before the base loads).
        ValueError: an unknown ``critic``.
    """
    from peft import LoraConfig, get_peft_model

    check_model_path(config.base_model, revision=config.revision)
    check_adapter_path(config.sft_adapter, "sft_adapter")
    check_adapter_path(config.policy_adapter, "policy_adapter")
    base = load_base(config, device)
    fit_vocabulary(base, config)
    if config.gradient_checkpointing:  # after any resize: the input-grad hook sits on the embedding module
        enable_checkpointing(base)
    fresh_lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM",
    )
    if config.sft_adapter is None and config.policy_adapter is None:
        model = get_peft_model(base, fresh_lora, adapter_name=POLICY)
    elif config.sft_adapter is None:
        model = _load_adapter(None, base, config, "policy_adapter", POLICY, trainable=True)
    else:
        model = _load_adapter(None, base, config, "sft_adapter", REFERENCE, trainable=False)
        _load_adapter(model, base, config, "policy_adapter" if config.policy_adapter else "sft_adapter",
                      POLICY, trainable=True)
    trained = [POLICY]
    if config.critic == "adapter":
        # The critic starts from what the SFT run learned about these texts, like the policy.
        if config.sft_adapter is not None:
            _load_adapter(model, base, config, "sft_adapter", CRITIC, trainable=True)
        else:
            model.add_adapter(CRITIC, fresh_lora)
        trained.append(CRITIC)
    elif config.critic not in ("value_head", "none"):
        raise ValueError(f"model.policy.critic={config.critic!r}: expected 'value_head', 'adapter' or 'none'")
    model.set_adapter(POLICY)
    for name, p in model.named_parameters():
        is_trained = any(f".{a}." in name for a in trained)
        is_extra = "modules_to_save" in name
        p.requires_grad_(is_trained and (not is_extra or config.train_extra_modules))
    if model.device.type != device.type and config.quantization == "none":
        model.to(device)
    return model


def _load_adapter(model, base, config: PolicyConfig, option: str, name: str, trainable: bool):
    """Load the adapter named by ``config.<option>`` as ``name`` (onto ``model``, or wrap ``base``),
    then check that its LoRA weights and the base's modules match one to one.

    Raises:
        ConfigError: naming the option, the adapter and the base model: peft could not load it, or
            (:func:`check_adapter_fits`) some of its weights have no module in the base or some of
            the modules it adapts got no weights.
    """
    from peft import PeftModel

    value = getattr(config, option)
    path = resolve_model_path(value)
    try:
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name, is_trainable=trainable)
        else:
            model.load_adapter(path, adapter_name=name, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"model.policy.{option}={value!r} could not be loaded on base_model={config.base_model!r} "
                          f"(an adapter for another base model?): {type(e).__name__}: {e}") from e
    check_adapter_fits(model, name, path, f"model.policy.{option}={value!r}", config.base_model)
    return model


def _saved_lora_keys(adapter_dir: str) -> Optional[set[str]]:
    """Names of the LoRA tensors an adapter folder holds (from the file header), or None for a Hub id."""
    folder = Path(adapter_dir).expanduser()
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            keys = set(f.keys())
    elif binary.is_file():
        keys = set(torch.load(binary, map_location="meta", weights_only=True))
    else:
        return None
    return {k for k in keys if "lora_" in k}


def _as_loaded(saved_key: str, adapter: str) -> str:
    """peft's renaming of a saved LoRA key to the loaded parameter of ``adapter``:
    ``...q_proj.lora_A.weight`` -> ``...q_proj.lora_A.<adapter>.weight``."""
    head, sep, tail = saved_key.partition("lora_")
    kind, dot, rest = tail.partition(".")
    return f"{head}{sep}{kind}.{adapter}" + (f".{rest}" if dot else "")


def check_adapter_fits(model, adapter: str, path: str, where: str, base_model: str) -> None:
    """Every LoRA tensor the adapter folder holds found its module in the base, and every module
    peft wrapped for it got its tensors. peft skips the first kind silently (a LoRA of a 4-layer
    model of the same width "loads" on a 2-layer base) and leaves the second at its initialisation.

    Raises:
        ConfigError: naming the adapter, the base it was saved for and the configured base.
    """
    saved = _saved_lora_keys(path)
    if saved is None:
        return
    params = {n for n, _ in model.named_parameters() if ".lora_" in n and f".{adapter}." in n}
    params |= {n for n, _ in model.named_buffers() if ".lora_" in n and f".{adapter}." in n}
    loaded = {_as_loaded(k, adapter): k for k in saved}
    unexpected = sorted(v for k, v in loaded.items() if k not in params)
    missing = sorted(p for p in params if p not in loaded)
    if not unexpected and not missing:
        return
    try:
        recorded = json.loads((Path(path).expanduser() / "adapter_config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        recorded = {}
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} of its {len(saved)} LoRA tensors have no module in the base (e.g. {unexpected[0]!r})")
    if missing:
        parts.append(f"{len(missing)} LoRA weights of the modules it targets are not in it (e.g. {missing[0]!r})")
    raise ConfigError(
        f"{where} does not fit base_model={base_model!r}: {'; '.join(parts)}. The adapter was saved for "
        f"{recorded.get('base_model_name_or_path')!r} (target_modules {recorded.get('target_modules')}); train "
        f"or choose an adapter of the configured base, or set model.policy.base_model to the adapter's"
    )


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (N+ detail): with it, the KL and the PPO ratio are noise.

    Covers ``nn.Dropout`` modules (LoRA dropout included) and attention modules that read a float
    ``attention_dropout`` attribute in training mode (Qwen2, Llama, ...).
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
