"""PromptDataModule: prompt JSONL in, chat-templated, left-padded batches out.

A prompt file holds one JSON object per line::

    {"id": "c13-000123", "prompt": "thread opener text", "split": "train", "meta": {...}}
    {"id": "c13-000124", "messages": [{"role": "user", "content": "..."}]}

``prompt`` (plain text, wrapped as the user turn after the system prompt) or ``messages`` (a
chat, used as given; the system prompt is prepended when it has none). ``split`` is optional:
without it the file is split by ``val_fraction``/``test_fraction`` with a seeded shuffle.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT
from rlhf_lit.errors import ConfigError, InputFileError
from rlhf_lit.text_files import iter_lines
from rlhf_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class PromptRecord:
    """One prompt as read from the file."""

    id: str
    messages: list[dict[str, str]]
    text: str  # what the reward sees as "the prompt": the last user turn
    split: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)


class PromptFileError(InputFileError):
    """A prompt file that cannot be used; the message names the file and line."""


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Parse and validate a prompt JSONL file (UTF-8; a BOM is accepted), failing on the first bad
    line with its number.

    Raises:
        PromptFileError: naming the file and line: a missing file, bytes that are not UTF-8, a line
            that is not a JSON object of the expected fields, a duplicate id, no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist (expected a JSONL file of prompts)")
    records, seen = [], set()
    try:
        for lineno, line in iter_lines(path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(_parse_record(obj, where, default_id=f"{path.stem}-{lineno}"))
            if records[-1].id in seen:
                raise PromptFileError(f"{where}: duplicate id {records[-1].id!r}")
            seen.add(records[-1].id)
    except InputFileError as e:
        if isinstance(e, PromptFileError):
            raise
        raise PromptFileError(str(e)) from None
    if not records:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return records


def _parse_record(obj: dict, where: str, default_id: str) -> PromptRecord:
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise PromptFileError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    meta = obj.get("meta") or {}
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        users = [m["content"] for m in msgs if m["role"] == "user"]
        text = users[-1] if users else msgs[-1]["content"]
        messages = [dict(role=m["role"], content=m["content"]) for m in msgs]
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
        text = obj["prompt"]
        messages = [{"role": "user", "content": text}]
    else:
        raise PromptFileError(f"{where}: expected a 'prompt' (text) or 'messages' (chat) field, found {sorted(obj)}")
    return PromptRecord(str(obj.get("id", default_id)), messages, text, split, meta)


class TokenizedPrompts(Dataset):
    """Prompts already templated and tokenized (a list of dicts; small enough to hold in memory)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def left_pad_collate(pad_token_id: int):
    """Collate prompts into ``input_ids``/``attention_mask`` padded on the left, so every prompt
    ends at the same column and generation continues from there."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, width - n:] = torch.tensor(it["input_ids"])
            mask[row, width - n:] = 1
        return {"input_ids": ids, "attention_mask": mask, "prompt": [it["prompt"] for it in items],
                "id": [it["id"] for it in items]}

    return collate


class PromptDataModule(LightningDataModule):
    """Serves prompts for rollouts (train), validation and evaluation (test).

    Args:
        prompt_file: JSONL prompt file (records with ``prompt`` or ``messages``, optional ``split``).
        val_file: Optional separate JSONL for validation prompts (overrides the split of prompt_file).
        test_file: Optional separate JSONL for test prompts.
        tokenizer: Tokenizer folder or Hub id; set by the CLI to the SFT adapter's folder when it ships a
            tokenizer, else ``model.policy.base_model``.
        system_prompt: System turn put before each prompt that has none; None or "" for no system turn.
        chat_template: A Jinja chat template (inline text or a file path) to use instead of the tokenizer's.
        batch_size: Prompts per rollout (the PPO batch); must split into ``model.ppo.num_minibatches``.
        eval_batch_size: Prompts per validation/test batch; defaults to batch_size.
        max_prompt_tokens: Longest templated prompt in tokens.
        long_prompts: What to do with longer prompts: "drop" them (logged with a count) or "error".
        val_fraction: Fraction of prompts held out for validation when records carry no ``split``.
        test_fraction: Fraction held out for testing when records carry no ``split``.
        max_val_prompts: Cap on validation prompts (validation samples every one), None for all.
        seed: Seed of the split and of the shuffling of training prompts.
        shuffle: Shuffle training prompts each epoch.
        num_workers: DataLoader workers (tokenization is done up front, so 0 is usually right).
        trust_remote_code: Allow custom tokenizer code from the model folder (off unless you trust it).
        revision: Hub revision of the tokenizer; set by the CLI to ``model.policy.revision``.
    """

    def __init__(
        self,
        prompt_file: str = "prompts/demo_prompts.jsonl",
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        tokenizer: str = "builtin:demo",
        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
        chat_template: Optional[str] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        max_prompt_tokens: int = 256,
        long_prompts: Literal["drop", "error"] = "drop",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_val_prompts: Optional[int] = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if max_prompt_tokens < 1:
            raise ConfigError(f"data.max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        if max_val_prompts is not None and max_val_prompts < 0:
            raise ConfigError(f"data.max_val_prompts must be >= 0 or null, got {max_val_prompts}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1")
        self.prompt_file, self.val_file, self.test_file = prompt_file, val_file, test_file
        self.tokenizer_name = tokenizer
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.long_prompts = long_prompts
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_val_prompts = max_val_prompts
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.tokenizer = None
        self.splits: dict[str, TokenizedPrompts] = {}

    # ---------------------------------------------------------------------------------------
    def split_records(self) -> dict[str, list[PromptRecord]]:
        """Read the prompt file(s) and assign each record to train/val/test (no tokenizer needed)."""
        records = read_prompt_file(self.prompt_file)
        by_split: dict[str, list[PromptRecord]] = {s: [] for s in SPLITS}
        if any(r.split for r in records):
            for r in records:
                by_split[r.split or "train"].append(r)
        else:
            order = list(range(len(records)))
            random.Random(self.seed).shuffle(order)
            n_val, n_test = round(len(records) * self.val_fraction), round(len(records) * self.test_fraction)
            for k, i in enumerate(order):
                by_split["val" if k < n_val else "test" if k < n_val + n_test else "train"].append(records[i])
        if self.val_file:
            by_split["val"] = read_prompt_file(self.val_file)
        if self.test_file:
            by_split["test"] = read_prompt_file(self.test_file)
        if self.max_val_prompts is not None:
            by_split["val"] = by_split["val"][: self.max_val_prompts]
        return by_split

    def setup(self, stage: str) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]
        by_split = self.split_records()
        for split in needed:
            if split == "val" and not by_split["val"]:
                continue  # validation is optional
            if not by_split[split]:
                raise PromptFileError(
                    f"the {split!r} split of {self.prompt_file!r} is empty: give records \"split\": \"{split}\", "
                    f"a {split}_file, or a {split}_fraction > 0"
                )
        self.tokenizer = self.tokenizer or self.load_tokenizer()
        for split in needed:
            if by_split[split]:
                self.splits[split] = TokenizedPrompts(self._tokenize(by_split[split], split))
        if stage == "fit":
            self._check_training_batches(len(by_split["train"]))

    def _check_training_batches(self, read: int) -> None:
        """At least one full rollout batch per data-parallel rank, counted after the long prompts
        were dropped (Lightning's distributed sampler gives each rank ``ceil(n / ranks)`` prompts,
        and the loader drops an incomplete last batch).

        Raises:
            PromptFileError: naming the counts, so a run that could do no rollout never loads a model.
        """
        trainer = getattr(self, "trainer", None)
        ranks = trainer.world_size if trainer is not None else 1
        n = len(self.splits["train"])
        per_rank = math.ceil(n / ranks)
        if per_rank >= self.batch_size:
            return
        dropped = read - n
        counts = f"{read} training prompts" + (
            f", {dropped} of them over data.max_prompt_tokens={self.max_prompt_tokens} and dropped, {n} left" if dropped
            else "")
        ranks_text = f" ({per_rank} for each of {ranks} data-parallel ranks)" if ranks > 1 else ""
        raise PromptFileError(
            f"{self.prompt_file}: {counts}{ranks_text}, fewer than data.batch_size={self.batch_size}: no rollout batch "
            f"can be formed, so fit would train nothing. Lower data.batch_size"
            + (", raise data.max_prompt_tokens" if dropped else "") + " or give more training prompts"
        )

    def load_tokenizer(self):
        return load_tokenizer(self.tokenizer_name, revision=self.revision, trust_remote_code=self.trust_remote_code,
                              chat_template=self.chat_template)

    def _tokenize(self, records: list[PromptRecord], split: str) -> list[dict[str, Any]]:
        items, dropped = [], []
        for r in records:
            messages = r.messages
            if self.system_prompt and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system_prompt}] + messages
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_prompt_tokens:
                if self.long_prompts == "error":
                    raise PromptFileError(
                        f"prompt {r.id!r} ({split}) is {len(ids)} tokens, over data.max_prompt_tokens="
                        f"{self.max_prompt_tokens}"
                    )
                dropped.append(r.id)
                continue
            items.append({"id": r.id, "prompt": r.text, "input_ids": ids})
        if dropped:
            log.warning("dropped %d %s prompts over %d tokens (first: %s)", len(dropped), split,
                        self.max_prompt_tokens, dropped[:3])
        if not items:
            raise PromptFileError(f"all {len(records)} {split} prompts of {self.prompt_file} are over "
                                  f"data.max_prompt_tokens={self.max_prompt_tokens}")
        return items

    # ---------------------------------------------------------------------------------------
    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # A stateful loader saves its position and shuffle state in checkpoints, so a resumed run
        # replays exactly the remaining batches of the epoch. The generator also draws the loader's
        # base seed, which would otherwise come from (and move) the global random state that
        # sampling continues from.
        generator = torch.Generator().manual_seed(self.seed)
        sampler = self._rank_sampler()
        return StatefulDataLoader(
            self.splits["train"], batch_size=self.batch_size, shuffle=self.shuffle if sampler is None else None,
            sampler=sampler, drop_last=True, collate_fn=left_pad_collate(self.tokenizer.pad_token_id),
            num_workers=self.num_workers, generator=generator,
        )

    def _rank_sampler(self):
        """Under a data-parallel strategy, this rank's shard of the training prompts: every rank
        shuffles the same order with ``data.seed`` (and the epoch; Lightning sets it) and takes every
        ``world_size``-th prompt, so ``data.batch_size`` is the batch of each rank. Lightning would
        insert such a sampler itself, seeded by ``seed_everything`` instead of ``data.seed`` and
        shuffled even under ``data.shuffle: false``. None on one device."""
        from torch.utils.data import DistributedSampler

        trainer = getattr(self, "trainer", None)
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
        if not kwargs:
            return None
        return DistributedSampler(self.splits["train"], shuffle=self.shuffle, seed=self.seed, drop_last=False, **kwargs)

    def _eval_loader(self, split: str):
        return DataLoader(
            self.splits[split], batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=left_pad_collate(self.tokenizer.pad_token_id), num_workers=self.num_workers,
        )

    def val_dataloader(self):
        return self._eval_loader("val") if "val" in self.splits else []

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("test")  # predict answers the test prompts (setup("predict") reads them)
