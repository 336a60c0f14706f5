"""Loading the tokenizer: the one place that calls ``AutoTokenizer.from_pretrained``.

The data module loads it (prompts are tokenized up front) and the training stage reuses that
object; a stage used without a data module loads it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rlhf_lit.paths import resolve_model_path


def load_tokenizer(name: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   chat_template: Optional[str] = None):
    """A tokenizer ready for PPO: left padding, a chat template, PAD distinct from EOS.

    Args:
        name: a Hub id, a local folder, or ``builtin:demo``.
        revision: Hub revision (ignored for local folders).
        trust_remote_code: allow tokenizer code shipped with the checkpoint.
        chat_template: a Jinja template (inline text or a file path) replacing the tokenizer's own.
    Raises:
        ValueError: no chat template, or no PAD token distinct from EOS (PPO derives masks from them).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), revision=revision,
                                        trust_remote_code=trust_remote_code)
    if chat_template:
        p = Path(chat_template)
        tok.chat_template = p.read_text(encoding="utf-8") if p.is_file() else chat_template
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {name!r} has no chat template; set data.chat_template")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise ValueError(
            f"tokenizer {name!r}: PAD must exist and differ from EOS (PPO derives masks from them); "
            f"got pad={tok.pad_token!r}, eos={tok.eos_token!r}"
        )
    tok.padding_side = "left"
    return tok
