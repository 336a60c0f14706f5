"""Names of models and adapters: built-in demo names, local folders, Hub ids.

A leaf of the import graph (it imports :mod:`rlhf_lit.demo_assets` only when a ``builtin:`` name
is resolved): the data module, the model layer, the export and the CLI all resolve names here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("builtin:demo", "builtin:demo-sft")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_builtin(name: Optional[str]) -> bool:
    """Whether ``name`` is one of the embedded demo assets (``builtin:demo``, ``builtin:demo-sft``)."""
    return bool(name) and name.startswith(BUILTIN_PREFIX)


def resolve_model_path(name: str) -> str:
    """Map ``builtin:demo`` / ``builtin:demo-sft`` to the cached tiny assets (built on first use);
    anything else is returned unchanged.

    Raises:
        ValueError: an unknown ``builtin:`` name.
    """
    if not is_builtin(name):
        return name
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in model {name!r}; expected 'builtin:demo' or 'builtin:demo-sft'")
    from rlhf_lit.demo_assets import ensure_demo_assets

    assets = ensure_demo_assets()
    return str(assets.base_dir if name == "builtin:demo" else assets.sft_adapter_dir)


def check_adapter_path(name: Optional[str], option: str = "sft_adapter") -> None:
    """Fail early, before any model loads, for an adapter folder that does not exist.

    Raises:
        FileNotFoundError: naming ``model.policy.<option>``: a folder without ``adapter_config.json``,
            or a path that is neither an existing folder nor shaped like a Hub id.
    """
    if name is None or is_builtin(name):
        return
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"model.policy.{option}={name!r} has no adapter_config.json (expected a PEFT adapter folder)"
            )
    elif not _HUB_ID.match(name) or name.startswith("."):
        raise FileNotFoundError(f"model.policy.{option}={name!r}: no such folder (expected a PEFT adapter folder)")


def tokenizer_path(base_model: str, sft_adapter: Optional[str]) -> str:
    """The tokenizer to use: the SFT adapter's folder when it ships one (an SFT run that added
    tokens saves its tokenizer beside the adapter), else the base model's."""
    if sft_adapter and not is_builtin(sft_adapter):
        folder = Path(sft_adapter).expanduser()
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return base_model
