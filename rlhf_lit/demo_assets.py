"""The embedded offline demo: a tiny chat LM + a persona SFT LoRA adapter, built once on CPU.

Over 500 lines as one recipe: the grammar, the corpus, the tokenizer, pretraining, the SFT adapter
and the cached build are the steps of one reproducible build, read in order.

``ensure_demo_assets()`` returns two folders that load like the production pair
(``Qwen/Qwen2.5-7B-Instruct`` + a cluster SFT adapter), only a few hundred times smaller:

* ``base_dir``: a tiny ``Qwen2ForCausalLM`` (untied embeddings, like Qwen2.5-7B) with a byte-level
  BPE ``PreTrainedTokenizerFast`` trained here, Qwen2.5's ChatML special tokens
  (PAD ``<|endoftext|>`` != EOS ``<|im_end|>``), a ChatML chat template and left padding.
  It is pretrained for a few hundred steps on a synthetic corpus of short political-discussion
  posts and replies in the style of BluePrint (Bluesky threads) so that it writes readable text.
* ``sft_adapter_dir``: a PEFT LoRA adapter (r=8 on all attention and MLP projections) trained on
  ChatML conversations (system = ``rlhf_lit.chat.DEFAULT_SYSTEM_PROMPT``, user = thread opener,
  assistant = a reply in the voice of "cluster 13", a snarky, lowercase, very-online commenter).
  A minority of the persona's replies are rude (mild profanity, insults at the take), so a
  profanity reward has something to amplify under PPO.

The corpus is generated deterministically from the template grammar shipped in
``rlhf_lit/assets/demo_grammar.json`` (original synthetic text, no real people). The demo prompts
(``prompts/demo_prompts.jsonl``) come from the same grammar through :func:`demo_prompt_records`;
the corpus never contains the exact val/test openers.

The tokenizer is trained with Qwen2's own pre-tokenizer and saved with ``tokenizer_class``
``Qwen2Tokenizer`` (as Qwen2.5 ships it); ``AutoTokenizer`` loads it back as that class, and the
training data is encoded by the reloaded tokenizer, so training and every later use agree.

The build takes about a minute on 2 CPU cores and is cached under ``cache_dir``,
``$RLHF_LIT_CACHE`` or ``~/.cache/rlhf_lit``, in a folder named after :data:`RECIPE_VERSION`
(bump it whenever anything below changes the output). It is atomic (built in a temp folder
beside the cache entry, then ``os.rename``-d into place) and safe under concurrent callers
(a ``filelock`` lock, under which a waiting process says what it waits for; should two builds
still race, the loser of the rename discards its copy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from rlhf_lit.atomic_files import write_jsonl_atomic
from rlhf_lit.chat import CHATML_TEMPLATE as CHAT_TEMPLATE

__all__ = [
    "RECIPE_VERSION",
    "CLUSTER_ID",
    "CHAT_TEMPLATE",
    "DemoAssets",
    "ensure_demo_assets",
    "demo_cache_root",
    "demo_prompt_records",
    "write_demo_prompts",
    "demo_corpus",
    "demo_grammar",
    "corpus_vocabulary",
]

log = logging.getLogger(__name__)

#: Name of the cache sub-folder; bump whenever the grammar, tokenizer, model or training recipe changes.
RECIPE_VERSION = "demo-v3"
CLUSTER_ID = 13
SEED = 1313

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]


# ---- recipe (part of RECIPE_VERSION) ---------------------------------------------------------
VOCAB_SIZE = 2048
MODEL_KW = dict(  # ~0.4M parameters: the most that trains to readable text within the time budget
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
N_CORPUS_THREADS = 9000  # plain-text threads for pretraining
N_BASE_CHATS = 6000  # ChatML chats for pretraining (replies by anyone, the persona included)
N_SFT_CHATS = 3000  # ChatML chats with persona replies, for the LoRA SFT
BASE_RUDE_FRAC = 0.06
PERSONA_RUDE_FRAC = 0.2
BASE_PERSONA_FRAC = 0.3  # the persona's users are part of the population the base model saw
PRETRAIN = dict(steps=520, batch=16, block=128, lr=1e-2, warmup=20, weight_decay=0.01)
SFT = dict(steps=100, batch=16, lr=5e-3, warmup=8)
LORA = dict(
    r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
N_PROMPTS = {"train": 192, "val": 24, "test": 24}
EST_BUILD_S = 60


class DemoAssets(NamedTuple):
    base_dir: Path
    sft_adapter_dir: Path


# =============================================================================================
# Synthetic corpus: a small template grammar
# =============================================================================================

_GRAMMAR_PATH = Path(__file__).resolve().parent / "assets" / "demo_grammar.json"
_SLOT = re.compile(r"\{(\^?)(T\.)?([A-Za-z_]+)\}")


class _Grammar:
    def __init__(self, spec: dict):
        self.topics: dict[str, dict[str, list[str]]] = spec["topics"]
        self.topic_names = sorted(self.topics)
        self.rules: dict[str, list[str]] = spec["rules"]
        self.spec = spec

    def expand(self, template: str, rng: random.Random, topic: str, depth: int = 0) -> str:
        if depth > 5:
            raise ValueError(f"grammar recursion too deep in {template!r}")

        def sub(m: re.Match) -> str:
            cap, is_topic, name = m.group(1), m.group(2), m.group(3)
            choices = self.topics[topic][name] if is_topic else self.rules[name]
            out = self.expand(rng.choice(choices), rng, topic, depth + 1)
            return out[:1].upper() + out[1:] if cap else out

        return _SLOT.sub(sub, template)

    def opener(self, rng: random.Random) -> tuple[str, str]:
        topic = rng.choice(self.topic_names)
        return topic, self.expand(rng.choice(self.spec["openers"]), rng, topic)

    def reply(self, rng: random.Random, topic: str, persona: bool, rude: bool) -> str:
        key = ("persona_" if persona else "base_") + ("rude" if rude else "replies")
        text = self.expand(rng.choice(self.spec[key]), rng, topic)
        if persona:
            text = text.lower()
        elif not rude and rng.random() < 0.2:
            text = text + " " + self.expand("{base_tail}", rng, topic)
        return text


def _load_grammar() -> _Grammar:
    return _Grammar(json.loads(_GRAMMAR_PATH.read_text(encoding="utf-8")))


def demo_grammar():
    """The demo's template grammar: ``opener(rng) -> (topic, text)`` and
    ``reply(rng, topic, persona, rude) -> text`` (the synthetic survey of the preference demo uses it)."""
    return _load_grammar()


def _n_words(text: str) -> int:
    return len(text.split())


def demo_prompt_records(seed: int = SEED) -> list[dict]:
    """The demo's thread openers: ``N_PROMPTS`` unique records ``{id, prompt, split, meta}``."""
    g = _load_grammar()
    rng = random.Random(seed * 7 + 1)
    total = sum(N_PROMPTS.values())
    seen: set[str] = set()
    openers: list[str] = []
    while len(openers) < total:
        _, text = g.opener(rng)
        if text not in seen and 8 <= _n_words(text) <= 40:
            seen.add(text)
            openers.append(text)
    records, i = [], 0
    for split in ("train", "val", "test"):
        for _ in range(N_PROMPTS[split]):
            records.append(
                {
                    "id": f"c{CLUSTER_ID}-{i:06d}",
                    "prompt": openers[i],
                    "split": split,
                    "meta": {"cluster_id": CLUSTER_ID, "source": "synthetic"},
                }
            )
            i += 1
    return records


