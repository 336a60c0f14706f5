"""One base model, three roles: the trainable policy, the frozen reference, and the critic.

Only this file knows how adapters are attached and switched:

- With an SFT adapter (our case), it is loaded twice on the same base weights: ``reference``
  (frozen) and ``policy`` (trainable, initialised from it). The reference log-probs come from
  switching the active adapter, so there is never a second copy of the base model.
- Without one, a fresh LoRA is the policy and the reference is the base with adapters disabled.
- The critic (``critic``) is either a value head on the policy's last hidden states (default: one
  forward gives log-probs and values, no extra adapter; its gradients also shape the policy LoRA,
  scaled by ``vf_coef``), or a third adapter ``critic`` on the same base with the value head on
  *its* hidden states (value gradients never reach the policy; a second forward and backward).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Optional

import torch
from torch import Tensor, nn

from rlhf_lit import ppo
from rlhf_lit.head_logprobs import head_logprobs
from rlhf_lit.lora_precision import LoraComputeCopies, cast_adapter_

log = logging.getLogger(__name__)

POLICY, REFERENCE, CRITIC = "policy", "reference", "critic"
BUILTIN_PREFIX = "builtin:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PolicyConfig:
    """Which model and adapter to train, and how to load them."""

    base_model: str = "builtin:demo"
    """Base model: a Hub id (``Qwen/Qwen2.5-7B-Instruct``), a local folder, or ``builtin:demo`` (the
    tiny offline model built on first use)."""
    sft_adapter: Optional[str] = "builtin:demo-sft"
    """SFT LoRA adapter folder (PEFT format) used as frozen reference and as the policy's start;
    None trains a fresh LoRA against the bare base."""
    policy_adapter: Optional[str] = None
    """Start the policy from this adapter folder instead of the SFT adapter — e.g. an exported RLHF
    adapter to evaluate with ``test``. The reference stays the SFT adapter."""
    quantization: Literal["none", "nf4"] = "none"
    """``nf4``: 4-bit NormalFloat base weights with double quantization and bf16 compute
    (bitsandbytes, CUDA only); ``none``: weights in ``dtype``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Base weight dtype; ``auto`` is bfloat16 on a GPU and float32 on the CPU."""
    lora_r: int = 16
    """Rank of a fresh LoRA (used only without sft_adapter)."""
    lora_alpha: int = 16
    """Scaling numerator of a fresh LoRA."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Modules a fresh LoRA wraps."""
    train_extra_modules: bool = False
    """Train an SFT adapter's ``modules_to_save`` (e.g. extra-vocabulary embeddings) too; frozen by default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant): slower, much less memory. On for 7B."""
    compile: bool = False
    """``torch.compile`` each decoder layer for the PPO update's forward and backward: fused kernels and
    far less Python per micro-batch (the update is host-bound on a GPU). The first update pays the
    compilation (about a minute for 7B); rollouts and no-grad forwards stay eager."""
    attn_implementation: Optional[str] = "auto"
    """transformers attention kernel: ``auto`` (``flash_attention_2`` on a GPU when the flash-attn
    package is installed, else ``sdpa``), ``sdpa``, ``flash_attention_2`` or ``eager``."""
    critic: Literal["value_head", "adapter"] = "value_head"
    """The critic. ``value_head`` (default): a linear head on the policy's last hidden states, so one
    forward gives log-probs and values and no adapter memory is added; the value loss also shapes the
    policy LoRA (weighted by ``ppo.vf_coef``).
    ``adapter``: its own LoRA adapter on the same quantized base plus the head, initialised from the
    SFT adapter (else a fresh LoRA); value gradients never touch the policy, for a second forward and
    backward per micro-batch and a second trainable adapter (and its optimizer state)."""
    value_head_init_std: float = 0.0
    """Std of the value head's initial weights; 0 starts the critic at V = 0 (OpenAI 2019)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the source."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""


def resolve_model_path(name: str) -> str:
    """Map ``builtin:demo`` / ``builtin:demo-sft`` to the cached tiny assets; anything else unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    from rlhf_lit.demo_assets import ensure_demo_assets

    which = name[len(BUILTIN_PREFIX):]
    if which not in ("demo", "demo-sft"):
        raise ValueError(f"unknown built-in model {name!r}; expected 'builtin:demo' or 'builtin:demo-sft'")
    assets = ensure_demo_assets()
    return str(assets.base_dir if which == "demo" else assets.sft_adapter_dir)


