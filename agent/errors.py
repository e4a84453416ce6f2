"""The error hierarchy: each one is turned into a single line and an exit code at the top."""


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
    """The MQTT broker cannot be used (bad address, refused credentials, TLS)."""

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
