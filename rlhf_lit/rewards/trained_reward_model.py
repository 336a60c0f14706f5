"""A reward model trained by the reward-model stage, loaded from its exported folder by path.

The folder (:func:`rlhf_lit.export.export_reward_model`) holds the LoRA adapter, the scalar head, the
tokenizer and a manifest naming the base model and the prompt template. Scoring rebuilds exactly
what training read: the prompt chat-templated with the manifest's system prompt and the generation
prompt, the response's tokens plus EOS, one forward of base + adapter, the head read after the EOS.
So a PPO/GRPO run can maximise the moderator-preference model with ``--model.reward`` set to it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.algos.sequence_scores import score_after_last_token, with_trailing_pad
from rlhf_lit.export import RM_HEAD, read_reward_model_manifest
from rlhf_lit.model import PolicyConfig, PolicyModel
from rlhf_lit.errors import ConfigError, InputFileError, MissingPathError, UserError
from rlhf_lit.paths import check_adapter_path
from rlhf_lit.tokenizer import load_tokenizer, reconcile_special_tokens

from .base import RewardBackend, RewardOutput
from .offload import HostOffload

log = logging.getLogger(__name__)


class TrainedRewardModel(RewardBackend):
    """Scores (prompt, response) text with a reward model exported by ``RewardModelModule``.

    Args:
        path: The exported folder (``reward_model.json``, ``adapter/``, ``head.safetensors``, ``tokenizer/``).
        base_model: The base model to load the adapter on; default: the manifest's (a Hub id, a
            ``builtin:`` name or a folder). Give a local folder of the same model on an offline machine.
        quantization: ``nf4`` (4-bit base, bitsandbytes, CUDA) or ``none``.
        dtype: Base weight dtype: ``auto`` (bf16 on a GPU, fp32 on the CPU), float32, bfloat16, float16.
        attn_implementation: ``auto``, ``sdpa``, ``flash_attention_2`` or ``eager`` (offloaded bf16 weights
            load on the CPU, where ``auto`` is ``sdpa``).
        batch_size: (prompt, response) pairs per forward.
        max_prompt_tokens: Longer templated prompts keep their last tokens; default: the manifest's.
        max_response_tokens: Longer responses keep their first tokens (then EOS); default: the manifest's.
        device: None: the trainer's device given to ``setup``; ``cpu`` forces the CPU.
        offload: On a GPU, keep the weights (nf4 ones included) in pinned CPU memory and copy them to
            the GPU only while scoring: the policy's rollout and update get that memory.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``trained_rm``.
    """

    default_name = "trained_rm"

    def __init__(
        self,
        path: str,
        base_model: Optional[str] = None,
        quantization: Literal["none", "nf4"] = "none",
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        attn_implementation: Optional[str] = "auto",
        batch_size: int = 16,
        max_prompt_tokens: Optional[int] = None,
        max_response_tokens: Optional[int] = None,
        device: Optional[str] = None,
        offload: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(batch_size) < 1:
            raise ConfigError(f"TrainedRewardModel {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.path = path
        # Checked here, when the CLI builds the backend: before the policy's model loads.
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise MissingPathError(f"TrainedRewardModel {self.name!r}: path={path!r} is not a folder (expected the "
                                   f"'reward_model' folder a reward-model run exports: <its model.output_dir>)")
        try:
            manifest = read_reward_model_manifest(folder)
        except (OSError, ValueError) as e:
            raise InputFileError(f"TrainedRewardModel {self.name!r} (path={path!r}): {e}") from None
        # Its adapter is no model.policy.* option of the user's: name this backend instead.
        check_adapter_path(str(folder / manifest["adapter"]), where=f"TrainedRewardModel {self.name!r} "
                           f"(path={path!r}): its adapter {folder / manifest['adapter']}")
        self.base_model, self.quantization, self.dtype = base_model, quantization, dtype
        self.attn_implementation = attn_implementation
        self.batch_size = int(batch_size)
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.device_option, self.offload = device, bool(offload)
        self.manifest: Optional[dict] = None
        self._model: Optional[PolicyModel] = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._on_device: Any = contextlib.nullcontext()

    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def _load(self) -> None:
        if self._model is not None:
            return
        from safetensors.torch import load_file

        folder = Path(self.path).expanduser()
        manifest = read_reward_model_manifest(folder)
        device = torch.device(self.device_option) if self.device_option else self.device
        offload = self.offload and device.type == "cuda"
        # Offloaded full-precision weights load straight into host memory (no transient GPU copy beside
        # the policy); 4-bit weights are quantized on the GPU by bitsandbytes, then moved out.
        load_on = torch.device("cpu") if offload and self.quantization == "none" else device
        dtype = "bfloat16" if load_on != device and self.dtype == "auto" else self.dtype
        config = PolicyConfig(
            base_model=self.base_model or manifest["base_model"], sft_adapter=None,
            policy_adapter=str(folder / manifest["adapter"]), quantization=self.quantization, dtype=dtype,
            attn_implementation=self.attn_implementation, critic="value_head", revision=manifest.get("revision"))
        try:
            model = PolicyModel(config, load_on)
        except UserError as e:  # its messages name model.policy.*: here they are this backend's
            detail = str(e).replace(f"model.policy.policy_adapter={config.policy_adapter!r}",
                                    f"its adapter {config.policy_adapter}")
            raise ConfigError(f"TrainedRewardModel {self.name!r} (path={self.path!r}, base_model={config.base_model!r} "
                              f"from {'base_model' if self.base_model else 'its manifest'}): {detail}") from None
        head = load_file(str(folder / manifest["head"]))
        if tuple(head["weight"].shape) != tuple(model.value_head.weight.shape):
            raise InputFileError(f"{folder / RM_HEAD}: a head for hidden size {tuple(head['weight'].shape)[1]}, but "
                             f"base_model={config.base_model!r} has {model.value_head.weight.shape[1]}")
        with torch.no_grad():
            model.value_head.weight.copy_(head["weight"])
            model.value_head.bias.copy_(head["bias"])
        model.requires_grad_(False).eval()
        self._tokenizer = load_tokenizer(str(folder / manifest["tokenizer"]))
        hf = model.peft.get_base_model()
        reconcile_special_tokens(self._tokenizer, hf.config, f"TrainedRewardModel {self.name!r} ({str(folder)!r})",
                                 hf.get_input_embeddings().weight.shape[0])
        self.max_prompt_tokens = self.max_prompt_tokens or manifest.get("max_prompt_tokens") or 1024
        self.max_response_tokens = self.max_response_tokens or manifest.get("max_response_tokens") or 1024
        if offload:
            self._on_device = HostOffload(model, device)
        self._model, self._device, self.manifest = model, device, manifest

    # ---------------------------------------------------------------------------------------
    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Token ids of the templated prompt and of the response + EOS, as the stage trained on them
        (over-long prompts keep their end, over-long responses their start)."""
        tok, system = self._tokenizer, self.manifest.get("system_prompt")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        q = tok(text, add_special_tokens=False)["input_ids"][-self.max_prompt_tokens:]
        r = tok(response.strip(), add_special_tokens=False)["input_ids"][: self.max_response_tokens - 1]
        return q, r + [tok.eos_token_id]

    def _batch(self, encoded: list[tuple[list[int], list[int]]]) -> ResponseBatch:
        pad = self._tokenizer.pad_token_id
        P, R = max(len(q) for q, _ in encoded), max(len(r) for _, r in encoded)
        q_ids = torch.full((len(encoded), P), pad, dtype=torch.long)
        q_mask = torch.zeros((len(encoded), P), dtype=torch.long)
        r_ids = torch.full((len(encoded), R), pad, dtype=torch.long)
        r_mask = torch.zeros((len(encoded), R), dtype=torch.bool)
        for i, (q, r) in enumerate(encoded):
            q_ids[i, P - len(q):], q_mask[i, P - len(q):] = torch.tensor(q), 1
            r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(r), True
        batch = ResponseBatch(q_ids, q_mask, r_ids, r_mask)
        return with_trailing_pad(ResponseBatch(*(t.to(self._device) for t in batch)), pad)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        self._load()
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out = []
        with self._on_device, self._model.lora_compute_copies():
            for i in range(0, len(encoded), self.batch_size):
                batch = self._batch(encoded[i:i + self.batch_size])
                values = self._model(batch, 1.0, values=True, logprobs=False).values
                out.append(score_after_last_token(values, batch.response_mask).float().cpu())
        scores = torch.cat(out) if out else torch.zeros(0)
        return RewardOutput(scores, torch.ones(len(scores), dtype=torch.bool), {self.name: scores.clone()}, {})

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_model=None, _tokenizer=None, _on_device=contextlib.nullcontext())
        return state
