"""Errors caused by the user's input, and how the command line shows them.

A :class:`UserError` carries a message that says what is wrong and what to do (the option, file
and line, the expected value). ``python -m rlhf_lit`` prints that message alone and exits with
status 2; ``RLHF_LIT_DEBUG=1`` adds the traceback. Every other exception is a bug, or an
environment failure, and keeps its traceback. Standard library only (a leaf of the import graph).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

#: The environment variable that turns tracebacks of user errors back on.
DEBUG_ENV = "RLHF_LIT_DEBUG"
#: Exit status of a run stopped by a user error (argparse's for usage errors).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in what the user gave: a config value, a file, a path, a reward backend's output."""


class ConfigError(UserError, ValueError):
    """An option whose value cannot work; the message names the option."""


class InputFileError(UserError, ValueError):
    """A file that cannot be used (a prompt file, a config, an adapter's files); the message names
    the file and, where there is one, the line."""


class MissingPathError(UserError, FileNotFoundError):
    """A path given in an option that does not exist; the message names the option and the path."""


class RunStateError(UserError):
    """A run folder or checkpoint that cannot serve the command as given: in use by another run,
    holding another run, not writable, or a damaged checkpoint; the message names it and what to do."""


def debug_enabled() -> bool:
    """Whether ``RLHF_LIT_DEBUG`` asks for tracebacks (any value but ``""``, ``0``, ``false``, ``no``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def find_user_error(exc: BaseException) -> Optional[UserError]:
    """``exc`` itself or the first :class:`UserError` in its ``__cause__``/``__context__`` chain
    (libraries such as jsonargparse or Lightning may wrap it), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_reporting_user_errors(main: Callable[[], T]) -> T:
    """Call ``main()``; a :class:`UserError` is printed as ``error: <message>`` on stderr and the
    process exits with :data:`EXIT_USER_ERROR` (with the traceback too under ``RLHF_LIT_DEBUG=1``).

    Raises:
        SystemExit: on a user error.
    """
    try:
        return main()
    except Exception as e:  # noqa: BLE001  (anything else is re-raised as it is)
        user = find_user_error(e)
        if user is None:
            raise
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {user}", file=sys.stderr)
        if not debug_enabled():
            print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_USER_ERROR) from None
