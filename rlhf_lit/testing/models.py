"""Tiny random models and checkpoints in the real on-disk formats.

The weights are random and the scores they produce meaningless; what they exercise is the real
loading and scoring code: Detoxify's checkpoint format, ``AutoModelForSequenceClassification``
folders and causal-LM judges.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence, Union

import torch

from rlhf_lit.chat import CHATML_TEMPLATE
from rlhf_lit.testing.tokenizers import TINY_WORDS, build_bert_tokenizer, build_chatml_tokenizer

#: Class names of Detoxify's ``original`` model, as stored in its checkpoints (Detoxify renames
#: ``toxic``, ``severe_toxic`` and ``identity_hate`` when it loads them).
DETOXIFY_ORIGINAL_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def _tiny_bert_config(vocab_size: int, num_labels: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
        **extra,
    )


def build_detoxify_checkpoint(
    folder: Union[str, Path],
    classes: Sequence[str] = tuple(DETOXIFY_ORIGINAL_CLASSES),
    seed: int = 0,
) -> tuple[Path, Path]:
    """Build a tiny random BERT toxicity classifier in Detoxify's own checkpoint format.

    Writes ``folder/hf`` (``config.json`` and tokenizer files: what Detoxify's
    ``huggingface_config_path`` expects) and ``folder/tiny-detoxify.ckpt``: a ``torch.save`` dict with
    ``config`` (``arch.args``: ``model_type``, ``model_name``, ``tokenizer_name``, ``num_classes``;
    ``dataset.args.classes``) and ``state_dict`` (the ``transformers`` model's own keys), as in the
    checkpoints Detoxify publishes. ``model_type`` is ``bert-base-uncased`` as in the real
    ``original`` checkpoint, so loading it offline needs the local-folder handling of
    :class:`rlhf_lit.rewards.Detoxify`.

    Returns:
        ``(checkpoint_path, huggingface_config_path)``.
    """
    from transformers import BertForSequenceClassification

    folder = Path(folder)
    hf = folder / "hf"
    tok = build_bert_tokenizer(hf)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_bert_config(len(tok), len(classes))).eval()
    model.config.save_pretrained(hf)
    ckpt = folder / "tiny-detoxify.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "type": "ToxicClassifier",
                    "args": {
                        "model_type": "bert-base-uncased",
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(classes),
                    },
                },
                "dataset": {"type": "JigsawDataOriginal", "args": {"classes": list(classes)}},
            },
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    return ckpt, hf


def build_sequence_classifier(
    folder: Union[str, Path],
    labels: Sequence[str] = ("negative", "positive"),
    seed: int = 0,
) -> Path:
    """Save a tiny random ``BertForSequenceClassification`` (``id2label`` from ``labels``) and its
    tokenizer with ``save_pretrained`` into ``folder``; returns the folder."""
    from transformers import BertForSequenceClassification

    folder = Path(folder)
    tok = build_bert_tokenizer(folder)
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    cfg = _tiny_bert_config(len(tok), len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    return folder


def _judge_instruction_words() -> list[str]:
    """The words of :class:`~rlhf_lit.rewards.LocalJudge`'s default system prompt and rating template:
    the tiny judge reads its own instructions in about one token a word, as a real judge does."""
    from rlhf_lit.rewards.judge_prompts import DEFAULT_BUCKET_TEMPLATE, DEFAULT_SYSTEM_PROMPT

    return re.findall(r"[A-Za-z]+", f"{DEFAULT_SYSTEM_PROMPT} {DEFAULT_BUCKET_TEMPLATE}")


def build_causal_lm(folder: Union[str, Path], seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny random Llama causal LM and its tokenizer into ``folder``; returns the folder.

    The tokenizer is :func:`~rlhf_lit.testing.tokenizers.build_chatml_tokenizer` with
    :data:`~rlhf_lit.testing.tokenizers.TINY_WORDS` and the words of LocalJudge's instructions as
    whole words, digits one token each, ``<|im_start|>`` as BOS and the ChatML template (none if
    ``chat_template`` is False).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_chatml_tokenizer(
        [*TINY_WORDS, *_judge_instruction_words()],
        bos_token="<|im_start|>",
        chat_template=CHATML_TEMPLATE if chat_template else None,
        model_max_length=256,
    )
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder
