"""Checkpoint files that are whole or absent, and a clear error for one that is damaged.

Lightning's ``TorchCheckpointIO`` writes a checkpoint in place: a full disk or a crash mid-write
leaves a truncated ``last.ckpt`` beside the good checkpoints, and ``--ckpt_path last`` then fails
inside ``torch.load`` ("failed finding central directory", a bare ``EOFError``).
:class:`AtomicCheckpointIO` writes each checkpoint with :func:`rlhf_lit.atomic_files.atomic_writer`
(temporary file beside it, flush, ``fsync``, rename): the old file stays until the new one is
complete. Loading a file that is damaged anyway (written by an older version, copied halfway)
raises :class:`DamagedCheckpointError`, naming the file and the newest intact checkpoint beside it.

A torch checkpoint is a zip archive; :func:`checkpoint_problem` checks its directory and every
member's CRC (``zipfile``), which reads the file once: megabytes for the adapters' checkpoints.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlhf_lit.atomic_files import atomic_writer


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, empty, not a torch archive)."""


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """What is wrong with the checkpoint file ``path``, or None when it is an intact archive.

    Returns a short reason: ``empty file``, ``not a zip archive (truncated or not a torch
    checkpoint)``, ``member X fails its CRC``... Raises FileNotFoundError for a missing file."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"not a complete zip archive ({size:,} bytes): cut short while written, or not a torch checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"unreadable zip archive ({size:,} bytes): {e}"
    if bad is not None:
        return f"member {bad!r} fails its CRC check ({size:,} bytes)"
    return None


#: Keys every checkpoint Lightning writes holds (``Trainer.save_checkpoint``).
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")


def not_lightning_problem(path: str | os.PathLike) -> Optional[str]:
    """Why an intact torch file ``path`` is not a Lightning checkpoint (a plain ``torch.save`` of
    weights, say), or None when it is one. Loads the file memory-mapped, as Lightning would."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a zip archive torch cannot read (any other zip file)
        return f"torch cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a checkpoint's dict"
    missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
    return f"it has no {' and no '.join(repr(k) for k in missing)}" if missing else None


def newest_intact_checkpoint(folder: str | os.PathLike, exclude: Optional[Path] = None) -> Optional[Path]:
    """The most recently modified ``*.ckpt`` in ``folder`` (other than ``exclude``) that
    :func:`checkpoint_problem` passes, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob("*.ckpt") if exclude is None or p.resolve() != Path(exclude).resolve()]
    for p in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(p) is None:
            return p
    return None


def resume_checkpoint(folders: Iterable[str | os.PathLike]) -> Optional[Path]:
    """The checkpoint ``--ckpt_path last`` resumes from: the most recently modified ``last*.ckpt``
    (``last.ckpt``, or a versioned ``last-v1.ckpt``) in ``folders``, or None when there is none.

    The rule is Lightning's (``_CheckpointConnector._parse_ckpt_path`` takes the newest, by
    modification time, of ``ModelCheckpoint._find_last_checkpoints``); the CLI's checks at start
    and ``export <run folder>`` both ask here, so they name the file that ``fit`` resumes from."""
    lasts = [p for f in folders if Path(f).is_dir() for p in Path(f).glob("last*.ckpt") if p.is_file()]
    return max(lasts, key=lambda p: p.stat().st_mtime) if lasts else None


def damaged_checkpoint_message(path: str | os.PathLike, problem: str) -> str:
    """The error text for a damaged checkpoint: the file, what is wrong, the last good one."""
    path = Path(path)
    good = newest_intact_checkpoint(path.parent, exclude=path)
    if good is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(good.stat().st_mtime))
        hint = (f"The newest intact checkpoint beside it is {good} (saved {when}): resume from it with "
                f"--ckpt_path {good}, and move the damaged file away.")
    else:
        hint = f"No intact checkpoint is left in {path.parent}."
    return f"the checkpoint {path} is damaged: {problem}. {hint}"


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raises DamagedCheckpointError (see :func:`damaged_checkpoint_message`) unless ``path`` is an
    intact checkpoint archive."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(damaged_checkpoint_message(path, problem))


def checkpoint_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a checkpoint records (``rlhf_lit.settings``: seeds, batch size, world size...),
    read without loading its tensors (memory-mapped); {} for a checkpoint without them."""
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    meta = ckpt.get("rlhf_lit") if isinstance(ckpt, dict) else None
    return dict(meta.get("settings") or {}) if isinstance(meta, dict) else {}


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves and a clear error for a damaged file (see the
    module docstring). Local paths only; a remote URL (``s3://``...) falls back to Lightning's
    own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        existed = path.exists()
        buffer = io.BytesIO()  # serialised first: a failing write then raises the OS's error, not torch's
        torch.save(checkpoint, buffer)
        try:
            with atomic_writer(path) as fh:
                fh.write(buffer.getbuffer())
        except OSError as e:
            kept = "the previous checkpoint there is intact" if existed else "nothing was written"
            raise OSError(e.errno, f"could not write the checkpoint {path} ({e.strerror or e}); {kept}") from e

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:
            if "://" in str(path) or not Path(path).is_file():
                raise
            problem = checkpoint_problem(path)
            if problem is None:
                raise
            raise DamagedCheckpointError(damaged_checkpoint_message(path, problem)) from e
