"""Entry point: ``python -m rlhf_lit fit --config configs/demo.yaml`` (and the ``rlhf-lit`` script).

Errors in what the user gave (:class:`rlhf_lit.errors.UserError`) print their message alone and
exit with status 2; ``RLHF_LIT_DEBUG=1`` shows their traceback too.
"""

from rlhf_lit.cli import main
from rlhf_lit.console import configure_console
from rlhf_lit.errors import run_reporting_user_errors
from rlhf_lit.parallel import close_process_group


def run() -> None:
    """The command line: :func:`rlhf_lit.cli.main` with user errors reported as messages and the
    console of :mod:`rlhf_lit.console` (no known-harmless warnings, the package's log lines); a
    data-parallel run's process group is closed before the interpreter exits (after a run that
    ended normally: a failed rank's peers may never reach that point)."""
    configure_console()
    run_reporting_user_errors(main)
    close_process_group()


if __name__ == "__main__":
    run()
