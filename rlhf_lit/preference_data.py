"""PreferenceDataModule: preference pairs JSONL in, chat-templated pair batches out.

A pair file holds one JSON object per line, in TRL's conversational preference format, as
``scripts/build_preference_pairs.py`` writes it::

    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "thread text"}],
     "chosen": [{"role": "assistant", "content": "the better comment"}],
     "rejected": [{"role": "assistant", "content": "the worse comment"}],
     "meta": {"context_id": "1ba62ac7acdc", "split": "train", "score_diff": 2.0, ...}}

``prompt`` may also be plain text (the user turn), and ``chosen``/``rejected`` plain text (the
assistant turn). The prompt is templated exactly as :class:`~rlhf_lit.data.PromptDataModule` templates
prompts (the system prompt is put first when the chat has none; the tokenizer's chat template with
the generation prompt); each response is its text's tokens followed by the EOS token, as a sampled
response ends. ``split`` (top level or in ``meta``) is optional: train pairs without ``val`` ones
give ``val_fraction`` of their contexts to validation, and a file without splits is split by
context (``meta.context_id``, else the prompt), so pairs of one thread never straddle two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from rlhf_lit.algos.rollout_batch import ResponseBatch
from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT
from rlhf_lit.data import SPLITS, TokenizedPrompts, left_pad_collate
from rlhf_lit.errors import ConfigError, InputFileError
from rlhf_lit.text_files import iter_lines
from rlhf_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class PairFileError(InputFileError):
    """A preference pair file that cannot be used; the message names the file, line and field."""


@dataclass
class PreferencePair:
    """One pair as read from the file."""

    id: str
    messages: list[dict[str, str]]  # the prompt chat (system turn added at tokenization if missing)
    prompt: str                      # the last user turn: what a reward backend sees as the prompt
    chosen: str
    rejected: str
    where: str                       # "file:line", for errors raised later
    group: str                       # the context: pairs of one group share a split
    split: Optional[str] = None
    margin: Optional[float] = None   # meta[margin_field], e.g. the raters' score difference
    meta: dict[str, Any] = field(default_factory=dict)


def _messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise PairFileError(f"{where}: '{name}' is an empty string")
        return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise PairFileError(f"{where}: '{name}' must be text or a non-empty list of {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value: Any, where: str, name: str) -> str:
    msgs = _messages(value, where, name)
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    if len(replies) != 1 or len(msgs) != 1:
        raise PairFileError(f"{where}: '{name}' must be one assistant message, got roles {[m['role'] for m in msgs]}")
    if not replies[0].strip():
        raise PairFileError(f"{where}: '{name}' is an empty response")
    return replies[0].strip()


def parse_pair(obj: Any, where: str, default_id: str, margin_field: Optional[str] = "score_diff") -> PreferencePair:
    """One JSON line as a :class:`PreferencePair`.

    Raises:
        PairFileError: naming ``where`` and the field at fault.
    """
    if not isinstance(obj, dict):
        raise PairFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise PairFileError(f"{where}: missing field '{name}' (expected 'prompt', 'chosen' and 'rejected'; "
                                f"found {sorted(obj)})")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise PairFileError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
    messages = _messages(obj["prompt"], where, "prompt")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise PairFileError(f"{where}: 'prompt' has no user message")
    chosen, rejected = _response(obj["chosen"], where, "chosen"), _response(obj["rejected"], where, "rejected")
    if chosen == rejected:
        raise PairFileError(f"{where}: 'chosen' and 'rejected' are the same text")
    split = obj.get("split", meta.get("split"))
    if split is not None and split not in SPLITS:
        raise PairFileError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    margin = None
    if margin_field and meta.get(margin_field) is not None:
        value = meta[margin_field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PairFileError(f"{where}: 'meta.{margin_field}' must be a finite number, got {value!r}")
        margin = float(value)
    group = str(meta.get("context_id") or hashlib.blake2b(users[-1].encode(), digest_size=6).hexdigest())
    return PreferencePair(str(obj.get("id", default_id)), messages, users[-1], chosen, rejected, where, group,
                          split, margin, meta)


def read_pair_file(path: str | Path, margin_field: Optional[str] = "score_diff") -> list[PreferencePair]:
    """Parse and validate a pair JSONL file, failing on the first bad line with its number.

    Raises:
        PairFileError: a missing file, bad JSON, a bad field (named), a duplicate id, no pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise PairFileError(f"pair file {str(path)!r} does not exist (expected a JSONL file of preference pairs, "
                            f"e.g. from scripts/build_preference_pairs.py)")
    pairs, seen = [], set()
    try:
        lines = list(iter_lines(path))  # UTF-8 (a BOM accepted); a bad byte is named by file:line
    except InputFileError as e:
        raise PairFileError(str(e)) from None
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairFileError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
        pair = parse_pair(obj, where, f"{path.stem}-{lineno}", margin_field)
        if pair.id in seen:
            raise PairFileError(f"{where}: duplicate id {pair.id!r}")
        seen.add(pair.id)
        pairs.append(pair)
    if not pairs:
        raise PairFileError(f"pair file {str(path)!r} holds no pairs")
    return pairs


