"""Loading the tokenizer (the one place that calls ``AutoTokenizer.from_pretrained``), and checking
that it and a model agree: special tokens, vocabulary size, stop tokens.

The data module loads it (prompts are tokenized up front) and the training stage reuses that
object; a stage used without a data module loads it the same way. Reward models check their own
tokenizer against their own config with :func:`reconcile_special_tokens` too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf_lit.errors import ConfigError
from rlhf_lit.paths import resolve_model_path

log = logging.getLogger(__name__)


def load_tokenizer(name: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   chat_template: Optional[str] = None):
    """A tokenizer ready for PPO: left padding, a chat template, PAD distinct from EOS.

    Args:
        name: a Hub id, a local folder, or ``builtin:demo``.
        revision: Hub revision (ignored for local folders).
        trust_remote_code: allow tokenizer code shipped with the checkpoint.
        chat_template: a Jinja template (inline text or a file path) replacing the tokenizer's own.
    Raises:
        ConfigError: no chat template, or no PAD token distinct from EOS (PPO derives masks from them).
        InputFileError: a chat template file that is not UTF-8 text.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), revision=revision,
                                        trust_remote_code=trust_remote_code)
    if chat_template:
        p = Path(chat_template)
        if p.is_file():
            from rlhf_lit.text_files import read_text

            tok.chat_template = read_text(p, "data.chat_template")
        else:
            tok.chat_template = chat_template
    if tok.chat_template is None:
        raise ConfigError(f"tokenizer {name!r} has no chat template; set data.chat_template")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ConfigError(
            f"tokenizer {name!r}: PAD must exist and differ from EOS (PPO derives masks from them); "
            f"got pad={tok.pad_token!r}, eos={tok.eos_token!r}"
        )
    tok.padding_side = "left"
    return tok


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def reconcile_special_tokens(tokenizer, config, who: str, embedding_rows: Optional[int] = None,
                             hint: str = "") -> None:
    """Check a model's config against the tokenizer it is used with, before any batch runs.

    - More tokens than embedding rows (``embedding_rows``, else ``config.vocab_size``), or a special
      token id past the table: refused (a sampled or padded id past the table fails deep in a kernel,
      or reads another row).
    - PAD: ``config.pad_token_id`` is set to the tokenizer's, with a warning when they differed
      (sequence classifiers find each row's last token by the config's PAD id, so a wrong one makes
      scores depend on how much padding a batch has).
    - EOS, BOS: a difference is logged; the tokenizer's are the ones used (EOS ends responses, the
      tokenizer decides whether a BOS is prepended).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        config: the model's ``PretrainedConfig`` (its text config is read for multimodal models).
        who: names the model in messages (the option and path).
        embedding_rows: rows of the model's input embedding, when known (an adapter may resize it).
        hint: appended to the vocabulary-size error.
    Raises:
        ConfigError: the vocabulary does not fit the model.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = embedding_rows or getattr(text_config, "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(f"{who}: the tokenizer has {len(tokenizer)} tokens but the model's embedding {rows} rows"
                          + (f": {hint}" if hint else ""))
    for kind in ("pad", "eos", "bos"):
        tok_id = getattr(tokenizer, f"{kind}_token_id")
        if tok_id is not None and rows is not None and tok_id >= rows:
            raise ConfigError(f"{who}: the tokenizer's {kind.upper()} id {tok_id} is past the model's {rows} embedding "
                              f"rows")
        cfg_ids = _ids(getattr(text_config, f"{kind}_token_id", None))
        if tok_id is None or not cfg_ids or tok_id in cfg_ids:
            if kind == "pad" and tok_id is not None and not cfg_ids:
                text_config.pad_token_id = tok_id
            continue
        names = {i: tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else "?" for i in cfg_ids}
        theirs = ", ".join(f"{i} ({names[i]!r})" for i in sorted(cfg_ids))
        ours = f"{tok_id} ({getattr(tokenizer, f'{kind}_token')!r})"
        if kind == "pad":
            text_config.pad_token_id = tok_id
            if text_config is not config and hasattr(config, "pad_token_id"):
                config.pad_token_id = tok_id
            log.warning("%s: the model config's pad_token_id %s differs from its tokenizer's PAD %s; using the "
                        "tokenizer's (it pads every batch)", who, theirs, ours)
        else:
            log.info("%s: the model config's %s_token_id %s differs from its tokenizer's %s %s; the tokenizer's is "
                     "used", who, kind, theirs, kind.upper(), ours)


def resolve_stop_tokens(tokenizer, tokens: Sequence[str], option: str = "model.extra_stop_tokens") -> list[int]:
    """The ids that end a response: the tokenizer's EOS and each of ``tokens``, sorted.

    A token is looked up by name in the vocabulary (added and special tokens included); text that is
    not a token name but is exactly one token's text (``"\n\n"`` in a byte-level BPE) is that token,
    with a log line. An unknown-token entry never stands in for a missing token.

    Raises:
        ConfigError: naming ``option``: a token the tokenizer does not have, or the PAD token (padding
            is recognised by its id, so it cannot also end a response).
    """
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} - {None}
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{option}: {token!r} is not a token (expected a non-empty string)")
        if token in vocab:
            tid = int(vocab[token])
        else:
            enc = tokenizer.encode(token, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id and tokenizer.decode(enc) == token:
                tid = int(enc[0])
                log.info("%s: %r is the text of token %d (%r); responses stop on it", option, token, tid,
                         tokenizer.convert_ids_to_tokens(tid))
            else:
                specials = ", ".join(repr(t) for t in list(dict.fromkeys(tokenizer.all_special_tokens))[:8])
                which = f" ({tokenizer.name_or_path})" if tokenizer.name_or_path else ""
                eos = f" (EOS {tokenizer.eos_token!r} ends responses already)" if tokenizer.eos_token else ""
                raise ConfigError(
                    f"{option}: {token!r} is not a token of this tokenizer{which}; as text it is {len(enc)} tokens "
                    f"{tokenizer.convert_ids_to_tokens(enc[:6])}. A stop token must be one token: use a token of its "
                    f"vocabulary (special tokens: {specials}), or leave it out{eos}"
                )
        if tid == tokenizer.pad_token_id:
            raise ConfigError(
                f"{option}: {token!r} (id {tid}) is this tokenizer's PAD token, and padding is recognised by that id, "
                f"so it cannot also end a response. Leave it out (EOS {tokenizer.eos_token!r} ends responses "
                f"already), or use a tokenizer whose PAD is another token"
            )
        ids.add(tid)
    return sorted(ids)
