"""One base model, three roles: the trainable policy, the frozen reference, and the critic.

The training loop asks this module for log-probs and values through three calls that take a
:class:`~rlhf_lit.algos.rollout_batch.ResponseBatch`, and never learns how the critic is built:

- :meth:`PolicyModel.evaluate` (no grad): the policy's log-probs, entropies and the critic's values,
  or the reference's log-probs, in micro-batches;
- :meth:`PolicyModel.training_passes`: the forward passes of one training micro-batch, each to be
  backpropagated before the next is asked for;
- :meth:`PolicyModel.forward`: one forward of whichever adapter is active.

``critic`` is decided here only: a value head on the policy's own last hidden states (one forward
gives log-probs and values; its gradients also shape the policy LoRA, scaled by ``vf_coef``), a
third adapter ``critic`` with the head on *its* hidden states (value gradients never reach the
policy; a second forward and backward), or none at all (critic-free estimators: values are None).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from rlhf_lit.algos.head_logprobs import head_logprobs
from rlhf_lit.algos.logprobs import entropy_from_logits, logprobs_from_logits
from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.model.config import CRITIC, POLICY, REFERENCE, ROLES, PolicyConfig
from rlhf_lit.model.loading import disable_dropout, load_peft_model, lora_compute_dtype
from rlhf_lit.model.lora_precision import LoraComputeCopies
from rlhf_lit.model.peft_layers import AdapterSwitch, cast_adapter_


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


def _cat(outs: list[ResponseOutput]) -> ResponseOutput:
    return ResponseOutput(*(None if outs[0][i] is None else torch.cat([o[i] for o in outs]) for i in range(3)))


class PolicyModel(nn.Module):
    """The PEFT-wrapped causal LM plus the value head, with adapter-role switching.

    Args:
        config: base model, adapters and loading options.
        device: where the model lives (nf4 weights are placed at load time).
    """

    # Adapters whose weights train (and are checkpointed); the critic's exists only with critic: adapter.
    TRAINED_ADAPTERS = (POLICY, CRITIC)

    def __init__(self, config: PolicyConfig, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.peft = load_peft_model(config, device)
        self.critic = config.critic
        self.has_reference_adapter = config.sft_adapter is not None
        self.has_critic_adapter = config.critic == "adapter"
        self.value_head: Optional[nn.Linear] = None
        if config.critic != "none":
            hidden = self.peft.get_base_model().config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
            nn.init.normal_(self.value_head.weight, std=config.value_head_init_std)
            nn.init.zeros_(self.value_head.bias)
        disable_dropout(self.peft)
        self._switch = AdapterSwitch(self.peft)
        self._switch.activate(POLICY)  # one representation of the active adapter: compiled layers guard on it
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        # LoRA products run in the base's half-precision compute dtype (as autocast would run them);
        # the frozen reference is stored that way, the policy keeps fp32 masters (lora_precision.py).
        self._compiled_layers: Optional[list] = None
        self.lora_compute_dtype = lora_compute_dtype(config, device)
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

    @contextlib.contextmanager
    def role(self, role: str) -> Iterator[None]:
        """Run the block with the ``policy``, ``reference`` or ``critic`` weights active.

        ``critic`` is the policy itself when the critic is the value head on the policy's states.

        Raises:
            ValueError: an unknown role.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if role == POLICY or (role == CRITIC and not self.has_critic_adapter):
            yield
            return
        if role == REFERENCE and not self.has_reference_adapter:
            role = None  # the bare base
        self._switch.activate(role)
        try:
            yield
        finally:
            self._switch.activate(POLICY)

    @contextlib.contextmanager
    def compiled(self) -> Iterator[None]:
        """Run the block with every decoder layer compiled, when ``config.compile`` asks for it.

        The layers share one compiled code object (regional compilation: one graph serves all 28
        layers of a 7B). The update and the no-grad experience forwards (:meth:`evaluate`) run
        compiled; sampling does not (the rollout engine replays its own CUDA graph). Each adapter
        role and grad mode gets its own graph, and a second shape of each makes that graph dynamic:
        up to ~12 graphs with a critic adapter, so the recompile limit is raised to 32 (dynamo's
        default of 8 would silently fall back to eager). Outside the block the layers run eagerly.
        ``config.activation_memory_budget`` is in force inside the block."""
        if not self.config.compile:
            yield
            return
        layers = list(self.peft.get_base_model().get_decoder().layers)
        if self._compiled_layers is None:
            _raise_recompile_limit(32)
            self._compiled_layers = [torch.compile(layer._call_impl) for layer in layers]
        # nn.Module.__call__ runs ``_compiled_call_impl`` when set: what ``Module.compile()`` sets.
        for layer, fn in zip(layers, self._compiled_layers):
            layer._compiled_call_impl = fn
        budget = self.config.activation_memory_budget
        # Read when a layer's training graph is partitioned: at its first call with gradients, here.
        keep = contextlib.nullcontext() if budget is None else torch._functorch.config.patch(
            activation_memory_budget=budget)
        try:
            with keep:
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
    # What the training loop calls
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: ResponseBatch, temperature: float, role: str = POLICY,
                 micro_batch_size: Optional[int] = None, entropy: bool = False, values: bool = True) -> ResponseOutput:
        """Experience for a rollout, without gradients, ``micro_batch_size`` rows per forward.

        ``role=POLICY``: the policy's log-probs (and entropies) and, when ``values``, the critic's
        values (from the same forward with a value head, from the critic adapter's otherwise; None
        with ``critic: none``);
        ``role=REFERENCE``: the reference's log-probs (values None).

        Returns:
            ``ResponseOutput`` of ``(B, R)`` float32 tensors.
        """
        micro = micro_batch_size or batch.query_ids.shape[0]
        if role == REFERENCE:  # stored in bf16 already: no LoRA copies
            return self._forward_micro(batch, temperature, micro, REFERENCE, values=False, entropy=entropy)
        if role != POLICY:
            raise ValueError(f"evaluate() serves the policy (with its critic) or the reference, not {role!r}")
        with_head = values and self.critic == "value_head"
        out = self._forward_micro(batch, temperature, micro, POLICY, values=with_head, entropy=entropy)
        if values and self.has_critic_adapter:
            values = self._forward_micro(batch, temperature, micro, CRITIC, values=True, logprobs=False).values
            out = out._replace(values=values)
        return out

    def _forward_micro(self, batch: ResponseBatch, temperature: float, micro: int, role: str,
                       **want: bool) -> ResponseOutput:
        # The trained adapters' bf16 LoRA copies serve their own forwards; the reference is stored in bf16.
        copies = self.lora_compute_copies() if role != REFERENCE else contextlib.nullcontext()
        with self.role(role), copies, self.compiled():
            outs = [self(batch.select(slice(s, s + micro)), temperature, **want)
                    for s in range(0, batch.query_ids.shape[0], micro)]
        return _cat(outs)

    def training_passes(self, batch: ResponseBatch, temperature: float) -> Iterator[ResponseOutput]:
        """The forward passes of one training micro-batch, with gradients: log-probs in one, values
        in the same or a second one. Backpropagate each pass's loss before asking for the next: the
        critic adapter's pass stays active through its backward, where checkpointed layers recompute
        the forward under whichever adapter is active then."""
        if self.has_critic_adapter:
            yield self(batch, temperature, values=False)
            with self.role(CRITIC):
                yield self(batch, temperature, logprobs=False, values=True)
        else:
            yield self(batch, temperature, values=self.critic == "value_head")

    # ---------------------------------------------------------------------------------------
    def forward(self, batch: ResponseBatch, temperature: float, values: bool = True, entropy: bool = False,
                logprobs: bool = True) -> ResponseOutput:
        """Log-probs (and values, entropy) of ``batch.response_ids`` given the left-padded prompts,
        from the active adapter.

        The decoder runs over prompt + response; the LM head runs only on the R positions that
        predict response tokens (``h[P-1 : P+R-1]``), never on the prompt, and a plain head runs
        chunked with the log-softmax, so full-vocabulary logits never exist for the whole batch.
        ``values`` reads the value head on these same hidden states: with ``critic: adapter`` ask for
        them inside ``role(CRITIC)`` (and pass ``logprobs=False`` to skip the LM head).

        Raises:
            RuntimeError: values asked of the policy's hidden states when the critic is an adapter, or
                of a model without a critic.
        """
        if values and self.value_head is None:
            raise RuntimeError("critic: none: this model has no value head")
        if values and self.has_critic_adapter and self.peft.active_adapter != CRITIC:
            raise RuntimeError("critic: adapter: values come from a forward inside role(CRITIC), "
                               "not from the policy's hidden states")
        query_ids, query_mask, response_ids, response_mask = batch
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
            # Chunked head + log-softmax: B x R x V logits never exist (algos/head_logprobs.py).
            out_logprobs, out_entropy = head_logprobs(h, head.weight, response_ids, temperature, entropy)
        else:  # a wrapped head (peft modules_to_save, quantized, biased): plain logits
            logits = head(h)
            out_logprobs = logprobs_from_logits(logits, response_ids, temperature)
            out_entropy = entropy_from_logits(logits, temperature) if entropy else None
        return ResponseOutput(out_logprobs, out_values, out_entropy)


def _raise_recompile_limit(limit: int) -> None:
    """At least ``limit`` graphs per compiled code object (``torch._dynamo.config.recompile_limit``;
    ``cache_size_limit`` before torch 2.6)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), limit))
            return
