"""Which base model and adapters to load, and the names of the adapter roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

#: Adapter names on the one peft model: the trained policy, the frozen SFT reference, the critic.
POLICY, REFERENCE, CRITIC = "policy", "reference", "critic"
ROLES = (POLICY, REFERENCE, CRITIC)


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
    """``torch.compile`` each decoder layer for the update's forward and backward and for the no-grad
    experience forwards (old, reference log-probs; values): fused kernels and far less Python per
    micro-batch (the update is host-bound on a GPU). The first update and the first experience
    forward of each adapter pay the compilation (about a minute for 7B); sampling stays in the
    rollout engine's own CUDA graph."""
    activation_memory_budget: Optional[float] = None
    """With ``compile`` and without ``gradient_checkpointing``: the share (0, 1] of the activations
    the compiled decoder layers keep for the backward pass, as measured by torch.compile's min-cut
    partitioner; below 1 it recomputes the cheapest ops in the backward (pointwise first: SiLU x up,
    norms, RoPE; matmuls only at low budgets) instead of saving their outputs. PyTorch's activation
    memory budget (``torch._functorch.config.activation_memory_budget``), a selective checkpointing
    between none and ``gradient_checkpointing``'s all. None: torch's default (1.0). On the H200
    GRPO benchmark (checkpointing off, micro-batch 8) the update peaked at 21.94 GiB without a
    budget; with 0.8 the run's peak was the experience phase's 21.23 GiB, for +4% update time
    (docs/benchmarks.md)."""
    attn_implementation: Optional[str] = "auto"
    """transformers attention kernel: ``auto`` (``flash_attention_2`` on a GPU when the flash-attn
    package is installed, else ``sdpa``), ``sdpa``, ``flash_attention_2`` or ``eager``."""
    critic: Literal["value_head", "adapter", "none"] = "value_head"
    """The critic. ``value_head`` (default): a linear head on the policy's last hidden states, so one
    forward gives log-probs and values and no adapter memory is added; the value loss also shapes the
    policy LoRA (weighted by ``ppo.vf_coef``).
    ``adapter``: its own LoRA adapter on the same quantized base plus the head, initialised from the
    SFT adapter (else a fresh LoRA); value gradients never touch the policy, for a second forward and
    backward per micro-batch and a second trainable adapter (and its optimizer state).
    ``none``: no critic at all (no head, no value forward or loss), for the critic-free estimators
    (``model.ppo.adv_estimator``: grpo, rloo, reinforce_plus_plus, ...)."""
    value_head_init_std: float = 0.0
    """Std of the value head's initial weights; 0 starts the critic at V = 0 (OpenAI 2019)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the source."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""

    def __post_init__(self) -> None:
        from rlhf_lit.errors import ConfigError

        budget = self.activation_memory_budget
        if budget is not None:
            number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
            if not number or not 0 < budget <= 1:
                raise ConfigError(f"model.policy.activation_memory_budget={budget!r}: expected null or a number in "
                                  f"(0, 1] (the share of activations the compiled layers keep for the backward)")
            if not self.compile:
                raise ConfigError(f"model.policy.activation_memory_budget={budget!r} needs model.policy.compile: true "
                                  f"(torch.compile's partitioner chooses what to recompute)")
            if self.gradient_checkpointing:
                raise ConfigError(f"model.policy.activation_memory_budget={budget!r} does nothing with "
                                  f"model.policy.gradient_checkpointing: true (each layer keeps only its input "
                                  f"already); set gradient_checkpointing: false, or leave the budget null")
