"""Entry point: ``python -m rlhf_lit fit --config configs/demo.yaml`` (and the ``rlhf-lit`` script).

Errors in what the user gave (:class:`rlhf_lit.errors.UserError`) print their message alone and
exit with status 2; ``RLHF_LIT_DEBUG=1`` shows their traceback too.
"""

from rlhf_lit.cli import main
from rlhf_lit.console import configure_console
from rlhf_lit.errors import run_reporting_user_errors


def run() -> None:
    """The command line: :func:`rlhf_lit.cli.main` with user errors reported as messages and the
    console of :mod:`rlhf_lit.console` (no known-harmless warnings, the package's log lines)."""
    configure_console()
    run_reporting_user_errors(main)


if __name__ == "__main__":
    run()
