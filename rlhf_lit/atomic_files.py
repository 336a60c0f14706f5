"""Atomic single-file writes: a reader sees the old file or the complete new one, never half of one.

Every writer here goes through one recipe: create a temporary file beside the target (same folder,
hence the same file system, so the final rename cannot turn into a copy), write, flush, ``fsync``,
then ``os.replace`` it over the target. On any error, a ``KeyboardInterrupt`` included, the
temporary file is removed and the target is left as it was.

The new file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less
the process umask), not the ``0o600`` of :func:`tempfile.mkstemp`: run outputs are meant to be
read by other users and tools.

Standard library only, so the scripts under ``scripts/`` import it without loading torch.
Replacing a whole folder (an exported adapter, the demo assets) is a different operation; see
``rlhf_lit/export.py`` and ``rlhf_lit/demo_assets.py``; :func:`apply_umask` gives such a folder
the permissions of ordinary files.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

# O_EXCL: never reuse a file someone else created. O_BINARY (Windows only): no newline translation.
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temp(path: Path) -> tuple[int, Path]:
    """An empty new file beside ``path``, opened for writing: ``(fd, its path)``."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # Mode 0o666 is filtered by the umask, as for open(); mkstemp would force 0o600.
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {path}")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without error
    (the recipe of the module docstring; missing parent folders are created).

    For writers that stream into a handle (``torch.save``, ``savefig``). If the block or the
    write raises (``OSError`` of a full disk included), the temporary file is removed, ``path``
    keeps its old content and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; best effort: a file system or OS
    that cannot open or sync a folder (Windows) is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux's
    ``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain
    ``open``/``mkdir`` would: ``0o666`` / ``0o777`` less the umask. Folders made with
    :func:`tempfile.mkdtemp` (``0o700``) and files copied from private ones become what the
    user's umask says, so that e.g. a serving process under another user can read an adapter."""
    mask = current_umask()
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``, atomically (see the module docstring).

    Missing parent folders are created. Raises the ``OSError`` of the failing step (no temporary
    file is left behind)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`write_bytes_atomic` of ``text.encode(encoding)``: written as is, no newline
    translation. Raises ``UnicodeEncodeError`` before touching the file system if ``text`` does not
    encode."""
    write_bytes_atomic(path, text.encode(encoding))


def write_jsonl_atomic(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Replace ``path`` by JSONL: one ``json.dumps(record, ensure_ascii=False)`` line per record,
    UTF-8, ``\\n`` line ends. ``records`` is consumed while writing (a generator is fine); if it or
    ``json.dumps`` raises, the old file stays and the error propagates."""
    with atomic_writer(path) as fh:
        for r in records:
            fh.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


__all__ = ["apply_umask", "atomic_writer", "current_umask", "fsync_folder", "write_bytes_atomic", "write_jsonl_atomic",
           "write_text_atomic"]