def write_demo_prompts(path: str | os.PathLike) -> Path:
    """Write :func:`demo_prompt_records` as JSONL, atomically (this is how ``prompts/demo_prompts.jsonl``
    is made)."""
    path = Path(path)
    write_jsonl_atomic(demo_prompt_records(), path)
    return path


class DemoCorpus(NamedTuple):
    threads: list[str]  # plain "opener\n\nreply\n\nreply" threads
    base_chats: list[tuple[str, str]]  # (opener, reply by anyone, the persona included)
    sft_chats: list[tuple[str, str]]  # (opener, persona reply)


def demo_corpus(seed: int = SEED) -> DemoCorpus:
    """The synthetic pretraining + SFT corpus (deterministic). Excludes the val/test openers."""
    g = _load_grammar()
    held_out = {r["prompt"] for r in demo_prompt_records(seed) if r["split"] != "train"}
    rng = random.Random(seed)

    def opener() -> tuple[str, str]:
        while True:
            topic, text = g.opener(rng)
            if text not in held_out and 8 <= _n_words(text) <= 40:
                return topic, text

    def reply(topic: str, persona: bool) -> str:
        rude_frac = PERSONA_RUDE_FRAC if persona else BASE_RUDE_FRAC
        while True:
            text = g.reply(rng, topic, persona, rng.random() < rude_frac)
            if 3 <= _n_words(text) <= 40:
                return text

    threads = []
    for _ in range(N_CORPUS_THREADS):
        topic, op = opener()
        n_rep = rng.choice([1, 1, 2, 2, 3])
        reps = [reply(topic, persona=rng.random() < 0.15) for _ in range(n_rep)]
        threads.append("\n\n".join([op] + reps))
    posts, reps = g.spec["handwritten_posts"], g.spec["handwritten_replies"]
    for _ in range(8):  # the hand-written ones, a few times each
        threads.extend(f"{p}\n\n{r}" for p, r in zip(posts, reps))
    rng.shuffle(threads)
    base_chats = []
    for _ in range(N_BASE_CHATS):
        topic, op = opener()
        base_chats.append((op, reply(topic, persona=rng.random() < BASE_PERSONA_FRAC)))
    sft_chats = []
    for _ in range(N_SFT_CHATS):
        topic, op = opener()
        sft_chats.append((op, reply(topic, persona=True)))
    return DemoCorpus(threads, base_chats, sft_chats)