def check_adapter_path(name: Optional[str], option: str = "sft_adapter") -> None:
    """Fail early, before any model loads, for an adapter folder that does not exist."""
    if name is None or name.startswith(BUILTIN_PREFIX):
        return
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"model.policy.{option}={name!r} has no adapter_config.json (expected a PEFT adapter folder)"
            )
    elif not _HUB_ID.match(name) or name.startswith("."):
        raise FileNotFoundError(f"model.policy.{option}={name!r}: no such folder (expected a PEFT adapter folder)")


class ResponseOutput(NamedTuple):
    """Per-token outputs of a forward pass over prompt + response.

    Attributes:
        logprobs: ``(B, R)`` float32 log-probs of the response tokens at the sampling temperature,
            or None when not asked.
        values: ``(B, R)`` float32 critic values, or None when not asked.
        entropy: ``(B, R)`` float32 entropies, or None when not asked.
    """

    logprobs: Optional[Tensor]
    values: Optional[Tensor]
    entropy: Optional[Tensor]


class PolicyModel(nn.Module):
    """The PEFT-wrapped causal LM plus the value head, with adapter-role switching."""

    # Adapters whose weights train (and are checkpointed); the critic's exists only with critic: adapter.
    TRAINED_ADAPTERS = (POLICY, CRITIC)

    def __init__(self, config: PolicyConfig, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.peft = _load_peft_model(config, device)
        self.has_reference_adapter = config.sft_adapter is not None
        self.has_critic_adapter = config.critic == "adapter"
        hidden = self.peft.get_base_model().config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        nn.init.normal_(self.value_head.weight, std=config.value_head_init_std)
        nn.init.zeros_(self.value_head.bias)
        _disable_dropout(self.peft)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._tuner_layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        self._aux_wrappers = [m for m in self.peft.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        self._activate(POLICY)  # one representation of the active adapter: compiled layers guard on it
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        # LoRA products run in the base's half-precision compute dtype (as autocast would run them);
        # the frozen reference is stored that way, the policy keeps fp32 masters (lora_precision.py).
        self._compiled_layers: Optional[list] = None
        self.lora_compute_dtype = _lora_compute_dtype(config, device)
        if self.lora_compute_dtype is not None and self.has_reference_adapter:
            cast_adapter_(self.peft, REFERENCE, self.lora_compute_dtype)

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def is_trainable_key(key: str) -> bool:
        """Whether a state-dict key (relative to this module) belongs to the trained weights.

        By name, not ``requires_grad``: frozen ``modules_to_save`` of a trained adapter are saved too.
        """
        adapters = "|".join(PolicyModel.TRAINED_ADAPTERS)
        return key.startswith("value_head.") or re.search(rf"\.(lora_\w+|modules_to_save)\.({adapters})\.", key) is not None

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if name in self._trainable:
                yield name, p

    @property
    def values_from_policy(self) -> bool:
        """Whether the policy's forward gives the values (``critic: value_head``); else they come
        from a forward in ``role(CRITIC)``."""
        return not self.has_critic_adapter

    @contextlib.contextmanager
    def role(self, role: str) -> Iterator[None]:
        """Run the block with the ``policy``, ``reference`` or ``critic`` weights active.

        ``critic`` is the policy itself when the critic is the value head on the policy's states."""
        if role not in (POLICY, REFERENCE, CRITIC):
            raise ValueError(f"unknown role {role!r}")
        if role == POLICY or (role == CRITIC and not self.has_critic_adapter):
            yield
            return
        if role == REFERENCE and not self.has_reference_adapter:
            role = None  # the bare base
        self._activate(role)
        try:
            yield
        finally:
            self._activate(POLICY)

    def _activate(self, adapter: Optional[str]) -> None:
        """Make ``adapter`` (None: no adapter, the bare base) the active one in every peft layer.

        Not peft's ``set_adapter``/``disable_adapter``: those also set ``requires_grad`` (freezing every
        adapter but the active one, which would stop the other trained adapter), and walk all modules
        (~15 ms on a 7B, twice per micro-batch with a critic adapter)."""
        for layer in self._tuner_layers:
            layer._active_adapter = [adapter] if adapter is not None else []
        for wrapper in self._aux_wrappers:  # modules_to_save / trainable tokens: one adapter or none
            wrapper._active_adapter = adapter if adapter in wrapper._adapters else []
        if adapter is not None:  # peft's own records (PeftModel looks its config up by this name)
            self.peft.active_adapter = self.peft.base_model.active_adapter = adapter

    @contextlib.contextmanager
    def compiled(self) -> Iterator[None]:
        """Run the block with every decoder layer compiled, when ``config.compile`` asks for it.

        The layers share one compiled code object (regional compilation: one graph serves all 28
        layers of a 7B); outside the block they run eagerly again, so sampling and no-grad forwards
        add no graphs of their own."""
        if not self.config.compile:
            yield
            return
        layers = list(self.peft.get_base_model().get_decoder().layers)
        if self._compiled_layers is None:
            self._compiled_layers = [torch.compile(layer._call_impl) for layer in layers]
        # nn.Module.__call__ runs ``_compiled_call_impl`` when set: what ``Module.compile()`` sets.
        for layer, fn in zip(layers, self._compiled_layers):
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer in layers:
                layer._compiled_call_impl = None

    def lora_compute_copies(self) -> LoraComputeCopies:
        """Context in which the trained LoRA adapters (policy, and critic if any) compute from
        half-precision copies of their fp32 weights (a no-op in fp32); call ``collect_grads()`` after
        each backward, ``refresh()`` after each step."""
        adapters = [POLICY, CRITIC] if self.has_critic_adapter else [POLICY]
        return LoraComputeCopies(self.peft, adapters, self.lora_compute_dtype)

    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        query_ids: Tensor,
        query_mask: Tensor,
        response_ids: Tensor,
        response_mask: Tensor,
        temperature: float,
        values: bool = True,
        entropy: bool = False,
        logprobs: bool = True,
    ) -> ResponseOutput:
        """Log-probs (and values, entropy) of ``response_ids`` given the left-padded prompts, from
        the active adapter.

        The decoder runs over prompt + response; the LM head runs only on the R positions that
        predict response tokens (``h[P-1 : P+R-1]``), never on the prompt, and a plain head runs
        chunked with the log-softmax, so full-vocabulary logits never exist for the whole batch.
        ``values`` reads the value head on these same hidden states: with ``critic: adapter`` ask for
        them inside ``role(CRITIC)`` (and pass ``logprobs=False`` to skip the LM head).
        """
        if values and self.has_critic_adapter and self.peft.active_adapter != CRITIC:
            raise RuntimeError("critic: adapter: values come from a forward inside role(CRITIC), "
                               "not from the policy's hidden states")
        hf = self.peft.get_base_model()
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], dim=1)
        # Left padding: positions count real tokens only, as during generation.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = hf.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        P, R = query_ids.shape[1], response_ids.shape[1]
        h = hidden[:, P - 1 : P + R - 1]
        out_values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float() if values else None
        if not logprobs:
            return ResponseOutput(None, out_values, None)
        head = hf.get_output_embeddings()
        if type(head) is nn.Linear and head.bias is None:
            # Chunked head + log-softmax: B x R x V logits never exist (rlhf_lit/head_logprobs.py).
            out_logprobs, out_entropy = head_logprobs(h, head.weight, response_ids, temperature, entropy)
        else:  # a wrapped head (peft modules_to_save, quantized, biased): plain logits
            logits = head(h)
            out_logprobs = ppo.logprobs_from_logits(logits, response_ids, temperature)
            out_entropy = ppo.entropy_from_logits(logits, temperature) if entropy else None
        return ResponseOutput(out_logprobs, out_values, out_entropy)