def _in_fraction(key: str, seed: int, lo: float, hi: float) -> bool:
    """Whether ``key``'s seeded hash, as a number in [0, 1), falls in ``[lo, hi)``."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2**64
    return lo <= h < hi


def split_pairs(pairs: list[PreferencePair], val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[PreferencePair]]:
    """Train/val/test by the records' ``split``, or by a seeded hash of their context (``group``):
    a file without splits gives ``test_fraction`` and ``val_fraction`` of its contexts to test and
    val; a file with only train/test gives ``val_fraction`` of the training contexts to val."""
    out: dict[str, list[PreferencePair]] = {s: [] for s in SPLITS}
    has_split = any(p.split for p in pairs)
    has_val = any(p.split == "val" for p in pairs)
    for p in pairs:
        split = p.split or ("train" if has_split else None)
        if split is None:
            split = "test" if _in_fraction(p.group, seed, 0, test_fraction) else \
                "val" if _in_fraction(p.group, seed, test_fraction, test_fraction + val_fraction) else "train"
        elif split == "train" and not has_val and _in_fraction(p.group, seed, 0, val_fraction):
            split = "val"
        out[split].append(p)
    return out


def pair_key(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """A hash of a pair's token ids (equal keys: equal model inputs), e.g. for caching per-pair results."""
    h = hashlib.blake2b(digest_size=12)
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
    return h.hexdigest()


class PairDataset(TokenizedPrompts):
    """Tokenized pairs (dicts with ``input_ids``, ``chosen_ids``, ``rejected_ids``, texts, margin)."""


def pair_collate(pad_token_id: int):
    """Collate pairs: prompts left-padded (``input_ids``, ``attention_mask``, as prompt batches);
    chosen and rejected responses right-padded to one common width ``R`` (``chosen_ids``,
    ``chosen_mask``, ``rejected_ids``, ``rejected_mask``), so they stack along the batch; ``margin``
    ``(B,)`` float (NaN where the pair has none); ids, texts and token-hash keys (``key``) as lists."""
    prompts = left_pad_collate(pad_token_id)

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        out = prompts(items)
        width = max(len(it[k]) for it in items for k in ("chosen_ids", "rejected_ids"))
        for k in ("chosen", "rejected"):
            ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.bool)
            for row, it in enumerate(items):
                n = len(it[f"{k}_ids"])
                ids[row, :n] = torch.tensor(it[f"{k}_ids"])
                mask[row, :n] = True
            out[f"{k}_ids"], out[f"{k}_mask"] = ids, mask
            out[k] = [it[k] for it in items]
        out["key"] = [it["key"] for it in items]
        out["margin"] = torch.tensor([float("nan") if it["margin"] is None else it["margin"] for it in items])
        return out

    return collate


