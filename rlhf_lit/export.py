"""Exports, atomically: the trained policy adapter as a plain PEFT LoRA folder, from a live model or
from a checkpoint; a trained reward model (adapter + scalar head + tokenizer + manifest) as one folder.

The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` and loads with
``PeftModel.from_pretrained(base, folder)``, social-sim's ``model.load_adapter(folder, name)`` and
vLLM's LoRA support. It is written to a temporary folder beside the target (files flushed and
``fsync``-ed) and renamed into place, so an interrupted export never leaves a half-written
adapter; it gets the permissions of the user's umask (not ``mkdtemp``'s private ``0o700``), so a
serving process under another user can read it.

A checkpoint holds the policy adapter's weights and (since this version) its exported
``adapter_config.json``: :func:`export_checkpoint` turns it into the same folder without loading
any model, from the command line as

    python -m rlhf_lit export outputs/demo/checkpoints/last.ckpt --out my_adapter
    python -m rlhf_lit export outputs/c13 --loras-path /path/to/social-sim/loras --cluster 13 --suffix -rlhf-tox
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from rlhf_lit.atomic_files import apply_umask, fsync_folder
from rlhf_lit.errors import ConfigError, InputFileError, run_reporting_user_errors

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
CONFIG_KEY = "policy_adapter_config"  # the checkpoint's rlhf_lit entry holding the exported config (JSON text)


def plain_config(config: dict[str, Any], base_model: Optional[str], plain_lora: bool = True) -> dict[str, Any]:
    """The exported form of a PEFT adapter config: for inference, ``base_model_name_or_path`` set
    (``builtin:`` names resolved to their folder) and, for ``plain_lora``, no ``modules_to_save``."""
    from rlhf_lit.paths import resolve_model_path

    config = dict(config)
    if base_model is not None:
        config["base_model_name_or_path"] = resolve_model_path(base_model)
    config["inference_mode"] = True
    if isinstance(config.get("target_modules"), list):  # a set in peft: any order
        config["target_modules"] = sorted(config["target_modules"])
    if plain_lora:
        config["modules_to_save"] = None
    return config


def adapter_config_json(peft_model, adapter_name: str, base_model: Optional[str] = None) -> str:
    """The ``adapter_config.json`` text :func:`export_adapter` writes for ``adapter_name``, without
    writing anything (what checkpoints carry for :func:`export_checkpoint`)."""
    config = peft_model.peft_config[adapter_name].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # as peft's own JSON
    return json.dumps(plain_config(json.loads(json.dumps(config, default=str)), base_model), indent=2,
                      sort_keys=True)


#: The files that mark a folder as an export this module may replace (an adapter, a reward model).
EXPORT_MARKERS = (CONFIG, "reward_model.json")


def check_replaceable(out_dir: str | Path, option: str = "the export folder") -> None:
    """Refuse to replace anything but an earlier export: ``out_dir`` may be absent, an empty folder,
    or a folder holding ``adapter_config.json`` or ``reward_model.json``. A file, or a folder of other
    things (a run folder, a parent of runs), is never deleted to make room for an adapter.

    Raises:
        ConfigError: naming ``option``, the path and what it holds.
    """
    out_dir = Path(out_dir).expanduser()
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"{option}={str(out_dir)!r} is a file, not a folder: an export writes a folder there and "
                          f"would delete it; choose a new folder name")
    content = sorted(p.name for p in out_dir.iterdir())
    if content and not any(m in content for m in EXPORT_MARKERS):
        shown = ", ".join(content[:5]) + (", ..." if len(content) > 5 else "")
        raise ConfigError(f"{option}={str(out_dir)!r} holds {len(content)} {'entry' if len(content) == 1 else 'entries'} that are not an export ({shown}): "
                          f"an export replaces its whole folder, so it writes only into a new folder, an empty one "
                          f"or an earlier export (one with {' or '.join(EXPORT_MARKERS)}); choose another folder")


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` to write a whole folder into. When the block ends
    normally its files are ``fsync``-ed, it takes the user's umask (not ``mkdtemp``'s ``0o700``) and
    replaces ``out_dir`` by renames (:func:`_swap_into_place`); when it raises, it is removed and
    ``out_dir`` is untouched.

    Raises:
        OSError: the folder beside ``out_dir`` is not writable (nothing is left behind).
        ConfigError: ``out_dir`` is something other than an earlier export (:func:`check_replaceable`).
    """
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        yield staging
        for f in staging.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        apply_umask(staging)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(out_dir.parent)