# -------------------------------------------------------------------------------------------
def _torch_dtype(config: PolicyConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def _lora_compute_dtype(config: PolicyConfig, device: torch.device) -> Optional[torch.dtype]:
    if config.quantization == "nf4":
        return torch.bfloat16  # the 4-bit layers' compute dtype
    dtype = _torch_dtype(config, device)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """``auto`` -> ``flash_attention_2`` on CUDA when ``flash_attn`` is importable, else ``sdpa``."""
    if name != "auto":
        return name
    import importlib.util

    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def _load_base(config: PolicyConfig, device: torch.device):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config.base_model)
    kwargs = dict(
        dtype=_torch_dtype(config, device),
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
    except OSError as e:
        raise OSError(
            f"model.policy.base_model={config.base_model!r}: could not load it as a local folder or Hub id "
            f"(offline machines need a local folder): {e}"
        ) from e
    if config.quantization == "none":
        model.to(device)
    model.config.use_cache = True
    return model


def _enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers; the old name is deprecated
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def tokenizer_path(base_model: str, sft_adapter: Optional[str]) -> str:
    """The tokenizer to use: the SFT adapter's folder when it ships one (an SFT run that added
    tokens saves its tokenizer beside the adapter), else the base model's."""
    if sft_adapter and not sft_adapter.startswith(BUILTIN_PREFIX):
        folder = Path(sft_adapter).expanduser()
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return base_model


def adapter_embedding_rows(adapter_dir: str, embedding_name: str) -> Optional[int]:
    """Rows of the input-embedding weights an adapter folder carries (``modules_to_save`` copies, or
    the whole table peft saves after a vocabulary resize), read from the file header; None if none."""
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


def _fit_vocabulary(base, config: PolicyConfig) -> None:
    """Resize the base's token embeddings (and untied LM head) to the rows the adapters carry.

    An SFT run that added tokens (or resized Qwen's padded 152,064-row table to the tokenizer's
    length) saves embeddings of another size; peft cannot load them into the base as it is. The
    rows' values come from the adapter when it loads."""
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


def _load_peft_model(config: PolicyConfig, device: torch.device):
    from peft import LoraConfig, get_peft_model

    check_adapter_path(config.sft_adapter, "sft_adapter")
    check_adapter_path(config.policy_adapter, "policy_adapter")
    base = _load_base(config, device)
    _fit_vocabulary(base, config)
    if config.gradient_checkpointing:  # after any resize: the input-grad hook sits on the embedding module
        _enable_checkpointing(base)
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
    elif config.critic != "value_head":
        raise ValueError(f"model.policy.critic={config.critic!r}: expected 'value_head' or 'adapter'")
    model.set_adapter(POLICY)
    for name, p in model.named_parameters():
        is_trained = any(f".{a}." in name for a in trained)
        is_extra = "modules_to_save" in name
        p.requires_grad_(is_trained and (not is_extra or config.train_extra_modules))
    if model.device.type != device.type and config.quantization == "none":
        model.to(device)
    return model


def _load_adapter(model, base, config: PolicyConfig, option: str, name: str, trainable: bool):
    """Load the adapter named by ``config.<option>`` as ``name`` (onto ``model``, or wrap ``base``)."""
    from peft import PeftModel

    path = resolve_model_path(getattr(config, option))
    try:
        if model is None:
            return PeftModel.from_pretrained(base, path, adapter_name=name, is_trainable=trainable)
        model.load_adapter(path, adapter_name=name, is_trainable=trainable)
        return model
    except (OSError, ValueError, RuntimeError) as e:
        raise type(e)(f"model.policy.{option}={getattr(config, option)!r} could not be loaded on "
                      f"base_model={config.base_model!r} (an adapter for another base model?): {e}") from e


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (N+ detail): with it, the KL and the PPO ratio are noise.

    Covers ``nn.Dropout`` modules (LoRA dropout included) and attention modules that read a float
    ``attention_dropout`` attribute in training mode (Qwen2, Llama, ...).
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
