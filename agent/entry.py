"""The `emotion-agent` command's entry point, kept apart from agent.cli so that almost nothing
runs before a Ctrl-C can be caught.

The console script imports its entry module before it calls anything. Were that agent.cli, its
imports (argparse, logging, PyYAML: about 0.1 s) would run outside main's handlers, and a Ctrl-C
in that time would print a traceback instead of exiting with 130 as it does everywhere else.
"""

from __future__ import annotations

from agent.errors import interrupted


def main() -> int:
    try:
        from agent.cli import main as cli_main
    except BaseException as exc:
        if interrupted(exc):
            return 130
        raise
    return cli_main()
