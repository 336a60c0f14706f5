"""Tiny tokenizers written on the spot, for the test kit's tiny models, the tests and the benchmarks."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Union

#: A few whole words, so that the tiny tokenizers read common test sentences in few tokens.
TINY_WORDS = (
    "the a an and or but not no yes is are was were be to of in on at for with you your i we they "
    "he she it this that what why how who good bad nice great love hate stupid idiot kill post reply "
    "like thread people vote news today day new hello world thanks please"
).split()


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
