"""Exports, atomically: the trained policy adapter as a plain PEFT LoRA folder; a trained reward model
(adapter + scalar head + tokenizer + manifest) as one folder.

The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` and loads with
``PeftModel.from_pretrained(base, folder)``, social-sim's ``model.load_adapter(folder, name)`` and
vLLM's LoRA support. It is written to a temporary folder beside the target and renamed into place,
so an interrupted export never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def export_adapter(peft_model, adapter_name: str, out_dir: str | Path, base_model: Optional[str] = None,
                   plain_lora: bool = True) -> Path:
    """Save ``adapter_name`` of ``peft_model`` to ``out_dir``.

    Args:
        base_model: written as ``base_model_name_or_path`` (a Hub id stays portable; ``builtin:`` names
            are resolved to the local folder).
        plain_lora: drop ``modules_to_save`` copies (e.g. extra-vocabulary embeddings), which vLLM
            and social-sim's loaders reject; only LoRA matrices remain.
    """
    from safetensors.torch import load_file, save_file

    from rlhf_lit.paths import resolve_model_path

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        src = tmp / adapter_name if (tmp / adapter_name / CONFIG).is_file() else tmp
        config = json.loads((src / CONFIG).read_text())
        if base_model is not None:
            config["base_model_name_or_path"] = resolve_model_path(base_model)
        config["inference_mode"] = True
        if plain_lora:
            tensors = load_file(src / WEIGHTS)
            dropped = [k for k in tensors if "lora_" not in k]
            if dropped:
                log.warning("exporting plain LoRA: dropped %d non-LoRA tensors (e.g. %s)", len(dropped), dropped[0])
                save_file({k: v for k, v in tensors.items() if "lora_" in k}, src / WEIGHTS, metadata={"format": "pt"})
            config["modules_to_save"] = None
        (src / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        final = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
        for name in (CONFIG, WEIGHTS):
            shutil.copy2(src / name, final / name)
        _swap_into_place(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _swap_into_place(new: Path, target: Path) -> None:
    """Replace ``target`` by ``new`` with renames only: at every moment ``target`` is either the old
    complete adapter or the new complete one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name.rsplit('-', 1)[-1]}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


SOCIAL_SIM_TEMPLATE = "Qwen2.5-7B-Instruct-lora-finetuned-{i}-no-focal"


def export_for_social_sim(adapter_dir: str | Path, loras_path: str | Path, cluster: int,
                          lora_name_template: str = SOCIAL_SIM_TEMPLATE, suffix: str = "") -> Path:
    """Copy an exported adapter into social-sim's loras folder under its naming scheme.

    social-sim loads ``{loras_path}/{lora_name_template.format(i=cluster)}`` with
    ``model.load_adapter(path, adapter_name)``; ``suffix`` (e.g. ``-rlhf-tox``) keeps the SFT
    adapter of the same cluster beside it (point social-sim's template at the suffixed name).
    Only plain LoRA files are copied; the swap into place is atomic.
    """
    src = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src} is not an exported adapter: {name} is missing")
    config = json.loads((src / CONFIG).read_text())
    if config.get("modules_to_save"):
        raise ValueError(f"{src} carries modules_to_save {config['modules_to_save']}: export it with plain_lora=True")
    target = Path(loras_path) / (lora_name_template.format(i=cluster) + suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    for name in (CONFIG, WEIGHTS):
        shutil.copy2(src / name, staging / name)
    _swap_into_place(staging, target)
    return target


# ---------------------------------------------------------------------------------------------
# A trained reward model: adapter + scalar head + tokenizer + manifest, one folder
# ---------------------------------------------------------------------------------------------
RM_MANIFEST, RM_HEAD, RM_ADAPTER, RM_TOKENIZER = "reward_model.json", "head.safetensors", "adapter", "tokenizer"
RM_FORMAT, RM_VERSION = "rlhf_lit.reward_model", 1
RM_REQUIRED = ("format", "version", "base_model", "adapter", "head", "tokenizer", "hidden_size")


def export_reward_model(peft_model, adapter_name: str, head, tokenizer, out_dir: str | Path,
                        manifest: dict) -> Path:
    """Write a trained reward model as one folder, atomically::

        reward_model.json    the manifest: format, base model, how the score is read, the prompt
                             template (system prompt), length limits, training summary
        adapter/             the LoRA adapter, plain PEFT (loads with PeftModel.from_pretrained)
        head.safetensors     the scalar head on the last hidden state: weight (1, H), bias (1,)
        tokenizer/           the tokenizer with its chat template

    Args:
        head: the ``nn.Linear(H, 1)`` scalar head.
        manifest: at least ``base_model`` (a Hub id, folder or ``builtin:`` name, kept as given);
            the format fields and file names are added here.
    Raises:
        ValueError: ``manifest`` has no ``base_model``.
    """
    from safetensors.torch import save_file

    if not manifest.get("base_model"):
        raise ValueError("the reward model manifest needs 'base_model'")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        export_adapter(peft_model, adapter_name, staging / RM_ADAPTER, base_model=manifest["base_model"])
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, str(staging / RM_HEAD),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(staging / RM_TOKENIZER)
        full = {"format": RM_FORMAT, "version": RM_VERSION, **manifest, "adapter": RM_ADAPTER, "head": RM_HEAD,
                "tokenizer": RM_TOKENIZER, "hidden_size": int(head.weight.shape[1])}
        (staging / RM_MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_reward_model_manifest(folder: str | Path) -> dict:
    """The manifest of a folder written by :func:`export_reward_model`, checked.

    Raises:
        FileNotFoundError: no manifest, or a file it names is missing (named).
        ValueError: not JSON, another format or version, or a missing field (named).
    """
    folder = Path(folder).expanduser()
    path = folder / RM_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a trained reward model folder: {RM_MANIFEST} is missing "
                                f"(expected the export of the reward-model stage)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in RM_REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    if manifest["format"] != RM_FORMAT or manifest["version"] != RM_VERSION:
        raise ValueError(f"{path}: format {manifest['format']!r} version {manifest['version']!r}; "
                         f"expected {RM_FORMAT!r} version {RM_VERSION}")
    for key in ("adapter", "head", "tokenizer"):
        if not (folder / manifest[key]).exists():
            raise FileNotFoundError(f"{path}: '{key}' names {manifest[key]!r}, which is not in {folder}")
    return manifest
