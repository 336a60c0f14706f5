"""Ctrl-C: the first stops the run promptly through Lightning's path, a second stops the process at once.

Lightning turns a ``KeyboardInterrupt`` into a graceful shutdown (loggers finalised, the exit
code 1) and ignores further Ctrl-C while it shuts down. A process can still hang after that:
Python joins every non-daemon thread before it exits, e.g. a thread pool whose requests wait
out their timeouts and retries. So the command line (``python -m rlhf_lit``, never an in-process
call) installs :func:`install`:

- the first Ctrl-C raises ``KeyboardInterrupt`` as usual and starts a watchdog that ends the
  process :data:`GRACE_S` seconds later if it has not ended by itself;
- a second Ctrl-C ends the process at once (exit code 130), also during Lightning's shutdown
  (:class:`InterruptHandling` re-arms the handler there).

Checkpoints are written atomically, so ending the process at any moment leaves the last complete
checkpoint to resume from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from lightning.pytorch.callbacks import Callback

#: Seconds between the first Ctrl-C and the forced end of a process that has not ended by itself.
GRACE_S = 10.0

_state = {"installed": False, "count": 0}


def _say(msg: str) -> None:
    try:
        print(f"\nrlhf_lit: {msg}", file=sys.stderr, flush=True)
    except Exception:  # stderr closed or broken: the exit matters more than the message
        pass


def _hard_exit() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(130)


def _watchdog(grace: float) -> None:
    time.sleep(grace)
    _say(f"still not stopped {grace:.0f} s after Ctrl-C (work that does not stop: a request, a thread pool); "
         f"exiting now")
    _hard_exit()


def _on_sigint(signum, frame) -> None:
    _state["count"] += 1
    if _state["count"] == 1:
        _say("interrupted: stopping the run (Ctrl-C again to stop at once)")
        threading.Thread(target=_watchdog, args=(GRACE_S,), name="rlhf_lit-interrupt-watchdog", daemon=True).start()
        raise KeyboardInterrupt
    _say("second Ctrl-C: stopping now")
    _hard_exit()


def install() -> None:
    """Install the Ctrl-C handling of the module docstring (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_sigint)
    _state["installed"] = True


class InterruptHandling(Callback):
    """Re-arms the Ctrl-C handler after Lightning has set Ctrl-C to be ignored during its
    graceful shutdown, so that a second Ctrl-C still ends the process."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if _state["installed"] and isinstance(exception, KeyboardInterrupt):
            signal.signal(signal.SIGINT, _on_sigint)
