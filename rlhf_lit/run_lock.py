"""One process per run folder: an exclusive lock held for the run's whole life.

Two ``fit`` runs writing the same folder interleave ``metrics.jsonl``, race on ``last.ckpt`` and
overwrite each other's adapter. :class:`RunFolderLock` takes an OS file lock (``flock`` on POSIX,
``LockFileEx`` on Windows, through the ``filelock`` library) on ``<run folder>/.rlhf_lit.lock``;
a second process that asks for it is refused at once with a message naming the holder.

The operating system releases the lock when its process ends, however it ends (exit, exception,
``kill -9``, a machine reset), so a lock file left behind by a dead run is never mistaken for a
live one: the next run simply takes it. Who holds it is noted beside it, in
``.rlhf_lit.lock.owner`` (pid, host, start time, command line), for the refusal message only.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from rlhf_lit.atomic_files import write_text_atomic

LOCK_NAME = ".rlhf_lit.lock"
OWNER_NAME = ".rlhf_lit.lock.owner"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunFolderLock:
    """The exclusive lock of one run folder (see the module docstring).

    Args:
        folder: the run folder; created if missing.
        what: what this process is about to do there (``fit``, ``test``...), for messages.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run") -> None:
        self.folder = Path(folder)
        self.what = what
        self._lock: Optional[FileLock] = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> "RunFolderLock":
        """Take the lock without waiting.

        Raises:
            RunFolderBusy: another process holds it; the message names that process (as far as
                its owner note tells) and what to do.
            OSError: the folder cannot be created or the lock file cannot be opened.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder / LOCK_NAME, timeout=0, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderBusy(
                f"the run folder {self.folder} is in use by another rlhf_lit process"
                f"{self._owner_text()}. Two processes in one folder would interleave its metrics and "
                f"overwrite each other's checkpoints and adapter: wait for that one to end, or choose "
                f"another folder (--trainer.logger.init_args.save_dir=...)."
            ) from None
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        try:
            write_text_atomic(self.folder / OWNER_NAME, json.dumps(owner) + "\n")
        except OSError:
            pass  # the note is informative only; the lock is what counts
        return self

    def release(self) -> None:
        """Give the lock back (a no-op when not held); the owner note is removed first."""
        if not self.held:
            return
        try:
            (self.folder / OWNER_NAME).unlink()
        except OSError:
            pass
        self._lock.release(force=True)
        self._lock = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _owner_text(self) -> str:
        try:
            owner = json.loads((self.folder / OWNER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        return (f" (pid {owner.get('pid')} on {owner.get('host')}, {owner.get('what')} started "
                f"{owner.get('started')}: {owner.get('command')})")
