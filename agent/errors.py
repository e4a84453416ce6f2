"""The error hierarchy, and `report_error`, which turns any error into a single line and an exit
code at the top (of emotion-agent and of python -m agent.tools.flicker)."""

from __future__ import annotations

import logging
import os
import sys

# The command's logger: the traceback of a bug shows with --log-level debug.
logger = logging.getLogger("agent")


class AgentError(Exception):
    """Base of every error the agent reports to the user as one line."""

    exit_code = 1


class ConfigError(AgentError):
    """The configuration (file or command line) is invalid."""

    exit_code = 2


class ModelError(AgentError):
    """A model file is missing, unreadable, or not the shape we expect."""

    exit_code = 3


class SourceError(AgentError):
    """The frame source cannot be opened or read."""

    exit_code = 4


class BrokerError(AgentError):
    """The MQTT broker cannot be used (an address the client refuses). A TLS file that does not
    load is a ConfigError instead (mqtt.check_tls_files): systemd restarts the unit on this one,
    and no restart mends a file."""

    exit_code = 5


class PreviewError(AgentError):
    """The preview window cannot be opened (no display, no GUI support)."""

    exit_code = 6


def interrupted(exc: BaseException | None) -> bool:
    """Whether `exc` is a Ctrl-C, or an error a Ctrl-C caused: Python reports one that lands in an
    extension module's initialisation as an ImportError, and (before 3.12) one in a dataclass
    field's set-up as a RuntimeError, each with the KeyboardInterrupt as its cause."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def where_raised(exc: BaseException) -> str:
    """Where an error nothing foresaw came from, for its one-line report: the innermost frame of
    the agent's own code, and the innermost of all where that is in a library."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    if not frames:
        return "?"
    here = os.path.dirname(os.path.abspath(__file__))
    ours = [f for f in frames if os.path.abspath(f[0]).startswith(here + os.sep)]
    shown = reversed(ours[-1:] + frames[-1:])  # the innermost first; one entry where they are the same
    return " from ".join(dict.fromkeys(f"{os.path.basename(name)}:{line}" for name, line in shown))


def _silence_stdout() -> None:
    # Output that cannot be written (a full disk) is lost either way; without this, Python's own
    # flush at exit would print a second error, with a traceback.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # AttributeError: no stdout at all
        pass


def flushed(code: int) -> int:
    """`code`, once stdout is flushed: here, where a failure is still ours to report."""
    if sys.stdout is not None:  # None when started with stdout closed
        sys.stdout.flush()
    return code


def report_error(exc: Exception) -> int:
    """`exc` as one line on stderr, and the exit code for it (emotion-agent and python -m agent.tools.flicker)."""
    if isinstance(exc, AgentError):
        print(f"emotion-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, OSError):
        # What the system refused where no check looked: a full disk, a name too long, a closed pipe.
        _silence_stdout()
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"emotion-agent: error: {name}{exc.strerror or exc}", file=sys.stderr)
        return 1
    # A bug: one line that says where, rather than a traceback.
    logger.debug("the error's traceback", exc_info=exc)  # with --log-level debug, for a report
    print(f"emotion-agent: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
          f"({where_raised(exc)}); please report it", file=sys.stderr)
    return 1
