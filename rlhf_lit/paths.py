"""Names of models and adapters: built-in demo names, local folders, Hub ids.

A leaf of the import graph (it imports :mod:`rlhf_lit.demo_assets` only when a ``builtin:`` name
is resolved): the data module, the model layer, the export and the CLI all resolve names here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from rlhf_lit.errors import ConfigError, InputFileError, MissingPathError
from rlhf_lit.text_files import read_text

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
        ConfigError: an unknown ``builtin:`` name.
    """
    if not is_builtin(name):
        return name
    if name not in BUILTIN_NAMES:
        raise ConfigError(f"unknown built-in model {name!r}; expected 'builtin:demo' or 'builtin:demo-sft'")
    from rlhf_lit.demo_assets import ensure_demo_assets

    assets = ensure_demo_assets()
    return str(assets.base_dir if name == "builtin:demo" else assets.sft_adapter_dir)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set)."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                       "TRANSFORMERS_OFFLINE")):
        return True
    try:
        import huggingface_hub.constants as constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path: it starts with ``.``, ``/`` or ``~``, has a
    backslash or more than one ``/``, or its first folder exists here (``loras/cluster13`` beside a
    ``loras`` folder). Such a name is never looked up on the Hub."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1 or not _HUB_ID.match(name):
        return True
    return Path(name.split("/", 1)[0]).is_dir()


def _missing(name: str, where: str, expected: str, hub_file: str, revision: Optional[str]) -> None:
    """``name`` is no local path: refuse a local-looking one or any when offline, else ask the Hub
    once whether it has ``hub_file`` (no retries)."""
    here = f"no such folder (relative to {os.getcwd()})"
    if looks_local(name):
        raise MissingPathError(f"{where}: {here}; expected {expected}. Unpack or copy it there first, or give its full "
                               f"path")
    if hub_offline():
        raise MissingPathError(f"{where}: {here}, and the Hugging Face Hub is off (HF_HUB_OFFLINE), so it is not looked "
                               f"up as a Hub id; expected {expected}")
    try:
        from huggingface_hub import file_exists

        found = file_exists(name, hub_file, revision=revision)
    except Exception as e:  # noqa: BLE001  (no network, a private repo: say so, do not retry)
        raise MissingPathError(f"{where}: {here}, and the Hub could not be asked for a repo of that name "
                               f"({type(e).__name__}: {str(e)[:200]}); expected {expected}") from None
    if not found:
        raise MissingPathError(f"{where}: {here}, and the Hub has no {hub_file} in a repo of that name; expected "
                               f"{expected}")


def check_adapter_path(name: Optional[str], option: str = "sft_adapter", where: Optional[str] = None) -> None:
    """Fail early, before any model loads, for an adapter that cannot load: a missing folder (with no
    network attempt for a local-looking path or when offline), no or unreadable
    ``adapter_config.json``, no weights file, or a damaged ``adapter_model.safetensors``.

    Args:
        where: what the messages begin with; default ``model.policy.<option>=<name>``. A caller whose
            adapter the user did not name by that option (a reward model's folder) names its own.

    Raises:
        MissingPathError: naming ``where`` (``model.policy.<option>``) and the path.
        InputFileError: naming ``where`` and the damaged file (and its line, for JSON).
    """
    if name is None or is_builtin(name):
        return
    where = where or f"model.policy.{option}={name!r}"
    p = Path(name).expanduser()
    if not p.exists():
        _missing(name, where, "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
                 "adapter_config.json", None)
        return
    if not p.is_dir():
        raise MissingPathError(f"{where} is a file; expected a PEFT adapter folder (adapter_config.json + weights)")
    config = p / "adapter_config.json"
    if not config.is_file():
        raise MissingPathError(f"{where} has no adapter_config.json (expected a PEFT adapter folder)")
    try:
        cfg = json.loads(read_text(config))
    except json.JSONDecodeError as e:
        raise InputFileError(f"{where}: {config}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except InputFileError as e:
        raise InputFileError(f"{where}: {e}") from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise InputFileError(f"{where}: {config} is not a PEFT adapter config (no 'peft_type')")
    weights = [p / "adapter_model.safetensors", p / "adapter_model.bin"]
    if not any(w.is_file() for w in weights):
        raise MissingPathError(f"{where} has adapter_config.json but no adapter_model.safetensors (or .bin): the "
                               f"weights are missing (an interrupted copy or export?)")
    if weights[0].is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights[0]), framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
            raise InputFileError(f"{where}: {weights[0]} is damaged ({e}; {weights[0].stat().st_size:,} bytes): copy or "
                                 f"export the adapter again") from None


def check_model_path(name: str, option: str = "model.policy.base_model", revision: Optional[str] = None) -> None:
    """Fail early for a base model that cannot load: a missing folder (no network attempt for a
    local-looking path or when offline; one Hub lookup otherwise), or a folder without
    ``config.json``.

    Raises:
        MissingPathError: naming ``option`` and the path.
    """
    if is_builtin(name):
        if name not in BUILTIN_NAMES:
            raise MissingPathError(f"{option}={name!r}: unknown built-in model; expected one of {BUILTIN_NAMES}")
        return
    where = f"{option}={name!r}"
    p = Path(name).expanduser()
    if not p.exists():
        _missing(name, where, "a transformers model folder (config.json + weights) or a Hub id", "config.json", revision)
        return
    if not (p / "config.json").is_file():
        raise MissingPathError(f"{where} has no config.json; expected a transformers model folder (save_pretrained "
                               f"layout)")


def tokenizer_path(base_model: str, sft_adapter: Optional[str]) -> str:
    """The tokenizer to use: the SFT adapter's folder when it ships one (an SFT run that added
    tokens saves its tokenizer beside the adapter), else the base model's."""
    if sft_adapter and not is_builtin(sft_adapter):
        folder = Path(sft_adapter).expanduser()
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return base_model
