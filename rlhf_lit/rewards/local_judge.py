"""An in-process LLM judge: a local causal LM scoring by the G-Eval bucket expectation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from rlhf_lit.paths import check_model_path
from rlhf_lit.tokenizer import reconcile_special_tokens

from .base import RewardBackend, RewardOutput
from .judge_prompts import DEFAULT_BUCKET_TEMPLATE, DEFAULT_SYSTEM_PROMPT, check_template, render_template

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LocalJudge(RewardBackend):
    """Engagement judged by a ``transformers`` causal LM loaded in-process: the offline alternative to
    :class:`LLMJudge` in ``logprobs`` mode.

    The prompt template (same placeholders as LLMJudge) is put in a chat with the tokenizer's chat
    template (when it has one and ``use_chat_template``), followed by ``answer_prefix``; one forward
    pass gives the next-token distribution, and the score is ``sum_k p(k) * k`` over the digit tokens
    1..K, renormalised over those digits (G-Eval). The metric ``judge/digit_mass`` is the mean
    probability the model put on the digits before renormalising: if it is low, the judge is not
    answering in the requested format and the score means little.

    Args:
        model_path: Local folder with the causal LM and its tokenizer (``save_pretrained`` layout).
        num_buckets: K, the number of buckets (2..9; each digit must be a single token).
        prompt_template: User message with ``{prompt}``, ``{response}`` and ``{num_buckets}``
            placeholders; None uses ``DEFAULT_BUCKET_TEMPLATE``.
        system_prompt: System message; None uses ``DEFAULT_SYSTEM_PROMPT``, an empty string sends none.
        use_chat_template: Wrap the messages with the tokenizer's chat template (with the generation
            prompt) when it has one; otherwise system and user text are joined by blank lines.
        answer_prefix: Text appended after the generation prompt, before the digit (e.g. ``Rating: ``).
        batch_size: Judge prompts per forward pass.
        max_text_tokens: The prompt and the response are each cut to this many tokens before they are
            put in the template (so the instructions are never truncated).
        device: Device of the judge; None uses the trainer's device given to ``setup``; ``cpu`` forces
            the CPU.
        dtype: Weights dtype: float32, bfloat16, float16, or auto (the checkpoint's).
        trust_remote_code: Allow code shipped in the model folder to run. Off by default: only turn it
            on for folders you trust.
        **kwargs: ``scale``, ``shift``, ``clip_min``, ``clip_max``, ``name`` of :class:`RewardBackend`;
            ``name`` defaults to ``local_judge``.
    """

    default_name = "local_judge"

    def __init__(
        self,
        model_path: str,
        num_buckets: int = 5,
        prompt_template: Optional[str] = None,
        system_prompt: Optional[str] = None,
        use_chat_template: bool = True,
        answer_prefix: str = "",
        batch_size: int = 8,
        max_text_tokens: int = 512,
        device: Optional[str] = None,
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        who = f"LocalJudge {self.name!r}"
        if not 2 <= int(num_buckets) <= 9:
            raise ValueError(f"{who}: num_buckets must be in 2..9 (one digit per bucket), got {num_buckets}")
        if int(batch_size) < 1 or int(max_text_tokens) < 1:
            raise ValueError(f"{who}: batch_size and max_text_tokens must be >= 1, got {batch_size}, {max_text_tokens}")
        if dtype not in (*_DTYPES, "auto"):
            raise ValueError(f"{who}: dtype must be one of {[*_DTYPES, 'auto']}, got {dtype!r}")
        check_model_path(model_path, f"{who}: model_path")  # before the policy loads, no Hub lookup if local
        self.model_path = model_path
        self.num_buckets = int(num_buckets)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.use_chat_template = bool(use_chat_template)
        self.answer_prefix = answer_prefix
        self.batch_size = int(batch_size)
        self.max_text_tokens = int(max_text_tokens)
        self.device_option = device
        self.dtype = dtype
        self.trust_remote_code = bool(trust_remote_code)
        check_template(self.template, who)
        self._model: Any = None
        self._tokenizer: Any = None
        self._digit_ids: Optional[list[list[int]]] = None

    @property
    def template(self) -> str:
        return DEFAULT_BUCKET_TEMPLATE if self.prompt_template is None else self.prompt_template

    @property
    def system(self) -> str:
        return DEFAULT_SYSTEM_PROMPT if self.system_prompt is None else self.system_prompt

    def setup(self, device) -> None:
        super().setup(device)
        self._load()

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(self.model_path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"LocalJudge {self.name!r}: model_path {str(folder)!r} must be a local folder with config.json, "
                f"the weights and the tokenizer (save_pretrained layout)"
            )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=self.trust_remote_code)
        kwargs: dict[str, Any] = {"dtype": "auto" if self.dtype == "auto" else _DTYPES[self.dtype]}
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=self.trust_remote_code, **kwargs
        )
        device = torch.device(self.device_option) if self.device_option else self.device
        model.to(device).eval()
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ValueError(f"LocalJudge {self.name!r}: the tokenizer in {str(folder)!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        reconcile_special_tokens(tok, model.config, f"LocalJudge {self.name!r} ({str(folder)!r})")
        digit_ids = []
        for k in range(1, self.num_buckets + 1):
            ids = set()
            for variant in (str(k), " " + str(k)):
                enc = tok.encode(variant, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(enc[0])
            if not ids:
                raise ValueError(
                    f"LocalJudge {self.name!r}: the tokenizer in {str(folder)!r} splits the digit {k} into several "
                    f"tokens; the bucket probabilities need one token per digit"
                )
            digit_ids.append(sorted(ids))
        self._model, self._tokenizer, self._digit_ids = model, tok, digit_ids

    def _cut(self, text: str) -> str:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return text
        return self._tokenizer.decode(ids[: self.max_text_tokens])

    def build_input(self, prompt: str, response: str) -> str:
        """The full judge input text for one pair (after the chat template, before tokenisation)."""
        self._load()
        user = render_template(self.template, self._cut(prompt), self._cut(response), self.num_buckets)
        tok = self._tokenizer
        if self.use_chat_template and getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": user}
            ]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = (self.system + "\n\n" if self.system else "") + user + "\n\n"
        return text + self.answer_prefix

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        self._load()
        texts = [self.build_input(p, r) for p, r in zip(prompts, responses)]
        has_template = self.use_chat_template and getattr(self._tokenizer, "chat_template", None)
        buckets = torch.arange(1, self.num_buckets + 1, dtype=torch.float32)
        scores, masses = [], []
        for i in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not has_template,  # the chat template already holds the specials
            ).to(self._model.device)
            mask = enc["attention_mask"]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding
            logits = self._model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids).logits
            logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
            probs = torch.stack([logp[:, ids].exp().sum(-1) for ids in self._digit_ids], dim=-1).cpu()
            mass = probs.sum(-1)
            scores.append((probs / mass.unsqueeze(-1) * buckets).sum(-1))
            masses.append(mass)
        n = len(texts)
        score = torch.cat(scores) if scores else torch.zeros(0)
        mass = torch.cat(masses) if masses else torch.zeros(0)
        metrics = {"judge/digit_mass": float(mass.mean())} if n else {}
        return RewardOutput(score, torch.ones(n, dtype=torch.bool), {self.name: score.clone()}, metrics)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_model=None, _tokenizer=None, _digit_ids=None)
        return state