class PreferenceDataModule(LightningDataModule):
    """Serves preference pairs for the DPO and reward-model stages (train, val, test).

    Args:
        pair_file: JSONL preference pairs (``scripts/build_preference_pairs.py``'s output).
        val_file: Optional separate JSONL of validation pairs (overrides the split of pair_file).
        test_file: Optional separate JSONL of test pairs.
        tokenizer: Tokenizer folder or Hub id; set by the CLI from ``model.policy`` (as for prompts).
        system_prompt: System turn put before each prompt that has none; None or "" for none.
        chat_template: A Jinja chat template (inline text or a file path) instead of the tokenizer's.
        batch_size: Pairs per optimizer step.
        eval_batch_size: Pairs (and test prompts) per validation/test batch; defaults to batch_size.
        max_prompt_tokens: Longest templated prompt, in tokens.
        max_response_tokens: Longest response, in tokens, its EOS included.
        long_pairs: Pairs over either limit: ``drop`` them (counted and logged per split) or ``error``.
        val_fraction: Share of contexts held out for validation (from train, when no pair says ``val``).
        test_fraction: Share of contexts held out for test when the pairs carry no ``split``.
        max_val_pairs: Cap on validation pairs, None for all.
        margin_field: The ``meta`` field read as each pair's margin (the reward model's optional
            Bradley-Terry margin); ``score_diff`` is the rating difference the survey converter writes.
        test_prompts: Also serve the test split's distinct prompts as a second test loader (the DPO
            stage samples from them for the paired generation report; the reward model ignores it).
        seed: Seed of the split and of the shuffling of training pairs.
        shuffle: Shuffle training pairs each epoch.
        num_workers: DataLoader workers (tokenization is done up front, so 0 is usually right).
        trust_remote_code: Allow custom tokenizer code from the model folder (off unless you trust it).
        revision: Hub revision of the tokenizer; set by the CLI to ``model.policy.revision``.
    """

    def __init__(
        self,
        pair_file: str = "prompts/demo_pairs.jsonl",
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        tokenizer: str = "builtin:demo",
        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
        chat_template: Optional[str] = None,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        long_pairs: Literal["drop", "error"] = "drop",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_val_pairs: Optional[int] = None,
        margin_field: Optional[str] = "score_diff",
        test_prompts: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1")
        if max_prompt_tokens < 1 or max_response_tokens < 2:
            raise ConfigError("data.max_prompt_tokens must be >= 1 and data.max_response_tokens >= 2 (text + EOS)")
        if long_pairs not in ("drop", "error"):
            raise ConfigError(f"data.long_pairs={long_pairs!r}: expected 'drop' or 'error'")
        self.pair_file, self.val_file, self.test_file = pair_file, val_file, test_file
        self.tokenizer_name = tokenizer
        self.system_prompt, self.chat_template = system_prompt, chat_template
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.long_pairs = long_pairs
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_val_pairs, self.margin_field, self.test_prompts = max_val_pairs, margin_field, test_prompts
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.trust_remote_code, self.revision = trust_remote_code, revision
        self.tokenizer = None
        self.splits: dict[str, PairDataset] = {}
        self.dropped: dict[str, dict[str, int]] = {}

    # ---------------------------------------------------------------------------------------
    def split_records(self) -> dict[str, list[PreferencePair]]:
        """Read the pair file(s) and assign each pair to train/val/test (no tokenizer needed)."""
        by_split = split_pairs(read_pair_file(self.pair_file, self.margin_field), self.val_fraction,
                               self.test_fraction, self.seed)
        if self.val_file:
            by_split["val"] = read_pair_file(self.val_file, self.margin_field)
        if self.test_file:
            by_split["test"] = read_pair_file(self.test_file, self.margin_field)
        if self.max_val_pairs is not None:
            by_split["val"] = by_split["val"][: self.max_val_pairs]
        return by_split

    def setup(self, stage: str) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]
        by_split = self.split_records()
        for split in needed:
            if split != "val" and not by_split[split]:
                raise PairFileError(f"the {split!r} split of {self.pair_file!r} is empty: give pairs \"split\": "
                                    f"\"{split}\" (or meta.split), a {split}_file, or a {split}_fraction > 0")
        self.tokenizer = self.tokenizer or load_tokenizer(
            self.tokenizer_name, revision=self.revision, trust_remote_code=self.trust_remote_code,
            chat_template=self.chat_template)
        for split in needed:
            if by_split[split]:
                self.splits[split] = PairDataset(self._tokenize(by_split[split], split))
        if stage == "fit" and len(self.splits["train"]) < self.batch_size:
            raise PairFileError(f"{self.pair_file!r} has {len(self.splits['train'])} usable training pairs, fewer "
                                f"than data.batch_size={self.batch_size}")

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The templated prompt's token ids: the system prompt first when the chat has none."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def response_ids(self, text: str) -> list[int]:
        """A response's token ids, ending with the EOS token (as a sampled response ends)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def _tokenize(self, pairs: list[PreferencePair], split: str) -> list[dict[str, Any]]:
        items, dropped = [], {"prompt": 0, "response": 0}
        for p in pairs:
            q, c, r = self.prompt_ids(p.messages), self.response_ids(p.chosen), self.response_ids(p.rejected)
            over = "prompt" if len(q) > self.max_prompt_tokens else \
                "response" if max(len(c), len(r)) > self.max_response_tokens else None
            if over is not None:
                if self.long_pairs == "error":
                    limit = self.max_prompt_tokens if over == "prompt" else self.max_response_tokens
                    n = len(q) if over == "prompt" else max(len(c), len(r))
                    raise PairFileError(f"{p.where}: the {over} of pair {p.id!r} ({split}) is {n} tokens, over "
                                        f"data.max_{over}_tokens={limit} (or set data.long_pairs=drop)")
                dropped[over] += 1
                continue
            items.append({"id": p.id, "group": p.group, "prompt": p.prompt, "chosen": p.chosen,
                          "rejected": p.rejected, "margin": p.margin, "input_ids": q, "chosen_ids": c,
                          "rejected_ids": r, "key": pair_key(q, c, r)})
        self.dropped[split] = dropped
        if any(dropped.values()):
            log.warning("dropped %d %s pairs: %d with a prompt over data.max_prompt_tokens=%d, %d with a response over "
                        "data.max_response_tokens=%d", sum(dropped.values()), split, dropped["prompt"],
                        self.max_prompt_tokens, dropped["response"], self.max_response_tokens)
        if not items:
            raise PairFileError(f"every {split} pair of {self.pair_file!r} is over the length limits "
                                f"(data.max_prompt_tokens={self.max_prompt_tokens}, "
                                f"data.max_response_tokens={self.max_response_tokens})")
        log.info("%s: %d pairs", split, len(items))
        return items

    # ---------------------------------------------------------------------------------------
    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # A stateful loader saves its position and shuffle state in checkpoints: exact mid-epoch resume.
        return StatefulDataLoader(
            self.splits["train"], batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True,
            collate_fn=pair_collate(self.tokenizer.pad_token_id), num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _eval_loader(self, split: str):
        return DataLoader(self.splits[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=pair_collate(self.tokenizer.pad_token_id), num_workers=self.num_workers)

    def val_dataloader(self):
        return self._eval_loader("val") if "val" in self.splits else []

    def test_dataloader(self):
        if not self.test_prompts:
            return self._eval_loader("test")
        return [self._eval_loader("test"), self.prompt_dataloader("test")]

    def prompt_dataloader(self, split: str) -> DataLoader:
        """The split's distinct prompts (one per context) as prompt batches (``input_ids``,
        ``attention_mask``, ``prompt``, ``id``): what a policy samples from."""
        seen, items = set(), []
        for it in self.splits[split]:
            if it["group"] not in seen:
                seen.add(it["group"])
                items.append({"id": it["group"], "prompt": it["prompt"], "input_ids": it["input_ids"]})
        return DataLoader(TokenizedPrompts(items), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=left_pad_collate(self.tokenizer.pad_token_id), num_workers=self.num_workers)


def stack_pairs(batch: dict[str, Any], rows: Optional[torch.Tensor] = None) -> ResponseBatch:
    """The chosen responses of ``rows`` (all rows when None) followed by their rejected ones, as
    one :class:`ResponseBatch` of ``2b`` sequences (the prompts repeated): chosen and rejected go
    through one forward. Rows ``[:b]`` are the chosen, ``[b:]`` the rejected."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    q, qm = pick(batch["input_ids"]), pick(batch["attention_mask"])
    return ResponseBatch(torch.cat([q, q]), torch.cat([qm, qm]),
                         torch.cat([pick(batch["chosen_ids"]), pick(batch["rejected_ids"])]),
                         torch.cat([pick(batch["chosen_mask"]), pick(batch["rejected_mask"])]))
