"""Any ``AutoModelForSequenceClassification`` folder as a reward: classifiers and trained reward models."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from rlhf_lit.paths import check_model_path
from rlhf_lit.tokenizer import reconcile_special_tokens

from .base import RewardBackend, RewardOutput
from .offload import HostOffload

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModel(RewardBackend):
    """The logit (or probability) of one label of a sequence classifier loaded from a local folder.

    Works for classifiers (sentiment, toxicity: ``transform: sigmoid`` or ``softmax``) and for reward
    models with one output (``label: 0``, ``transform: raw``).

    Args:
        model_path: Local folder with the classifier and its tokenizer (``save_pretrained`` layout).
        label: Output to use: an index, or a label name from the model's ``config.id2label``.
        transform: ``raw`` logit, ``sigmoid`` of the logit, or ``softmax`` over all labels.
        input: What the classifier reads: ``response`` alone; ``pair``: (prompt, response) as a
            tokenizer text pair; ``concat``: ``prompt + separator + response``; ``chat``: a user/assistant
            conversation through the tokenizer's chat template (reward models trained on chats).
        separator: Text between prompt and response for ``input: concat``.
        batch_size: Texts per forward pass.
        max_length: Inputs are truncated to this many tokens.
        truncation_side: Which end is cut when an input is too long; ``left`` keeps the end of the
            response (the token a causal-LM reward model reads).
        device: Device of the classifier; None uses the trainer's device given to ``setup``; ``cpu``
            forces the CPU.
        offload: On a GPU, keep the weights in pinned CPU memory and copy them to the GPU only while
            scoring (about 0.05 s per GB each rollout): the policy's rollout and update get that memory.
        dtype: Weights dtype: float32, bfloat16, float16, or auto (the checkpoint's).
        trust_remote_code: Allow code shipped in the model folder to run. Off by default: only turn it
            on for folders you trust.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``reward_model``.
    """

    default_name = "reward_model"

    def __init__(
        self,
        model_path: str,
        label: Union[int, str] = 0,
        transform: Literal["raw", "sigmoid", "softmax"] = "raw",
        input: Literal["response", "pair", "concat", "chat"] = "response",
        separator: str = "\n",
        batch_size: int = 16,
        max_length: int = 512,
        truncation_side: Literal["right", "left"] = "right",
        device: Optional[str] = None,
        offload: bool = False,
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        who = f"RewardModel {self.name!r}"
        for opt, value, allowed in (
            ("transform", transform, ("raw", "sigmoid", "softmax")),
            ("input", input, ("response", "pair", "concat", "chat")),
            ("truncation_side", truncation_side, ("right", "left")),
            ("dtype", dtype, (*_DTYPES, "auto")),
        ):
            if value not in allowed:
                raise ValueError(f"{who}: {opt} must be one of {list(allowed)}, got {value!r}")
        if int(batch_size) < 1 or int(max_length) < 2:
            raise ValueError(f"{who}: need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        check_model_path(model_path, f"{who}: model_path")  # before the policy loads, no Hub lookup if local
        self.model_path = model_path
        self.label = label
        self.transform = transform
        self.input = input
        self.separator = separator
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.truncation_side = truncation_side
        self.device_option = device
        self.offload = bool(offload)
        self.dtype = dtype
        self.trust_remote_code = bool(trust_remote_code)
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._on_device: Any = contextlib.nullcontext()  # a HostOffload with offload on a GPU
        self.label_index: Optional[int] = None

    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def _resolve_label(self, config) -> int:
        n = int(config.num_labels)
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        label = self.label
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, int):
            idx = label + n if label < 0 else label
            if not 0 <= idx < n:
                raise ValueError(
                    f"RewardModel {self.name!r}: label index {self.label} is out of range for {self.model_path!r}, "
                    f"which has {n} outputs {id2label}"
                )
            return idx
        matches = [i for i, v in id2label.items() if v == label] or [
            i for i, v in id2label.items() if v.lower() == str(label).lower()
        ]
        if len(matches) != 1:
            raise ValueError(
                f"RewardModel {self.name!r}: label {label!r} is not in config.id2label of {self.model_path!r}: "
                f"{id2label}; use one of those names or an index"
            )
        return matches[0]

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(self.model_path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"RewardModel {self.name!r}: model_path {str(folder)!r} must be a local folder with config.json, "
                f"the weights and the tokenizer (save_pretrained layout)"
            )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=self.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=self.trust_remote_code,
            dtype="auto" if self.dtype == "auto" else _DTYPES[self.dtype],
        )
        self.label_index = self._resolve_label(model.config)
        if self.transform == "softmax" and model.config.num_labels < 2:
            raise ValueError(f"RewardModel {self.name!r}: transform softmax needs >= 2 labels; {str(folder)!r} has 1")
        if self.input == "chat" and not getattr(tok, "chat_template", None):
            raise ValueError(f"RewardModel {self.name!r}: input 'chat' needs a tokenizer chat template; {str(folder)!r} has none")
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ValueError(f"RewardModel {self.name!r}: the tokenizer in {str(folder)!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        # Causal-LM classifiers find each row's last token by config.pad_token_id: it must be the tokenizer's.
        reconcile_special_tokens(tok, model.config, f"RewardModel {self.name!r} ({str(folder)!r})")
        tok.truncation_side = self.truncation_side
        device = torch.device(self.device_option) if self.device_option else self.device
        if self.offload and device.type == "cuda":
            self._on_device = HostOffload(model.eval(), device)
        else:
            model.to(device).eval()
        self._model, self._tokenizer, self._device = model, tok, device

    def _encode(self, prompts: list[str], responses: list[str]):
        tok = self._tokenizer
        kw = dict(return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        if self.input == "response":
            return tok(responses, **kw)
        if self.input == "pair":
            return tok(prompts, responses, **kw)
        if self.input == "concat":
            return tok([p + self.separator + r for p, r in zip(prompts, responses)], **kw)
        chats = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(prompts, responses)
        ]
        return tok(chats, add_special_tokens=False, **kw)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        self._load()
        out = []
        with self._on_device:
            for i in range(0, len(responses), self.batch_size):
                out.append(self._score_batch(prompts[i : i + self.batch_size], responses[i : i + self.batch_size]))
        scores = torch.cat(out) if out else torch.zeros(0)
        n = len(responses)
        return RewardOutput(scores, torch.ones(n, dtype=torch.bool), {self.name: scores.clone()}, {})

    @torch.no_grad()
    def _score_batch(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        enc = self._encode(prompts, responses)
        logits = self._model(**enc.to(self._device)).logits.float()
        if self.transform == "softmax":
            logits = logits.softmax(-1)
        elif self.transform == "sigmoid":
            logits = logits.sigmoid()
        return logits[:, self.label_index].cpu()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_model=None, _tokenizer=None, _on_device=contextlib.nullcontext())
        return state
