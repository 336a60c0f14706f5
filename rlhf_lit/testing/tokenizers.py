"""Tiny tokenizers written on the spot, for the test kit's tiny models, the tests and the benchmarks.

* :func:`build_chatml_tokenizer`: the tiny ChatML tokenizer of every tiny chat model (Qwen2-shaped
  policies and reward models, the Llama-shaped judge, the benchmark's 7B-shaped assets).
* :func:`build_bert_tokenizer`: a WordPiece tokenizer for the tiny BERT classifiers (Detoxify's
  format and sequence-classifier folders).
"""

from __future__ import annotations

import itertools
import re
import string
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

from rlhf_lit.chat import CHATML_TEMPLATE, DEFAULT_SYSTEM_PROMPT

#: A few whole words, so that the tiny tokenizers read common test sentences in few tokens.
TINY_WORDS = (
    "the a an and or but not no yes is are was were be to of in on at for with you your i we they "
    "he she it this that what why how who good bad nice great love hate stupid idiot kill post reply "
    "like thread people vote news today day new hello world thanks please"
).split()


#: Qwen2.5's ChatML special tokens in the order of their ids: PAD, turn start, EOS.
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: The characters that are tokens of their own in :func:`build_chatml_tokenizer`, in id order:
#: printable ASCII and the newline. Any other character is dropped by the tokenizer.
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

#: The words of the system turn that ``PromptDataModule`` puts before every prompt: the default
#: words of :func:`build_chatml_tokenizer`, so that a prompt reads in about as many tokens as with
#: a real tokenizer rather than letter by letter.
SYSTEM_PROMPT_WORDS = tuple(dict.fromkeys(re.findall(r"[A-Za-z]+", DEFAULT_SYSTEM_PROMPT)))


def build_chatml_tokenizer(
    words: Iterable[str] = SYSTEM_PROMPT_WORDS,
    *,
    size: Optional[int] = None,
    special_tokens: Sequence[str] = CHATML_SPECIAL_TOKENS,
    pad_token: str = "<|endoftext|>",
    eos_token: str = "<|im_end|>",
    bos_token: Optional[str] = None,
    chat_template: Optional[str] = CHATML_TEMPLATE,
    padding_side: str = "right",
    model_max_length: Optional[int] = None,
):
    """A tiny ChatML tokenizer that ``AutoTokenizer`` loads back as itself from any folder.

    It is a ``Qwen2Tokenizer``: Qwen2.5's byte-level BPE pipeline (NFC, Qwen2's pre-tokenizer,
    digits one by one) around a vocabulary written here. ``AutoTokenizer`` rebuilds that pipeline
    around the saved vocabulary and merges whenever ``config.json`` says ``model_type: qwen2``
    (whatever ``tokenizer_config.json`` names), and the saved ``tokenizer_class`` makes it do the
    same beside any other model or none; a word-level tokenizer beside a Qwen2 model reloads as
    a ``Qwen2Tokenizer`` that drops every word.

    Vocabulary, in id order:

    * the characters of :data:`ALPHABET`, one token each (``len(ALPHABET)`` ids);
    * each of ``words`` (ASCII letters) after a space, as one token: ``" love"`` is ``Ġlove``. A
      BPE builds a token by merges, so the prefixes (``Ġl``, ``Ġlo``, ``Ġlov``) are tokens too;
    * with ``size``, more such words (``Ġa`` ... ``Ġz``, ``Ġaa`` ...) until ``size`` ids;
    * ``special_tokens``, from id ``size`` on (or right after the words).

    So every id from ``len(ALPHABET)`` up to the specials decodes to a space and a word that
    encodes back to that one id, also between other such words; a word at the start of a text or
    line, with no space before it, is spelt in characters.

    Args:
        words: Words that must be single tokens after a space (ASCII letters only).
        size: Number of ids below the special tokens (filled with generated words); None: no filler.
        special_tokens: Special tokens, from id ``size`` on, in this order; they include ``pad_token``,
            ``eos_token`` and ``bos_token`` (the others become extra special tokens).
        pad_token, eos_token, bos_token: The named special tokens. There is no unk token: as in
            Qwen2's pipeline, a character outside :data:`ALPHABET` is dropped.
        chat_template: The chat template (None: none).
        padding_side: ``"left"`` for prompts of a decoder.
        model_max_length: The tokenizer's ``model_max_length`` (None: transformers' default).
    """
    from transformers import Qwen2Tokenizer

    named = [t for t in (pad_token, eos_token, bos_token) if t is not None]
    missing = [t for t in named if t not in special_tokens]
    if missing:
        raise ValueError(f"{missing} must be among special_tokens {list(special_tokens)}")
    vocab, merges = _byte_level_words(words, size)
    vocab.update({t: len(vocab) + i for i, t in enumerate(special_tokens)})
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        extra_special_tokens=[t for t in special_tokens if t not in named],
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tok.chat_template = chat_template
    return tok


def _byte_level_words(words: Iterable[str], size: Optional[int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and merges of :func:`build_chatml_tokenizer`, specials aside."""
    # Byte-level BPE tokens are spelt in the ByteLevel alphabet, where the space is "Ġ" and the
    # newline "Ċ": ask the pre-tokenizer rather than copy its table.
    from tokenizers.pre_tokenizers import ByteLevel

    byte_level = ByteLevel(add_prefix_space=False, use_regex=False)

    def spell(text: str) -> str:
        return "".join(piece for piece, _ in byte_level.pre_tokenize_str(text))

    vocab = {spell(c): i for i, c in enumerate(ALPHABET)}
    merges: list[tuple[str, str]] = []

    def add(word: str) -> None:
        if not (word.isascii() and word.isalpha()):
            raise ValueError(f"word {word!r}: only ASCII letters make one token after a space")
        token = spell(" " + word)
        for end in range(2, len(token) + 1):  # "Ġ" + "l" -> "Ġl", "Ġl" + "o" -> "Ġlo", ...
            if token[:end] not in vocab:
                vocab[token[:end]] = len(vocab)
                merges.append((token[: end - 1], token[end - 1]))

    for word in words:
        add(word)
    if size is not None:
        fillers = _letter_strings()
        while len(vocab) < size:
            add(next(fillers))
        if len(vocab) > size:
            raise ValueError(f"size={size} is too small for the alphabet and the words ({len(vocab)} tokens)")
    return vocab, merges


def _letter_strings() -> Iterator[str]:
    """a, b, ..., z, aa, ab, ...: shorter first, so every prefix comes before the strings it starts."""
    for n in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            yield "".join(letters)


def write_wordpiece_vocab(path: Union[str, Path]) -> Path:
    """Write a small WordPiece ``vocab.txt`` (BERT special tokens, single characters, ``##`` pieces
    and a few whole words) that can spell any lower-case ASCII text."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits] + TINY_WORDS
    seen: dict[str, None] = dict.fromkeys(tokens)
    path = Path(path)
    path.write_text("\n".join(seen) + "\n", encoding="utf-8")
    return path


def build_bert_tokenizer(folder: Union[str, Path]):
    """A lower-casing BERT WordPiece tokenizer built from :func:`write_wordpiece_vocab`, saved in
    ``folder`` and returned. ``model_max_length`` is 64."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_wordpiece_vocab(folder / "vocab.txt")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=64)
    tok.save_pretrained(folder)
    return tok