def write_adapter_folder(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (``tensors``: name -> tensor)
    as the folder ``out_dir``, replacing any previous one atomically (see the module docstring).

    Raises:
        OSError: the folder beside ``out_dir`` is not writable (nothing is left behind).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with staged_folder(out_dir) as new:
        save_file({k: v.contiguous() for k, v in tensors.items()}, new / WEIGHTS, metadata={"format": "pt"})
        (new / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def export_adapter(peft_model, adapter_name: str, out_dir: str | Path, base_model: Optional[str] = None,
                   plain_lora: bool = True) -> Path:
    """Save ``adapter_name`` of ``peft_model`` to ``out_dir``.

    Args:
        base_model: written as ``base_model_name_or_path`` (a Hub id stays portable; ``builtin:`` names
            are resolved to the local folder).
        plain_lora: drop ``modules_to_save`` copies (e.g. extra-vocabulary embeddings), which vLLM
            and social-sim's loaders reject; only LoRA matrices remain.
    """
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
        src = tmp / adapter_name if (tmp / adapter_name / CONFIG).is_file() else tmp
        config = plain_config(json.loads((src / CONFIG).read_text()), base_model, plain_lora)
        tensors = load_file(src / WEIGHTS)
        if plain_lora:
            dropped = [k for k in tensors if "lora_" not in k]
            if dropped:
                log.warning("exporting plain LoRA: dropped %d non-LoRA tensors (e.g. %s)", len(dropped), dropped[0])
            tensors = {k: v for k, v in tensors.items() if "lora_" in k}
        write_adapter_folder(out_dir, config, tensors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def checkpoint_adapter(checkpoint: dict[str, Any], adapter_name: str = "policy") -> tuple[dict[str, Any], dict]:
    """The exported adapter (config, tensors) held by a stage's checkpoint.

    The checkpoint's trained tensors are named as in the stage (``model.peft.<peft key>``, with the
    adapter's name after each ``lora_*`` part); PEFT's files drop the adapter name. Only the LoRA
    matrices of ``adapter_name`` are kept (no value head, no critic adapter), as in
    :func:`export_adapter` with ``plain_lora``.

    Raises:
        ValueError: the checkpoint holds no LoRA weights of ``adapter_name``, or no adapter config
            and no local SFT adapter folder to take it from.
    """
    meta = checkpoint.get("rlhf_lit", {})
    tensors = {}
    for key, value in checkpoint.get("state_dict", {}).items():
        parts = key.split(".")
        if parts[:2] != ["model", "peft"]:
            continue
        parts = parts[2:]
        at = [i for i in range(1, len(parts)) if parts[i] == adapter_name and parts[i - 1].startswith("lora_")]
        if not at:
            continue
        tensors[".".join(parts[:at[0]] + parts[at[0] + 1:])] = value
    if not tensors:
        raise ValueError(f"the checkpoint holds no LoRA weights of the {adapter_name!r} adapter "
                         f"(is it a checkpoint of an rlhf_lit stage?)")
    if CONFIG_KEY in meta:
        config = json.loads(meta[CONFIG_KEY])
    else:  # written before checkpoints carried it: the adapter the policy started from has the same config
        from rlhf_lit.paths import resolve_model_path

        start = meta.get("policy_adapter") or meta.get("sft_adapter")
        folder = Path(resolve_model_path(start)) if start else None
        if folder is None or not (folder / CONFIG).is_file():
            raise ValueError(f"the checkpoint carries no adapter config and its SFT adapter {start!r} is not a "
                             f"local folder to read one from")
        config = plain_config(json.loads((folder / CONFIG).read_text()), meta.get("base_model"))
    return config, tensors


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the policy adapter of the checkpoint ``ckpt_path`` as a plain PEFT folder ``out_dir``
    (no model is loaded: megabytes of tensors are renamed and written).

    Raises:
        FileNotFoundError: no such file.
        rlhf_lit.checkpoint_io.DamagedCheckpointError: a damaged file (named, with the last good one).
        ValueError: see :func:`checkpoint_adapter`.
    """
    import torch

    from rlhf_lit.checkpoint_io import check_checkpoint

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}")
    check_checkpoint(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config, tensors = checkpoint_adapter(checkpoint)
    return write_adapter_folder(out_dir, config, tensors)


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
    Only plain LoRA files are copied; the swap into place is atomic, and the folder and files get
    the user's umask (social-sim may serve them under another user).
    """
    src = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src} is not an exported adapter: {name} is missing")
    config = json.loads((src / CONFIG).read_text())
    if config.get("modules_to_save"):
        raise ValueError(f"{src} carries modules_to_save {config['modules_to_save']}: export it with plain_lora=True")
    target = Path(loras_path) / (lora_name_template.format(i=cluster) + suffix)
    with staged_folder(target) as staging:
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(src / name, staging / name)  # content only: modes come from the umask
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
    with staged_folder(out_dir) as staging:
        export_adapter(peft_model, adapter_name, staging / RM_ADAPTER, base_model=manifest["base_model"])
        save_file({"weight": head.weight.detach().float().cpu().contiguous(),
                   "bias": head.bias.detach().float().cpu().contiguous()}, str(staging / RM_HEAD),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(staging / RM_TOKENIZER)
        full = {"format": RM_FORMAT, "version": RM_VERSION, **manifest, "adapter": RM_ADAPTER, "head": RM_HEAD,
                "tokenizer": RM_TOKENIZER, "hidden_size": int(head.weight.shape[1])}
        (staging / RM_MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
    return out_dir


def read_reward_model_manifest(folder: str | Path) -> dict:
    """The manifest of a folder written by :func:`export_reward_model`, checked.

    Raises:
        FileNotFoundError: no manifest, or a file it names is missing (named).
        ValueError: not JSON, another format or version, or a missing field (named); a damaged head
            file or one of another shape (:func:`check_reward_head`).
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
    check_reward_head(folder / manifest["head"], manifest["hidden_size"])
    return manifest


def check_reward_head(path: str | Path, hidden_size: int) -> None:
    """The scalar head file of a reward model folder is a whole safetensors file holding ``weight``
    of shape (1, ``hidden_size``) and ``bias`` of shape (1,). Reads the header only (bytes, not MBs).

    Raises:
        ValueError: naming the file, what is wrong (damaged, a tensor missing or of another shape)
            and what was expected.
    """
    from safetensors import safe_open

    path = Path(path)
    expected = f"expected the reward model's scalar head: 'weight' (1, {hidden_size}) and 'bias' (1,)"
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
        raise ValueError(f"{path} is damaged ({e}; {path.stat().st_size:,} bytes): {expected}; "
                         f"export the reward model again") from None
    want = {"weight": (1, int(hidden_size)), "bias": (1,)}
    if any(shapes.get(k) != v for k, v in want.items()):
        raise ValueError(f"{path} holds {shapes or 'no tensors'}; {expected} (hidden_size in its manifest)")


# ---------------------------------------------------------------------------------------------
# python -m rlhf_lit export
# ---------------------------------------------------------------------------------------------
def join_dash_values(argv: Sequence[str], options: Sequence[str] = ("--suffix",)) -> list[str]:
    """``--suffix -rlhf-tox`` as ``--suffix=-rlhf-tox``: argparse reads a value that starts with a dash
    as an option and fails ("expected one argument"), and social-sim suffixes start with one."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _checkpoint_of(path: Path) -> Path:
    """A checkpoint file, or the checkpoint that ``--ckpt_path last`` resumes a run folder (or
    checkpoint folder) from: its newest ``last*.ckpt``."""
    if path.is_dir():
        from rlhf_lit.checkpoint_io import resume_checkpoint

        found = resume_checkpoint([path / "checkpoints", path])
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoints/last.ckpt: give a checkpoint file")
        return found
    return path


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``python -m rlhf_lit export CHECKPOINT [--out DIR] [--loras-path P --cluster I [--suffix S]]``."""
    ap = argparse.ArgumentParser(
        prog="python -m rlhf_lit export",
        description="Turn a checkpoint of a run into the plain PEFT LoRA adapter (adapter_config.json + "
                    "adapter_model.safetensors), without training or loading a model; optionally copy it into "
                    "social-sim's loras folder under its naming.")
    ap.add_argument("checkpoint", help="a .ckpt file, or a run folder (its checkpoints/last.ckpt: the checkpoint "
                                       "'--ckpt_path last' resumes from)")
    ap.add_argument("--out", help="the adapter folder to write (default: <run folder>/adapter-<checkpoint name>)")
    ap.add_argument("--loras-path", help="also copy it into social-sim's loras folder")
    ap.add_argument("--cluster", type=int, help="persona cluster id i (with --loras-path)")
    ap.add_argument("--template", default=SOCIAL_SIM_TEMPLATE, help="social-sim's lora_name_template")
    ap.add_argument("--suffix", default="", help="appended to the social-sim folder name, e.g. -rlhf-tox")
    args = ap.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    if args.loras_path and args.cluster is None:
        ap.error("--loras-path needs --cluster")
    try:
        ckpt = _checkpoint_of(Path(args.checkpoint))
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        out = Path(args.out) if args.out else run / f"adapter-{ckpt.stem}"
        path = export_checkpoint(ckpt, out)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputFileError(str(e)) from None
    print(f"wrote {path} (from {ckpt})")
    if args.loras_path:
        target = export_for_social_sim(path, args.loras_path, args.cluster, args.template, args.suffix)
        print(f"wrote {target}")
    return path


if __name__ == "__main__":  # pragma: no cover
    run_reporting_user_errors(main)