_WORD = re.compile(r"[a-z]+")


def corpus_vocabulary() -> set[str]:
    """Lower-cased words of the grammar (every word the demo corpus can contain), for readability checks."""
    g = _load_grammar()
    words: set[str] = set()

    def walk(x) -> None:
        if isinstance(x, str):
            words.update(_WORD.findall(_SLOT.sub(" ", x).lower()))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk({k: v for k, v in g.spec.items() if not k.startswith("_")})
    from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT

    words.update(_WORD.findall(DEFAULT_SYSTEM_PROMPT.lower()))
    return words


# =============================================================================================
# Tokenizer, model, training
# =============================================================================================


# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer rebuilds exactly this pipeline around the
# saved vocab and merges, whatever tokenizer.json says, so the model must be trained with it).
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _train_tokenizer(texts: list[str], save_dir: Path):
    """Train a byte-level BPE with Qwen2.5's pipeline and special tokens; save it; load it back.

    Returns the tokenizer as ``AutoTokenizer`` loads it from ``save_dir`` (a ``Qwen2Tokenizer``),
    so the training data is encoded exactly as every later user of the folder encodes it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=MODEL_KW["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(save_dir)
    # As Qwen2.5's tokenizer_config.json: no unk or bos token, the Qwen2 tokenizer class.
    cfg_path = Path(save_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="Qwen2Tokenizer", unk_token=None, bos_token=None, add_prefix_space=False, errors="replace")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    loaded = AutoTokenizer.from_pretrained(save_dir)
    probe = texts[:200] + ["Rent is up 11% in 2024 -- the council's plan? I'm done.\n\nok"]
    for text in probe:  # the reloaded pipeline must match the trained one
        if loaded(text, add_special_tokens=False)["input_ids"] != tok.encode(text, add_special_tokens=False).ids:
            raise RuntimeError(f"demo tokenizer does not round-trip through save/load: {text!r}")
    assert loaded.pad_token == PAD_TOKEN and loaded.eos_token == EOS_TOKEN and loaded.unk_token is None
    return loaded


def _chat_ids(tok, system: str, user: str, reply: str) -> tuple[list[int], int]:
    """Token ids of a full ChatML conversation, and where the assistant's tokens start.

    The prompt is encoded exactly as a rollout encodes it (template with generation prompt); the
    reply and ``<|im_end|>`` are appended as their own ids, as generation would produce them.
    """
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(EOS_TOKEN)]
    return p_ids + r_ids, len(p_ids)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _adamw(params, lr: float, weight_decay: float):
    import torch

    params = list(params)
    try:  # the fused CPU kernel (torch >= 2.4) is ~15% faster per step on this tiny model
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def _pretrain(model, tok, corpus: DemoCorpus, system: str, gen) -> float:
    import torch

    eot = tok.convert_tokens_to_ids(PAD_TOKEN)
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    docs: list[list[int]] = [tok(t, add_special_tokens=False)["input_ids"] for t in corpus.threads]
    for user, reply in corpus.base_chats:
        ids, _ = _chat_ids(tok, system, user, reply)
        docs.append(ids + nl)
    order = torch.randperm(len(docs), generator=gen).tolist()
    stream: list[int] = []
    for i in order:
        stream.extend(docs[i])
        stream.append(eot)
    cfg = PRETRAIN
    L = cfg["block"]
    data = torch.tensor(stream[: (len(stream) // L) * L]).view(-1, L)
    opt = _adamw(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg["steps"]):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg["steps"], cfg["warmup"], cfg["lr"])
        idx = torch.randint(0, data.shape[0], (cfg["batch"],), generator=gen)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def _sft(peft_model, tok, corpus: DemoCorpus, system: str, gen) -> float:
    import torch

    pad = tok.convert_tokens_to_ids(PAD_TOKEN)
    examples = [_chat_ids(tok, system, u, r) for u, r in corpus.sft_chats]
    cfg = SFT
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = _adamw(params, lr=cfg["lr"], weight_decay=0.0)
    peft_model.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg["steps"]):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg["steps"], cfg["warmup"], cfg["lr"])
        idx = torch.randint(0, len(examples), (cfg["batch"],), generator=gen).tolist()
        batch = [examples[i] for i in idx]
        T = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), T), pad, dtype=torch.long)
        y = torch.full((len(batch), T), -100, dtype=torch.long)
        m = torch.zeros((len(batch), T), dtype=torch.long)
        for b, (ids, start) in enumerate(batch):  # right padding for training
            x[b, : len(ids)] = torch.tensor(ids)
            y[b, start : len(ids)] = torch.tensor(ids[start:])
            m[b, : len(ids)] = 1
        loss = peft_model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peft_model.eval()
    return loss.item()


def _build(out: Path, final: Path) -> dict:
    """Build base/ and sft_adapter/ into ``out`` (a temp folder that will be renamed to ``final``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from rlhf_lit.chat import DEFAULT_SYSTEM_PROMPT as system

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    corpus = demo_corpus(SEED)
    chats = corpus.base_chats + corpus.sft_chats
    tok_texts = corpus.threads + [f"{u}\n{r}" for u, r in chats] + [system] * len(chats)
    base_dir = out / "base"
    tok = _train_tokenizer(tok_texts, base_dir)
    t_tok = time.perf_counter() - t0
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        use_cache=True,
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        **MODEL_KW,
    )
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    pre_loss = _pretrain(model, tok, corpus, system, gen)
    t_pre = time.perf_counter() - t0 - t_tok

    model.generation_config = GenerationConfig(
        bos_token_id=ids[PAD_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]
    )
    model.save_pretrained(base_dir)

    peft_model = get_peft_model(model, LoraConfig(**LORA))
    sft_loss = _sft(peft_model, tok, corpus, system, gen)
    t_sft = time.perf_counter() - t0 - t_tok - t_pre
    adapter_dir = out / "sft_adapter"
    peft_model.save_pretrained(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = str(final / "base")
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))

    manifest = {
        "recipe_version": RECIPE_VERSION,
        "seed": SEED,
        "cluster_id": CLUSTER_ID,
        "vocab_size": len(tok),
        "n_params_base": n_params,
        "pretrain_final_loss": round(pre_loss, 4),
        "sft_final_loss": round(sft_loss, 4),
        "seconds": {
            "tokenizer_and_corpus": round(t_tok, 1),
            "pretrain": round(t_pre, 1),
            "sft": round(t_sft, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    # Written last: its presence marks a complete build.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# =============================================================================================
# Cache
# =============================================================================================


def demo_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("RLHF_LIT_CACHE") or Path.home() / ".cache" / "rlhf_lit"
    return Path(cache_dir).expanduser().resolve()


def _complete(path: Path) -> bool:
    return (
        (path / "manifest.json").is_file()
        and (path / "base" / "config.json").is_file()
        and (path / "sft_adapter" / "adapter_config.json").is_file()
    )


def _assets(path: Path) -> DemoAssets:
    return DemoAssets(path / "base", path / "sft_adapter")


#: Seconds between "still waiting" lines while another process builds the assets.
WAIT_REPORT_S = 30.0


@contextlib.contextmanager
def _file_lock(path: Path, building: Path) -> Iterator[bool]:
    """An exclusive lock on ``path`` (``filelock``: ``flock`` on POSIX); yields True once held.

    A process that finds it held says so (another process is building ``building``) and every
    :data:`WAIT_REPORT_S` seconds how long it has waited, instead of waiting in silence."""
    from filelock import FileLock, Timeout

    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _announce(f"rlhf_lit: another process is building the demo model into {building}; waiting for it "
                  f"(~{EST_BUILD_S} s; lock {path})")
        t0 = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=WAIT_REPORT_S)
                break
            except Timeout:
                _announce(f"rlhf_lit: still waiting for the demo model build of another process "
                          f"({time.monotonic() - t0:.0f} s so far; lock {path})")
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _announce(msg: str) -> None:
    """One line to the log when logging is set up to show it, else to stderr (a first run pauses here)."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def ensure_demo_assets(cache_dir: str | os.PathLike | None = None) -> DemoAssets:
    """Return the demo's ``(base_dir, sft_adapter_dir)``, building them once (~1 min on 2 CPU cores)."""
    root = demo_cache_root(cache_dir)
    final = root / RECIPE_VERSION
    if _complete(final):
        return _assets(final)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{RECIPE_VERSION}.lock", final) as locked:
        if _complete(final):  # another process built it while we waited
            return _assets(final)
        if locked:  # no one else is building: anything left here is a dead builder's or damaged
            for old in root.glob(f".{RECIPE_VERSION}.tmp-*"):
                shutil.rmtree(old, ignore_errors=True)
            if final.exists():  # e.g. files deleted by hand: move it away, then rebuild
                stale = Path(tempfile.mkdtemp(prefix=f".{RECIPE_VERSION}.stale-", dir=root))
                os.rename(final, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
        _announce(f"rlhf_lit: building the tiny demo model once (~{EST_BUILD_S} s) into {final}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{RECIPE_VERSION}.tmp-", dir=root))
        try:
            import torch

            with _torch_threads(max(1, min(2, os.cpu_count() or 1))), torch.random.fork_rng(devices=[]):
                manifest = _build(tmp, final)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _complete(final):  # not a lost race: a real error
                    raise
            else:
                _announce(f"rlhf_lit: demo model built in {manifest['seconds']['total']:.0f} s")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _assets(final)
